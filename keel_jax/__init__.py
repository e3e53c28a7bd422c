"""keel_jax: Keel and its baselines (Pre-LN, Post-LN, DeepNorm, Mix-LN), scanned over depth."""
