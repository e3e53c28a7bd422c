# python -m keel_jax.train --config configs/default.py --workdir workdirs/default
# A small Keel model on the embedded default corpus (the Python standard library's source, byte-level),
# sized to finish in under 10 minutes on 2 CPU cores. Any field: configs/default.py:block=pre_ln,lr=2e-3
from keel_jax import config_lib


def get_config(arg=None):
  cfg = config_lib.base_config()
  # Width 128 beats width 256 at this budget: more steps per minute matter more than capacity here.
  cfg.model.update(block="keel", num_blocks=4, d_model=128, num_heads=4, num_kv_heads=2, d_ff=384,
                   remat_policy="none")  # a 0.8M-parameter model needs no remat on a 24 GiB host
  cfg.data.update(source="stdlib", seq_len=128, batch_size=32, eval_batches=16)
  cfg.train.update(num_steps=600, lr=5e-3, warmup_steps=60, eval_every=200, checkpoint_every=200,
                   log_every=25)
  config_lib.apply_arg(cfg, arg)
  return cfg
