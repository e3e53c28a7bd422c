"""softmax(q k^T / sqrt(Dh) + mask) v, four ways (`model.attention_impl`), and which one a backend gets.

    xla          einsums with float32 logits [B, K, G, T, S] materialised (in query blocks of
                 XLA_QUERY_BLOCK above that length): the reference
    dot_product  jax.nn.dot_product_attention (implementation=None: cuDNN flash attention on NVIDIA
                 GPUs where it applies, XLA elsewhere)
    splash       the Pallas TPU splash-attention kernels (keel_jax/kernels/splash.py), blockwise:
                 no [T, S] array is ever live; interpreted (slowly) on CPU for tests
    auto         `AUTO_CHOICE[platform]`, falling back (one logged line) when that one cannot run

Shapes: B batch, T queries, S keys, H query heads, K key/value heads, G = H // K, Dh head dim.
The mask is always causal and never lets a query see a key of position < 0 (padding); with
segment ids (packed documents) a query sees only keys of its own segment. Training (`attend`) is
causal by index, so rotary positions may restart per document; the KV-cache decode path
(`attend_cached`) is causal by token position, as its cache slots are not in position order for
left-padded rows.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from keel_jax.errors import ConfigError
from keel_jax.kernels.rmsnorm import target_platform  # the mesh's platform, else the default backend
from keel_jax.model_config import ATTENTION_IMPLS as IMPLS

# What each platform can run. Splash is a TPU kernel; on CPU it runs in Pallas interpret mode
# (correct but slow: tests only), a GPU has no lowering for it.
AVAILABLE = {"cpu": ("xla", "dot_product", "splash"), "tpu": ("xla", "dot_product", "splash"),
             "gpu": ("xla", "dot_product"), "cuda": ("xla", "dot_product"), "rocm": ("xla", "dot_product")}
# 'auto', per platform. tpu: splash, the only one whose memory does not grow with T^2 (keel_jax.aot,
# docs/PERFORMANCE.md). gpu: dot_product, which is cuDNN's flash attention there (not measured: no GPU
# was lent). cpu: xla, the reference (benchmarks/attention_impls.py compares it with dot_product).
AUTO_CHOICE = {"cpu": "xla", "tpu": "splash", "gpu": "dot_product", "cuda": "dot_product",
               "rocm": "dot_product"}
XLA_QUERY_BLOCK = 1024  # xla_attention: queries per block above this length


def resolve(impl: str, platform: str, seq_len: int, log: Callable[[str], None] | None = None) -> str:
  """'xla' | 'dot_product' | 'splash' | 'auto' -> a concrete impl that runs on `platform` at
  `seq_len` query/key positions. An explicit impl that cannot: ConfigError naming what can; 'auto'
  falls back to 'xla' and says so in one `log` line."""
  if impl not in IMPLS:
    raise ConfigError("model.attention_impl", impl, f"one of {IMPLS}")
  available = AVAILABLE.get(platform, ("xla", "dot_product"))
  if impl != "auto":
    if impl not in available:
      raise ConfigError("model.attention_impl", impl, f"one of {available} on platform {platform!r} "
                        "(or 'auto')")
    if impl == "splash":
      from keel_jax.kernels import splash
      splash.block_size(seq_len)  # ConfigError naming seq_len and the block sizes
    return impl
  choice = AUTO_CHOICE.get(platform, "xla")
  if choice == "splash":
    from keel_jax.kernels import splash
    try:
      splash.block_size(seq_len)
    except ConfigError as e:
      if log is not None:
        log(f"attention_impl=auto: splash cannot run here ({e.allowed}); using xla")
      return "xla"
  return choice


def causal_mask(q_index_BxT, k_index_BxS, k_pos_BxS, segments=None, window: int = 0) -> jax.Array:
  """bool [B, T, S]: key index <= query index, key position >= 0, same segment if given, and (window
  > 0) query index - key index < window: the sliding window. `segments` = (q_segments_BxT, k_segments_BxS)."""
  offset_BxTxS = q_index_BxT[:, :, None] - k_index_BxS[:, None, :]
  visible = (offset_BxTxS >= 0) & (k_pos_BxS[:, None, :] >= 0)
  if window:
    visible &= offset_BxTxS < window
  if segments is not None:
    q_seg, k_seg = segments
    visible &= k_seg[:, None, :] == q_seg[:, :, None]
  return visible


def xla_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, visible_BxTxS, sow=None,
                  query_block: int | None = None) -> jax.Array:
  """The reference: float32 logits [B, K, G, T, S], masked softmax, in q's dtype. `sow(probs)` keeps
  the attention probabilities (notebooks).

  Above `query_block` queries (default XLA_QUERY_BLOCK; a divisor of T) the same einsums run one
  block of queries at a time under `lax.map`, each block rematerialised in the backward pass: the
  logits live as [B, K, G, block, S] instead of [B, K, G, T, S] (at T = 4096, 1/4), for one more
  attention forward in the backward pass.
  """
  B, T, H, Dh = q_BxTxHxDh.shape
  block = XLA_QUERY_BLOCK if query_block is None else query_block
  if sow is None and T > block and T % block == 0:
    n = T // block
    q_NxBxCxHxDh = jnp.swapaxes(q_BxTxHxDh.reshape(B, n, block, H, Dh), 0, 1)
    visible_NxBxCxS = jnp.swapaxes(visible_BxTxS.reshape(B, n, block, -1), 0, 1)
    one = jax.checkpoint(lambda qv: xla_attention(qv[0], k_BxSxKxDh, v_BxSxKxDh, qv[1], query_block=block))
    out_NxBxCxHxDh = jax.lax.map(one, (q_NxBxCxHxDh, visible_NxBxCxS))
    return jnp.swapaxes(out_NxBxCxHxDh, 0, 1).reshape(B, T, H, Dh)
  K = k_BxSxKxDh.shape[2]
  q_BxTxKxGxDh = q_BxTxHxDh.reshape(B, T, K, H // K, Dh)
  logits_BxKxGxTxS = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxDh, k_BxSxKxDh,
                                preferred_element_type=jnp.float32) / jnp.sqrt(Dh).astype(jnp.float32)
  logits_BxKxGxTxS = jnp.where(visible_BxTxS[:, None, None], logits_BxKxGxTxS, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits_BxKxGxTxS, axis=-1).astype(q_BxTxHxDh.dtype)
  if sow is not None:
    sow(probs)
  out_BxTxKxGxDh = jnp.einsum("bkgts,bskd->btkgd", probs, v_BxSxKxDh.astype(q_BxTxHxDh.dtype))
  return out_BxTxKxGxDh.reshape(B, T, H, Dh)


def dot_product_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, visible_BxTxS=None) -> jax.Array:
  """jax.nn.dot_product_attention (GQA native). visible=None: plain causal (is_causal, the form
  cuDNN's fused kernel takes without a mask array)."""
  dt = q_BxTxHxDh.dtype
  k, v = k_BxSxKxDh.astype(dt), v_BxSxKxDh.astype(dt)
  if visible_BxTxS is None:
    return jax.nn.dot_product_attention(q_BxTxHxDh, k, v, is_causal=True)
  return jax.nn.dot_product_attention(q_BxTxHxDh, k, v, mask=visible_BxTxS[:, None])


def attend(impl: str, q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, positions_BxT, segments_BxT=None,
           sow=None, window: int = 0) -> jax.Array:
  """Training / full-sequence attention (S = T, causal by index) with `impl` (resolved, not 'auto').
  `segments_BxT`: document ids of packed sequences (None: one document per row). `window` > 0: each
  query sees only the last `window` keys (a no-op for sequences no longer than it; splash ignores it)."""
  if impl == "splash":
    from keel_jax.kernels import splash
    return splash.splash_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, segments_BxT,
                                   interpret=target_platform() != "tpu")
  B, T = positions_BxT.shape
  index_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))
  segments = None if segments_BxT is None else (segments_BxT, segments_BxT)
  if impl == "dot_product":
    plain = segments is None and not (window and T > window)  # training positions are never negative
    visible = None if plain else causal_mask(index_BxT, index_BxT, positions_BxT, segments, window)
    return dot_product_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, visible)
  if impl != "xla":
    raise ConfigError("model.attention_impl", impl, "a resolved impl: one of ('xla', 'dot_product', 'splash')")
  visible = causal_mask(index_BxT, index_BxT, positions_BxT, segments, window)
  return xla_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, visible, sow)


def attend_cached(impl: str, q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, q_pos_BxT, k_pos_BxS, sow=None,
                  window: int = 0) -> jax.Array:
  """KV-cache decode: T new queries against S cache slots, causal by position within `window`
  (splash, a training kernel, decodes with xla)."""
  visible = causal_mask(q_pos_BxT, k_pos_BxS, k_pos_BxS, window=window)
  if impl == "dot_product":
    return dot_product_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, visible)
  return xla_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, visible, sow)
