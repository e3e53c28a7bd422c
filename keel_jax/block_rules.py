"""The block types as data: one row per type, from which keel_jax/blocks.py builds every sub-layer.

Every rule of docs/DESIGN.md section 2.2 is one instance of a single sub-layer form (section 2.3),

    h   = N_in(x)                    if pre  else x
    out = N_out(alpha*x + F(h))      if post else alpha*x + F(h)

with per-sub-layer constants (alpha, pre, post). The rows of BLOCK_RULES, side by side:

    block      update                               alpha        norms             final norm  init scale
    keel       N_out(L*x + F(N_in(x)))              L            norm_in, norm_out no          1
    pre_ln     x + F(N(x))                          1            norm_in           yes         1
    post_ln    N(x + F(x))                          1            norm_out          no          1
    deepnorm   N(alpha*x + F(x))                    (2B)^(1/4)   norm_out          no          (8B)^(-1/4)
    mix_ln     Post-LN in the lowest fraction of    1            one shared norm   yes         1
               blocks, Pre-LN above

Keel's first-layer rule (paper v2): the first attention sub-layer is `x + F(N_in(x))` (alpha 1, no
outer norm), the first FFN sub-layer `N_out(x + F(N_in(x)))` (alpha 1); v1 drops the outer norm on
both. B = blocks, L = sub-layers = 2B. A new block type is one row here plus its test.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np


def _one(cfg) -> float:
  return 1.0


@dataclasses.dataclass(frozen=True)
class BlockRule:
  norm_in: str | None  # param name of the norm before F; None: F sees x
  norm_out: str | None  # param name of the norm after the shortcut sum; norm_in's name: one shared norm
  alpha: Callable[[Any], float] = _one  # the shortcut scale, from the ModelConfig
  final_norm: bool = False  # the model ends in a norm (its stream is unnormalised at the top)
  init_scale: Callable[[Any], float] = _one  # factor on the init std of the FFN, V and O projections
  post_ln_blocks: Callable[[Any], int] | None = None  # shared norm: the lowest this many blocks use it after F
  first_layer: Callable[[Any, np.ndarray, np.ndarray], None] | None = None  # edits block 0's (alpha, post)


def deepnorm_alpha_beta(num_blocks: int) -> tuple[float, float]:
  """DeepNet (Wang et al. 2022) decoder-only constants: alpha = (2B)^(1/4), beta = (8B)^(-1/4)."""
  return (2 * num_blocks) ** 0.25, (8 * num_blocks) ** -0.25


def keel_first_layer(cfg, alpha_Bx2: np.ndarray, post_Bx2: np.ndarray) -> None:
  """Block 0: alpha 1 on both sub-layers, no outer norm on the attention (v2) or on both (v1)."""
  alpha_Bx2[0, :] = 1.0
  post_Bx2[0, 0] = 0.0
  if cfg.keel_first_layer == "v1":
    post_Bx2[0, 1] = 0.0


BLOCK_RULES: dict[str, BlockRule] = {
    "keel": BlockRule("norm_in", "norm_out", alpha=lambda c: c.alpha, first_layer=keel_first_layer),
    "pre_ln": BlockRule("norm_in", None, final_norm=True),
    "post_ln": BlockRule(None, "norm_out"),
    "deepnorm": BlockRule(None, "norm_out", alpha=lambda c: deepnorm_alpha_beta(c.num_blocks)[0],
                          init_scale=lambda c: deepnorm_alpha_beta(c.num_blocks)[1]),
    "mix_ln": BlockRule("norm", "norm", final_norm=True,
                        post_ln_blocks=lambda c: int(round(c.mix_ln_fraction * c.num_blocks))),
}
BLOCKS = tuple(BLOCK_RULES)


def sublayer_schedule(cfg) -> dict[str, np.ndarray]:
  """Per-sub-layer constants {'alpha', 'pre', 'post'}, each float32 [num_blocks, 2] (attn, ffn)."""
  rule, B = BLOCK_RULES[cfg.block], cfg.num_blocks
  alpha = np.full((B, 2), rule.alpha(cfg), np.float32)
  pre = np.full((B, 2), rule.norm_in is not None, np.float32)
  post = np.full((B, 2), rule.norm_out is not None, np.float32)
  if rule.post_ln_blocks is not None:
    n = rule.post_ln_blocks(cfg)
    pre[:n], post[:n] = 0, 1  # lowest blocks: Post-LN
    pre[n:], post[n:] = 1, 0  # the rest: Pre-LN
  if rule.first_layer is not None:
    rule.first_layer(cfg, alpha, post)
  return {"alpha": alpha, "pre": pre, "post": post}
