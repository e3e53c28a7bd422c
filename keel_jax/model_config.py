"""ModelConfig: the validated, hashable model hyperparameters (built from `cfg.model`).

Every check runs in `ModelConfig.__post_init__`, i.e. before anything is traced or compiled, and
raises `ConfigError(field, value, allowed)`.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

from keel_jax.block_rules import BLOCK_RULES
from keel_jax.errors import ConfigError

REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch")
NORM_IMPLS = ("xla", "pallas", "auto")
ATTENTION_IMPLS = ("xla", "dot_product", "splash", "auto")  # keel_jax/attention_impls.py
DTYPES = ("float32", "bfloat16")
KEEL_FIRST_LAYER_RULES = ("v1", "v2")
# Fields that choose how the model computes, not what its parameters are: a checkpoint may be resumed
# or restored with other values (a run trained with Pallas norms on a TPU evaluates with XLA norms on
# a laptop). scan_layers and scan_groups are not among them: they change the parameter tree's layout.
# Old model field names that still work, with a FutureWarning naming the new one.
RENAMED_FIELDS = {"num_layers": "num_blocks"}
_WHY = {"num_blocks": "it counts blocks; the paper's L (and alpha) counts sub-layers, L = 2 x num_blocks"}


def warn_renamed(old: str) -> None:
  new = RENAMED_FIELDS[old]
  warnings.warn(f"model.{old} is deprecated, use model.{new} ({_WHY[new]})", FutureWarning, stacklevel=3)


def upgrade_model_fields(fields: dict[str, Any]) -> dict[str, Any]:
  """A `model` section with deprecated field names replaced by the current ones (warning for each)."""
  out = dict(fields)
  for old, new in RENAMED_FIELDS.items():
    if old in out:
      warn_renamed(old)
      out[new] = out.pop(old)
  return out


NON_PARAMETER_FIELDS = ("norm_impl", "remat_policy", "dtype", "attention_impl")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder hyperparameters. `num_blocks` counts blocks; sub-layers L = 2 * num_blocks."""
  vocab_size: int
  block: str = "keel"
  num_blocks: int = 4
  d_model: int = 128
  num_heads: int = 4
  num_kv_heads: int = 2
  d_ff: int = 384
  max_seq_len: int = 256
  rope_theta: float = 10000.0
  tie_embeddings: bool = True
  keel_alpha: str = "L"  # 'L', 'sqrt_L', or a number such as '16' / '16.0'
  keel_first_layer: str = "v2"
  mix_ln_fraction: float = 0.25
  norm_eps: float = 1e-5
  norm_impl: str = "xla"
  attention_impl: str = "xla"
  init_std: float = 0.02
  scan_layers: bool = True
  remat_policy: str = "full"
  scan_groups: int = 0  # >0: nested scan, groups of num_blocks // scan_groups blocks (remat per group)
  dtype: str = "float32"  # compute dtype; params are always float32
  num_layers: dataclasses.InitVar[int | None] = None  # deprecated name of num_blocks


  def __post_init__(self, num_layers):
    if num_layers is not None:
      warn_renamed("num_layers")
      object.__setattr__(self, "num_blocks", num_layers)
    def need(ok: bool, field: str, allowed: str):
      if not ok:
        raise ConfigError(f"model.{field}", getattr(self, field), allowed)

    need(self.block in BLOCK_RULES, "block", f"one of {tuple(BLOCK_RULES)}")
    for f in ("num_blocks", "d_model", "num_heads", "num_kv_heads", "d_ff", "vocab_size", "max_seq_len"):
      need(isinstance(getattr(self, f), int) and getattr(self, f) > 0, f, "a positive integer")
    need(self.d_model % self.num_heads == 0, "d_model",
         f"a multiple of model.num_heads={self.num_heads}")
    need(self.num_heads % self.num_kv_heads == 0, "num_heads",
         f"a multiple of model.num_kv_heads={self.num_kv_heads} (grouped-query attention)")
    need(self.head_dim % 2 == 0, "d_model",
         f"d_model / num_heads even for rotary embeddings (head dim is {self.head_dim})")
    need(self.remat_policy in REMAT_POLICIES, "remat_policy", f"one of {REMAT_POLICIES}")
    need(self.norm_impl in NORM_IMPLS, "norm_impl", f"one of {NORM_IMPLS}")
    need(self.attention_impl in ATTENTION_IMPLS, "attention_impl", f"one of {ATTENTION_IMPLS}")
    need(self.dtype in DTYPES, "dtype", f"one of {DTYPES}")
    need(self.keel_first_layer in KEEL_FIRST_LAYER_RULES, "keel_first_layer",
         f"one of {KEEL_FIRST_LAYER_RULES}")
    need(0.0 <= self.mix_ln_fraction <= 1.0, "mix_ln_fraction", "a number in [0, 1]")
    need(self.norm_eps > 0, "norm_eps", "a positive number")
    need(self.rope_theta > 0, "rope_theta", "a positive number")
    need(self.scan_groups >= 0 and (self.scan_groups == 0 or self.num_blocks % self.scan_groups == 0),
         "scan_groups", f"0 (flat scan) or a divisor of model.num_blocks={self.num_blocks}")
    need(self.scan_groups == 0 or self.scan_layers, "scan_groups", "0 when model.scan_layers=False")
    self.alpha  # parses keel_alpha and raises if it is not understood

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def num_sublayers(self) -> int:
    """L in the paper: every block has an attention and an FFN sub-layer."""
    return 2 * self.num_blocks

  @property
  def alpha(self) -> float:
    """Keel's shortcut scale for `keel_alpha` ('L', 'sqrt_L' or a number), with L = sub-layers."""
    rule, L = str(self.keel_alpha).strip(), self.num_sublayers
    if rule == "L":
      return float(L)
    if rule == "sqrt_L":
      return math.sqrt(L)
    try:
      value = float(rule)
    except ValueError:
      value = float("nan")
    if not math.isfinite(value) or value <= 0:
      raise ConfigError("model.keel_alpha", self.keel_alpha, "'L', 'sqrt_L' or a positive number")
    return value

  @property
  def compute_dtype(self):
    import jax.numpy as jnp
    return jnp.bfloat16 if self.dtype == "bfloat16" else jnp.float32

  @classmethod
  def from_config(cls, model_cfg: Any, vocab_size: int, max_seq_len: int) -> "ModelConfig":
    """Builds from an ml_collections `cfg.model`; unknown fields there are an error."""
    fields = set(model_defaults())
    given = upgrade_model_fields(dict(model_cfg))
    unknown = sorted(set(given) - fields)
    if unknown:
      raise ConfigError(f"model.{unknown[0]}", given[unknown[0]], f"a known field: {sorted(fields)}")
    return cls(vocab_size=vocab_size, max_seq_len=max_seq_len, **given)


def model_defaults() -> dict[str, Any]:
  """The `model` section of a config: every ModelConfig field but the two the data decides
  (vocab_size from the tokenizer, max_seq_len = data.seq_len), with its default."""
  return {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name not in ("vocab_size", "max_seq_len")}
