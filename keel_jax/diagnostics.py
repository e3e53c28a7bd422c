"""Per-sub-layer statistics: the paper's central quantity is the gradient norm of each sub-layer.

Sub-layer order is depth order: attn_0, ffn_0, attn_1, ffn_1, ... (L = 2 * num_blocks entries).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from keel_jax.model import Decoder, layer_stack, lm_loss


def sublayer_sq_norms(tree, cfg) -> jax.Array:
  """Squared L2 norm of each sub-layer's slice of a params-shaped tree (grads, params, updates): [L]."""
  stack = layer_stack(tree, cfg)
  per_kind = []
  for kind in ("attn", "ffn"):
    leaves = jax.tree.leaves(stack[kind])
    per_kind.append(sum(jnp.sum(jnp.square(a.astype(jnp.float32)).reshape(a.shape[0], -1), axis=1)
                        for a in leaves))
  return jnp.stack(per_kind, axis=1).reshape(-1)  # [B, 2] -> [L], attn before ffn in each block


def sublayer_norms(tree, cfg) -> jax.Array:
  """L2 norm of each sub-layer's parameters (or gradients, or updates) in `tree`: [L]."""
  return jnp.sqrt(sublayer_sq_norms(tree, cfg))


def sublayer_grad_norms(model: Decoder, params, tokens_BxT1: jax.Array) -> jax.Array:
  """Gradient norm of the LM loss w.r.t. each sub-layer's parameters, for one batch: [L]."""
  grads = jax.grad(lambda p: lm_loss(model, p, tokens_BxT1))(params)
  return sublayer_norms(grads, model.cfg)


def sublayer_branch_ratios(model: Decoder, params, tokens_BxT: jax.Array) -> jax.Array:
  """RMS of each sub-layer's branch F over the RMS of its scaled shortcut alpha * x: [L].

  The paper's gradient argument assumes these are comparable; at initialisation they are small.
  """
  _, state = model.apply({"params": params}, tokens_BxT, mutable=["intermediates"])
  inter = layer_stack(state["intermediates"], model.cfg)
  ratio = [inter[k]["branch_rms"][0] / inter[k]["shortcut_rms"][0] for k in ("attn", "ffn")]
  return jnp.stack(ratio, axis=1).reshape(-1)


def gradient_ratio(grad_norms_L, low_block: int = 1) -> float:
  """The vanishing measure: geometric mean of block `low_block`'s two sub-layer gradient norms over the
  last block's (1 = flat, << 1 = vanishing at the bottom). `grad_norms_L` in depth order, as
  `sublayer_grad_norms` returns them. Block 1 by default: Keel's block 0 follows its own first-layer
  rule. NaN when the model has too few blocks or the top norms are 0."""
  g = np.asarray(grad_norms_L, np.float64)
  if len(g) < 2 * low_block + 2:
    return float("nan")
  low, high = math.sqrt(g[2 * low_block] * g[2 * low_block + 1]), math.sqrt(g[-2] * g[-1])
  return low / high if high > 0 else float("nan")
