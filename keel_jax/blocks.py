"""The five sub-layer rules side by side, and the Transformer block (attention + FFN sub-layers).

Every rule in DESIGN.md section 2 is one instance of a single sub-layer form,

    h   = N_in(x)          if pre  else x
    out = N_out(alpha*x + F(h)) if post else alpha*x + F(h)

with per-sub-layer constants (alpha, pre, post):

    block      alpha            pre  post   equation
    pre_ln     1                1    0      x + F(N(x))                   (+ final norm)
    post_ln    1                0    1      N(x + F(x))
    keel       L                1    1      N_out(L*x + F(N_in(x)))       first sub-layers: see below
    deepnorm   (2B)^(1/4)       0    1      N(alpha*x + F(x)), FFN/V/O init * (8B)^(-1/4)
    mix_ln     1                0/1  1/0    Post-LN in the lowest fraction of blocks, Pre-LN above

Keel's first sub-layers (paper v2): attention `x + F(N_in(x))` (alpha 1, no outer norm), FFN
`N_out(x + F(N_in(x)))` (alpha 1); v1 drops the outer norm on both.

The constants are data, not structure: they enter `nn.scan` as scanned inputs of shape [B, 2], so a
model of any depth traces one block, and Keel's first layer or Mix-LN's split cost no recompile.
`keep` (1 or 0 per sub-layer) replaces a sub-layer's update by the identity (layer-removal study).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from keel_jax.attention import Attention, SwiGLU
from keel_jax.model_config import ModelConfig
from keel_jax.norms import RMSNorm


def deepnorm_alpha_beta(num_blocks: int) -> tuple[float, float]:
  """DeepNet (Wang et al. 2022) decoder-only constants: alpha = (2B)^(1/4), beta = (8B)^(-1/4)."""
  return (2 * num_blocks) ** 0.25, (8 * num_blocks) ** -0.25


def sublayer_schedule(cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Per-sub-layer constants {'alpha', 'pre', 'post'}, each float32 [num_layers, 2] (attn, ffn)."""
  B = cfg.num_layers
  alpha = np.ones((B, 2), np.float32)
  pre = np.ones((B, 2), np.float32)
  post = np.ones((B, 2), np.float32)
  if cfg.block == "pre_ln":
    post[:] = 0
  elif cfg.block == "post_ln":
    pre[:] = 0
  elif cfg.block == "keel":
    alpha[:] = cfg.alpha
    alpha[0, :] = 1.0  # first attention and first FFN sub-layer: alpha 1 (v1 and v2)
    post[0, 0] = 0.0  # first attention sub-layer: no outer norm (v1 and v2)
    if cfg.keel_first_layer == "v1":
      post[0, 1] = 0.0  # v1: the first FFN sub-layer has no outer norm either
  elif cfg.block == "deepnorm":
    alpha[:] = deepnorm_alpha_beta(B)[0]
    pre[:] = 0
  elif cfg.block == "mix_ln":
    num_post = int(round(cfg.mix_ln_fraction * B))
    pre[:num_post], post[:num_post] = 0, 1  # lowest blocks: Post-LN
    pre[num_post:], post[num_post:] = 1, 0  # the rest: Pre-LN
  else:  # ModelConfig validates the name; this guards new blocks added without a rule
    raise ValueError(f"no sub-layer rule for block {cfg.block!r}")
  return {"alpha": alpha, "pre": pre, "post": post}


def has_final_norm(cfg: ModelConfig) -> bool:
  """Pre-LN's stream is unnormalised at the top (Mix-LN's upper part is Pre-LN); the others end in N."""
  return cfg.block in ("pre_ln", "mix_ln")


class SubLayer(nn.Module):
  """One sub-layer (DESIGN.md section 2) on a float32 residual stream x_BxTxD."""
  cfg: ModelConfig
  kind: str  # 'attn' | 'ffn'
  decode: bool = False

  @nn.compact
  def __call__(self, x_BxTxD, consts, positions_BxT, segments_BxT=None):
    """consts: scalars {'alpha', 'pre', 'post', 'keep'} for this sub-layer (traced, from the scan);
    segments_BxT: document ids of packed rows (attention stays within a document), or None."""
    c = self.cfg
    norm = lambda name: RMSNorm(c.norm_eps, c.norm_impl, name=name)
    # Which norms exist is structural (same for every layer); whether they apply is data.
    if c.block == "mix_ln":
      norm_in = norm_out = norm("norm")  # one norm per sub-layer, used before or after F
    else:
      norm_in = norm("norm_in") if c.block in ("pre_ln", "keel") else None
      norm_out = norm("norm_out") if c.block in ("post_ln", "keel", "deepnorm") else None

    h = x_BxTxD
    if norm_in is not None:
      h = jnp.where(consts["pre"] > 0, norm_in(x_BxTxD), x_BxTxD)
    h = h.astype(c.compute_dtype)
    beta = deepnorm_alpha_beta(c.num_layers)[1] if c.block == "deepnorm" else 1.0
    if self.kind == "attn":
      f_BxTxD = Attention(c, vo_init_scale=beta, decode=self.decode, name="attn")(h, positions_BxT, segments_BxT)
    else:
      f_BxTxD = SwiGLU(c, init_scale=beta, name="mlp")(h)

    alpha = consts["alpha"]
    shortcut = alpha * x_BxTxD  # float32: at alpha ~ L a bfloat16 sum would lose F (DESIGN.md)
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
