"""AdamW with linear warmup, cosine decay to a floor, global-norm clipping; no decay on norm gains."""
from __future__ import annotations

import jax
import optax


def lr_schedule(train_cfg) -> optax.Schedule:
  """Linear 0 -> lr over warmup_steps, then cosine to lr_floor at num_steps (or flat: max-LR tests)."""
  t = train_cfg
  if t.schedule == "linear_warmup_only":  # the paper's max-LR stress test: warm up, never decay
    return optax.linear_schedule(0.0, t.lr, max(t.warmup_steps, 1))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.lr, warmup_steps=t.warmup_steps,
      decay_steps=max(t.num_steps, t.warmup_steps + 1), end_value=t.lr_floor)


def decay_mask(params):
  """True for weights that decay: everything but the RMSNorm gains (leaves named 'scale')."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) != "scale", params)


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  t = train_cfg
  return optax.chain(
      optax.clip_by_global_norm(t.clip_norm),
      optax.adamw(lr_schedule(t), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                  mask=decay_mask))
