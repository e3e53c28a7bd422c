"""The sub-layer and the Transformer block (attention + FFN sub-layers), built from the block-rule
table of keel_jax/block_rules.py (docs/DESIGN.md section 2.3).

The per-sub-layer constants (alpha, pre, post) are data, not structure: they enter `nn.scan` as
scanned inputs of shape [B, 2], so a model of any depth traces one block, and Keel's first layer or
Mix-LN's split cost no recompile. Which norms exist and the init scale come from the rule (the same
for every layer). `keep` (1 or 0 per sub-layer) replaces a sub-layer's update by the identity
(layer-removal study).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from keel_jax.attention import Attention, SwiGLU
from keel_jax.block_rules import BLOCK_RULES
from keel_jax.model_config import ModelConfig
from keel_jax.norms import RMSNorm


class SubLayer(nn.Module):
  """One sub-layer (docs/DESIGN.md section 2.3) on a float32 residual stream x_BxTxD."""
  cfg: ModelConfig
  kind: str  # 'attn' | 'ffn'
  decode: bool = False

  @nn.compact
  def __call__(self, x_BxTxD, consts, positions_BxT, segments_BxT=None):
    """consts: scalars {'alpha', 'pre', 'post', 'keep'} for this sub-layer (traced, from the scan);
    segments_BxT: document ids of packed rows (attention stays within a document), or None."""
    c, rule = self.cfg, BLOCK_RULES[self.cfg.block]
    # Which norms exist is structural (same for every layer); whether they apply is data. A rule
    # naming one norm for both places shares it (Mix-LN: used before or after F).
    names = [n for n in dict.fromkeys((rule.norm_in, rule.norm_out)) if n is not None]
    norms = {n: RMSNorm(c.norm_eps, c.norm_impl, name=n) for n in names}
    norm_in, norm_out = norms.get(rule.norm_in), norms.get(rule.norm_out)

    h = x_BxTxD
    if norm_in is not None:
      h = jnp.where(consts["pre"] > 0, norm_in(x_BxTxD), x_BxTxD)
    h = h.astype(c.compute_dtype)
    beta = rule.init_scale(c)
    if self.kind == "attn":
      f_BxTxD = Attention(c, vo_init_scale=beta, decode=self.decode, name="attn")(h, positions_BxT, segments_BxT)
    else:
      f_BxTxD = SwiGLU(c, init_scale=beta, name="mlp")(h)

    alpha = consts["alpha"]
    shortcut = alpha * x_BxTxD  # float32: at alpha ~ L a bfloat16 sum would lose F (docs/DESIGN.md section 2.4)
    y = shortcut + f_BxTxD.astype(jnp.float32)
    if norm_out is not None:
      y = jnp.where(consts["post"] > 0, norm_out(x_BxTxD, f_BxTxD, alpha), y)
    # Branch / shortcut sizes, for the gradient-flow study (kept only if 'intermediates' is mutable).
    self.sow("intermediates", "branch_rms", jnp.sqrt(jnp.mean(jnp.square(f_BxTxD.astype(jnp.float32)))))
    self.sow("intermediates", "shortcut_rms", jnp.sqrt(jnp.mean(jnp.square(shortcut))))
    y = jnp.where(consts["keep"] > 0, y, x_BxTxD)
    return nn.with_logical_constraint(y, ("batch", "length", "embed"))


class Block(nn.Module):
  """Attention sub-layer then FFN sub-layer. Signature fits nn.scan: (carry, consts) -> (carry, None)."""
  cfg: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x_BxTxD, consts_2, positions_BxT, segments_BxT=None):
    """consts_2: dict of [2] arrays (attn, ffn) for this block."""
    pick = lambda i: jax.tree.map(lambda a: a[i], consts_2)
    x_BxTxD = SubLayer(self.cfg, "attn", self.decode, name="attn")(x_BxTxD, pick(0), positions_BxT, segments_BxT)
    x_BxTxD = SubLayer(self.cfg, "ffn", self.decode, name="ffn")(x_BxTxD, pick(1), positions_BxT, segments_BxT)
    return x_BxTxD, None
