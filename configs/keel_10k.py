# python -m keel_jax.train --config configs/keel_10k.py --workdir workdirs/keel_10k
# 10,000 sub-layers (5,000 blocks) on a CPU: width 32, 8 x 32 bytes per step, 400 steps; one scan over
# the 5,000 blocks with remat per block (it keeps the 5,000 block inputs, 164 MiB here). The nested scan
# (`:scan_groups=50`, remat per group too) needs less memory but recomputes the forward pass once more:
# 6.9 s/step against 5.3 here. `:block=pre_ln` / `:block=post_ln` give the baselines at the same depth
# and budget. `python experiments/depth_frontier.py --part deepest` runs all three and records step time,
# peak RSS and compile time (docs/RESULTS.md, "depth frontier").
from keel_jax import config_lib


def get_config(arg=None):
  cfg = config_lib.base_config()
  cfg.model.update(block="keel", num_blocks=5000, d_model=32, num_heads=2, num_kv_heads=1, d_ff=64,
                   scan_groups=0, remat_policy="full")
  cfg.data.update(source="stdlib", max_files=200, seq_len=32, batch_size=8, eval_batches=4)
  cfg.train.update(num_steps=400, lr=3e-3, warmup_steps=20, log_every=1, eval_every=50,
                   checkpoint_every=50, keep_checkpoints=1, telemetry_every=25)
  config_lib.apply_arg(cfg, arg)
  return cfg
