# python -m keel_jax.train --config configs/paper_keel_512.py:block=keel --workdir /mnt/shared/keel_512
# The paper's main setup (docs/DESIGN.md section 2.8): d_model 1024, 256 blocks = 512 sub-layers, GQA 16/8,
# FFN 3072, seq 4096, AdamW (0.9, 0.95), wd 0.01, clip 1.0, 2500 warmup steps, cosine to 1e-7.
# The workdir is a directory all hosts see (an NFS / Filestore mount; a gs:// URL is not one: docs/SCALING.md).
# For accelerators (bfloat16); pick the block with `:block=pre_ln` etc., the mesh with --config.mesh.*.
# Memory defaults are the best-fitting choices `python -m keel_jax.aot` found (docs/PERFORMANCE.md, long
# sequences): remat 'full' + nested scan of 16 groups (the float32 residual stream kept), the loss in
# chunks of 512 positions, attention 'auto' (splash on TPU, cuDNN via dot_product on GPU). On v5p-256
# (data 16 x fsdp 8) that compiles to 10.58 GiB per chip (11.57 with attention_impl=xla), at seq
# 8192 x batch 128 to 10.55. On 8 chips (v5p-16) add
# `--config.mesh.data=1 --config.train.grad_accum_steps=16`: 12.11 GiB per chip.
from keel_jax import config_lib


def get_config(arg=None):
  cfg = config_lib.paper_config()
  # What keel_jax.aot found fits best on v5p (docs/PERFORMANCE.md): remat full, nested scan, loss chunks.
  cfg.model.update(num_blocks=256, remat_policy="full", scan_groups=16, attention_impl="auto")
  cfg.data.eval_batches = 32
  cfg.train.update(num_steps=100_000, lr=1e-3, warmup_steps=2500, lr_floor=1e-7, eval_every=2000,
                   checkpoint_every=1000, log_every=50, loss_chunk=512)
  config_lib.apply_arg(cfg, arg)
  return cfg
