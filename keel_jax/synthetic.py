"""Deprecated module path: the synthetic tasks are the data source keel_jax.data.synthetic."""
import sys
import warnings

from keel_jax.data import synthetic as _synthetic

warnings.warn("keel_jax.synthetic is deprecated; import keel_jax.data.synthetic", DeprecationWarning,
              stacklevel=2)
sys.modules[__name__] = _synthetic
