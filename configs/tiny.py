# python -m keel_jax.train --config configs/tiny.py --workdir /tmp/keel_tiny
# A seconds-long run for tests and smoke checks: 2 blocks of width 32 on a slice of the default corpus.
from keel_jax import config_lib


def get_config(arg=None):
  cfg = config_lib.base_config()
  cfg.model.update(num_blocks=2, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64)
  cfg.data.update(source="stdlib", max_files=40, seq_len=32, batch_size=8, eval_batches=2)
  cfg.train.update(num_steps=20, lr=3e-3, warmup_steps=5, log_every=5, eval_every=10,
                   checkpoint_every=10)
  config_lib.apply_arg(cfg, arg)
  return cfg
