"""Causal grouped-query attention with rotary position embeddings and an optional KV cache.

Shapes: B batch, T query length, S key length, D model width, H query heads, K key/value heads,
G = H // K query heads per KV head, Dh head dim.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from keel_jax import attention_impls
from keel_jax.model_config import ModelConfig


def rope(x_BxTxNxDh: jax.Array, positions_BxT: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding (rotate-half form): pairs (i, i + Dh/2) rotate by position * theta^(-2i/Dh)."""
  half = x_BxTxNxDh.shape[-1] // 2
  inv_freq_F = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BxTx1xF = positions_BxT.astype(jnp.float32)[:, :, None, None] * inv_freq_F[None, None, None, :]
  sin, cos = jnp.sin(angle_BxTx1xF), jnp.cos(angle_BxTx1xF)
  x = x_BxTxNxDh.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxDh.dtype)


class Dense(nn.Module):
  """x[..., *in] @ W[*in, *out] with W ~ N(0, std^2), float32, logically named, no bias.

  (flax's DenseGeneral initialises a flattened kernel, which clashes with multi-axis logical names.)
  """
  features: tuple[int, ...]
  axes: tuple[str, ...]
  std: float
  dtype: Any
  in_dims: int = 1

  @nn.compact
  def __call__(self, x):
    shape = x.shape[x.ndim - self.in_dims:] + self.features
    init = nn.with_logical_partitioning(nn.initializers.normal(self.std), self.axes)
    kernel = self.param("kernel", init, shape, jnp.float32)
    return jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=self.in_dims)


def dense(features, axes, init_std, dtype, name, in_axis=-1):
  features = (features,) if isinstance(features, int) else tuple(features)
  in_dims = len(in_axis) if isinstance(in_axis, tuple) else 1
  return Dense(features, tuple(axes), init_std, dtype, in_dims, name=name)


class Attention(nn.Module):
  """F_attn: x_BxTxD -> BxTxD. `vo_init_scale` scales V/O init (DeepNorm's beta).

  A query at position q attends to the keys at positions q - max_seq_len < k <= q: causal, within
  a sliding window as wide as the training context (which any training window fits, so training is
  plain causal attention). A negative position marks padding (e.g. left-padded prompts,
  keel_jax/generate.py): such keys are never attended.

  With `decode=True` the keys, values and positions go to a 'cache' collection of max_seq_len slots
  used as a ring buffer: token i of the running index is written at slot i % max_seq_len, so the
  cache always holds the last max_seq_len tokens, exactly the window, and generation can go on past
  the training context. Prefill and one-token steps share this path; empty slots hold position -1.
  """
  cfg: ModelConfig
  vo_init_scale: float = 1.0
  decode: bool = False

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array, segments_BxT=None) -> jax.Array:
    c, dt = self.cfg, self.cfg.compute_dtype
    H, K, Dh = c.num_heads, c.num_kv_heads, c.head_dim
    B, T, _ = x_BxTxD.shape
    q = dense((H, Dh), ("embed", "heads", "kv"), c.init_std, dt, "q")(x_BxTxD)
    k = dense((K, Dh), ("embed", "kv_heads", "kv"), c.init_std, dt, "k")(x_BxTxD)
    v = dense((K, Dh), ("embed", "kv_heads", "kv"), c.init_std * self.vo_init_scale, dt, "v")(x_BxTxD)
    q_BxTxHxDh = rope(q, positions_BxT, c.rope_theta)
    k_BxSxKxDh = rope(k, positions_BxT, c.rope_theta)
    v_BxSxKxDh = v
    q_pos_BxT, k_pos_BxS = positions_BxT, positions_BxT

    if self.decode:
      S = c.max_seq_len
      ck = self.variable("cache", "key", jnp.zeros, (B, S, K, Dh), dt)
      cv = self.variable("cache", "value", jnp.zeros, (B, S, K, Dh), dt)
      cpos = self.variable("cache", "positions", lambda: jnp.full((B, S), -1, jnp.int32))
      idx = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
      if not self.is_initializing():
        slots_T = (idx.value + jnp.arange(T)) % S  # T <= S: a prompt is at most one window
        ck.value = ck.value.at[:, slots_T].set(k_BxSxKxDh.astype(dt))
        cv.value = cv.value.at[:, slots_T].set(v_BxSxKxDh.astype(dt))
        cpos.value = cpos.value.at[:, slots_T].set(positions_BxT.astype(jnp.int32))
        idx.value = idx.value + T
      # Slots are not positions: a left-padded row's tokens sit at later slots than their positions.
      k_BxSxKxDh, v_BxSxKxDh, k_pos_BxS = ck.value, cv.value, cpos.value

    sow = None  # attention probabilities, kept only when 'intermediates' is mutable (notebooks)
    if self.is_mutable_collection("intermediates"):
      sow = lambda probs: self.sow("intermediates", "attention_probs", probs)
    impl = c.attention_impl if c.attention_impl != "auto" else attention_impls.resolve(
        "auto", attention_impls.target_platform(), T)
    if self.is_initializing():  # init runs a short dummy sequence; the parameters do not depend on impl
      impl = "xla"
    if self.decode:
      out_BxTxHxDh = attention_impls.attend_cached(impl, q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, q_pos_BxT,
                                                   k_pos_BxS, sow, window=c.max_seq_len)
    else:
      out_BxTxHxDh = attention_impls.attend(impl, q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, positions_BxT,
                                            segments_BxT, sow, window=c.max_seq_len)
    return dense(c.d_model, ("heads", "kv", "embed"), c.init_std * self.vo_init_scale, dt, "o",
                 in_axis=(-2, -1))(out_BxTxHxDh)


class SwiGLU(nn.Module):
  """F_ffn: x_BxTxD -> BxTxD, down(silu(gate(x)) * up(x)). `init_scale` is DeepNorm's beta."""
  cfg: ModelConfig
  init_scale: float = 1.0

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    c, dt = self.cfg, self.cfg.compute_dtype
    std = c.init_std * self.init_scale
    gate_BxTxF = dense(c.d_ff, ("embed", "mlp"), std, dt, "gate")(x_BxTxD)
    up_BxTxF = dense(c.d_ff, ("embed", "mlp"), std, dt, "up")(x_BxTxD)
    h_BxTxF = nn.with_logical_constraint(nn.silu(gate_BxTxF) * up_BxTxF, ("batch", "length", "mlp"))
    return dense(c.d_model, ("mlp", "embed"), std, dt, "down")(h_BxTxF)
