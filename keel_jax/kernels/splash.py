"""Causal grouped-query attention with JAX's Pallas TPU splash-attention kernels, inside `jax.shard_map`.

Splash attention (jax.experimental.pallas.ops.tpu.splash_attention) walks [block_q, block_kv]
tiles of the causal mask, skips the tiles above the diagonal and keeps only a running max and sum
per query: neither the forward nor the backward materialises [T, S]. It takes one sequence at a
time (q [H, T, Dh], k/v [K, S, Dh], GQA when K < H), so the batch is vmapped; packed documents
enter as segment ids (a query sees keys of its own segment only).

Sharding: a compiled Pallas kernel is opaque to XLA's partitioner, so under a mesh the call runs
inside `jax.shard_map`: batch rows over the batch axes, heads over `tensor` (each device runs the
kernel on its rows and heads; nothing crosses devices). On CPU the kernels run in Pallas interpret
mode: correct, slow, for tests on small shapes.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from keel_jax.errors import ConfigError

BLOCK_SIZES = (512, 256, 128)  # tile edge tried first to last; the kernels need a multiple of 128


def block_size(seq_len: int) -> int:
  """The largest of BLOCK_SIZES dividing seq_len (block_q = block_kv = it); ConfigError if none does."""
  for b in BLOCK_SIZES:
    if seq_len % b == 0:
      return b
  raise ConfigError("data.seq_len", seq_len, f"a multiple of the splash-attention block size "
                    f"{BLOCK_SIZES[-1]} for model.attention_impl='splash' ({seq_len} % {BLOCK_SIZES[-1]} "
                    f"= {seq_len % BLOCK_SIZES[-1]})")


def _kernel(num_heads: int, seq_len: int, interpret: bool):
  """A fresh kernel per trace (its mask tables are arrays made in the current trace: cached, they leak)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  b = block_size(seq_len)
  sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                        block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  mask = sm.MultiHeadMask([sm.CausalMask((seq_len, seq_len)) for _ in range(num_heads)])
  return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret), sk


def _local(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, segments_BxT, interpret: bool):
  """One device's rows and heads. Scales q by 1/sqrt(Dh) (the kernel does not)."""
  B, T, H, Dh = q_BxTxHxDh.shape
  kernel, sk = _kernel(H, T, interpret)
  dt = q_BxTxHxDh.dtype
  q_BxHxTxDh = jnp.swapaxes(q_BxTxHxDh * jnp.asarray(Dh ** -0.5, dt), 1, 2)
  k_BxKxSxDh = jnp.swapaxes(k_BxSxKxDh.astype(dt), 1, 2)
  v_BxKxSxDh = jnp.swapaxes(v_BxSxKxDh.astype(dt), 1, 2)
  if segments_BxT is None:
    out_BxHxTxDh = jax.vmap(kernel)(q_BxHxTxDh, k_BxKxSxDh, v_BxKxSxDh)
  else:
    one = lambda q, k, v, s: kernel(q, k, v, segment_ids=sk.SegmentIds(q=s, kv=s))
    out_BxHxTxDh = jax.vmap(one)(q_BxHxTxDh, k_BxKxSxDh, v_BxKxSxDh, segments_BxT.astype(jnp.int32))
  return jnp.swapaxes(out_BxHxTxDh, 1, 2)


def splash_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, segments_BxT=None, *, interpret: bool) -> jax.Array:
  """Causal softmax(q k^T / sqrt(Dh)) v, [B, T, H, Dh] in q's dtype; S = T; K divides H.
  `interpret`: run the kernels in Pallas interpret mode (any backend) instead of compiling for TPU."""
  from keel_jax.sharding import BATCH_AXES
  block_size(q_BxTxHxDh.shape[1])
  fn = functools.partial(_local, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, segments_BxT)
  P = jax.sharding.PartitionSpec
  batch = tuple(a for a in BATCH_AXES if a in mesh.axis_names) or None
  heads = "tensor" if "tensor" in mesh.axis_names else None
  qkv = P(batch, None, heads, None)
  seg = P(batch, None)
  if segments_BxT is None:
    body = lambda q, k, v: fn(q, k, v, None)
    return jax.shard_map(body, mesh=mesh, in_specs=(qkv, qkv, qkv), out_specs=qkv, check_vma=False)(
        q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh)
  return jax.shard_map(fn, mesh=mesh, in_specs=(qkv, qkv, qkv, seg), out_specs=qkv, check_vma=False)(
      q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, segments_BxT)
