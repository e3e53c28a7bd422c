# python -m keel_jax.train --config configs/paper_max_lr.py:block=keel,num_blocks=32 --workdir workdirs/maxlr_keel_64
# The paper's max-LR stress test (Table 1): linear warmup 0 -> 5e-2 over 5000 steps, no decay; the max
# LR is the LR one step before divergence (experiments/max_lr.py reads it off metrics.jsonl).
# 64 sub-layers = num_blocks=32; 512 sub-layers = num_blocks=256.
from keel_jax import config_lib


def get_config(arg=None):
  cfg = config_lib.paper_config()
  cfg.model.num_blocks = 32
  cfg.data.eval_batches = 8
  cfg.train.update(num_steps=5000, lr=5e-2, warmup_steps=5000, schedule="linear_warmup_only", eval_every=500,
                   checkpoint_every=500, log_every=1, nonfinite_policy="skip", max_consecutive_skips=1000000)
  config_lib.apply_arg(cfg, arg)
  return cfg
