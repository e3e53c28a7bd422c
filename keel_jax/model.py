"""The decoder: embedding -> stack of blocks (scanned over depth) -> [final norm] -> LM head.

Parameters live under 'params' as float32 with logical axis names (`nn.Partitioned` boxes); the
scanned stack adds a leading 'layers' axis of length num_blocks (or ['layer_groups', 'layers'] with
the nested scan). `Decoder.apply` returns float32 logits [B, T, V].
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from keel_jax.attention import dense
from keel_jax.block_rules import BLOCK_RULES, sublayer_schedule
from keel_jax.blocks import Block
from keel_jax.model_config import ModelConfig
from keel_jax.norms import RMSNorm
from keel_jax.sharding import strip_boxes

REMAT_POLICIES = {
    "full": None,  # save only block inputs, recompute everything else
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# Collections with one entry per layer: scanned along the layer axis like the params.
_PER_LAYER = {"params": 0, "cache": 0, "intermediates": 0}


def _maybe_remat(module_cls, policy: str):
  if policy == "none":
    return module_cls
  # prevent_cse=False: inside scan, CSE is already prevented and the barrier would cost speed.
  return nn.remat(module_cls, prevent_cse=False, policy=REMAT_POLICIES[policy])


def _scan(module_cls, length: int, axis_name: str):
  return nn.scan(module_cls, variable_axes=_PER_LAYER, split_rngs={"params": True},
                 in_axes=(0, nn.broadcast, nn.broadcast), length=length,
                 metadata_params={nn.PARTITION_NAME: axis_name})


class BlockGroup(nn.Module):
  """Inner level of the nested scan: a scan over a group of blocks."""
  cfg: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x_BxTxD, consts_Gx2, positions_BxT, segments_BxT):
    n = self.cfg.num_blocks // self.cfg.scan_groups
    stack = _scan(_maybe_remat(Block, self.cfg.remat_policy), n, "layers")
    x_BxTxD, _ = stack(self.cfg, self.decode, name="blocks")(x_BxTxD, consts_Gx2, positions_BxT, segments_BxT)
    return x_BxTxD, None


class Decoder(nn.Module):
  """Decoder-only LM. tokens_BxT int -> logits_BxTxV float32."""
  cfg: ModelConfig
  decode: bool = False

  def layer_constants(self, sublayer_keep=None) -> dict[str, jax.Array]:
    """Per-sub-layer constants [num_blocks, 2], plus `keep` (1 = apply, 0 = skip the sub-layer)."""
    consts = {k: jnp.asarray(v) for k, v in sublayer_schedule(self.cfg).items()}
    keep = jnp.ones((self.cfg.num_blocks, 2), jnp.float32)
    if sublayer_keep is not None:  # [L] in sub-layer order: attn_0, ffn_0, attn_1, ...
      keep = jnp.asarray(sublayer_keep, jnp.float32).reshape(self.cfg.num_blocks, 2)
    return {**consts, "keep": keep}

  @nn.compact
  def __call__(self, tokens_BxT, positions_BxT=None, sublayer_keep=None, segment_ids_BxT=None,
               return_hidden=False):
    """segment_ids_BxT: document ids of packed rows (attention never crosses a document), or None.
    return_hidden: the top hidden state h_BxTxD (compute dtype) instead of the logits, for
    `keel_jax.loss.chunked_cross_entropy`, which applies the output projection a chunk at a time."""
    c = self.cfg
    B, T = tokens_BxT.shape
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))
    embed = nn.Embed(c.vocab_size, c.d_model, dtype=c.compute_dtype, param_dtype=jnp.float32,
                     embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(c.init_std), ("vocab", "embed")), name="embed")
    # The residual stream is float32 for every block type; branches compute in cfg.dtype.
    x_BxTxD = embed(tokens_BxT).astype(jnp.float32)
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("batch", "length", "embed"))
    consts = self.layer_constants(sublayer_keep)

    if not c.scan_layers:  # plain Python loop: for debugging and comparison (compile grows with depth)
      block_cls = _maybe_remat(Block, c.remat_policy)
      for i in range(c.num_blocks):
        layer_consts = jax.tree.map(lambda a: a[i], consts)
        x_BxTxD, _ = block_cls(c, self.decode, name=f"layers_{i}")(x_BxTxD, layer_consts, positions_BxT, segment_ids_BxT)
    elif c.scan_groups:  # nested scan: remat per group keeps ~sqrt(L) stream copies
      G = c.scan_groups
      grouped = jax.tree.map(lambda a: a.reshape(G, c.num_blocks // G, 2), consts)
      stack = _scan(_maybe_remat(BlockGroup, "full"), G, "layer_groups")
      x_BxTxD, _ = stack(c, self.decode, name="layers")(x_BxTxD, grouped, positions_BxT, segment_ids_BxT)
    else:
      stack = _scan(_maybe_remat(Block, c.remat_policy), c.num_blocks, "layers")
      x_BxTxD, _ = stack(c, self.decode, name="layers")(x_BxTxD, consts, positions_BxT, segment_ids_BxT)

    if BLOCK_RULES[c.block].final_norm:
      x_BxTxD = RMSNorm(c.norm_eps, c.norm_impl, name="final_norm")(x_BxTxD)
    h_BxTxD = x_BxTxD.astype(c.compute_dtype)
    if return_hidden:
      return h_BxTxD
    if c.tie_embeddings:
      logits_BxTxV = embed.attend(h_BxTxD)
    else:
      logits_BxTxV = dense(c.vocab_size, ("embed", "vocab"), c.init_std, c.compute_dtype, "lm_head")(h_BxTxD)
    return logits_BxTxV.astype(jnp.float32)


def init_params(model: Decoder, rng: jax.Array, batch_size: int = 1, seq_len: int | None = None):
  """Boxed (nn.Partitioned) float32 params for `model`."""
  T = seq_len or min(model.cfg.max_seq_len, 8)
  return model.init(rng, jnp.zeros((batch_size, T), jnp.int32))["params"]


def cross_entropy_loss(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy in nats (float32)."""
  logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, targets_BxT[..., None], axis=-1))


def lm_loss(model: Decoder, params, tokens_BxT1: jax.Array, **apply_kwargs) -> jax.Array:
  """Loss on a packed batch of seq_len + 1 tokens: inputs [:, :-1], targets [:, 1:]."""
  logits = model.apply({"params": params}, tokens_BxT1[:, :-1], **apply_kwargs)
  return cross_entropy_loss(logits, tokens_BxT1[:, 1:])


# ---- parameter layout helpers -------------------------------------------------------------------

def layer_stack(params, cfg: ModelConfig):
  """The per-block params as one tree with a leading [num_blocks] axis, whatever the layout."""
  params = strip_boxes(params)
  if not cfg.scan_layers:
    blocks = [params[f"layers_{i}"] for i in range(cfg.num_blocks)]
    return jax.tree.map(lambda *a: jnp.stack(a), *blocks)
  stack = params["layers"]
  if cfg.scan_groups:
    stack = stack["blocks"]
    return jax.tree.map(lambda a: a.reshape((cfg.num_blocks,) + a.shape[2:]), stack)
  return stack


def unstack_layers(params, cfg: ModelConfig):
  """Scanned-layout params -> loop-layout params (layers_0, layers_1, ...): for scan == loop tests."""
  params = dict(strip_boxes(params))
  stack = layer_stack(params, cfg)
  del params["layers"]
  for i in range(cfg.num_blocks):
    params[f"layers_{i}"] = jax.tree.map(lambda a: a[i], stack)
  return params


def param_table(params) -> str:
  """A per-module parameter-count table (module path up to the sub-layer), with the total."""
  rows: dict[str, int] = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(strip_boxes(params)):
    keys = [getattr(k, "key", str(k)) for k in path]
    name = "/".join(keys[:-1][:4])
    rows[name] = rows.get(name, 0) + int(np.prod(leaf.shape))
  total = sum(rows.values())
  width = max(len(k) for k in rows) + 2
  lines = [f"{'module':<{width}}{'params':>14}{'share':>8}"]
  lines += [f"{k:<{width}}{v:>14,}{v / total:>8.1%}" for k, v in rows.items()]
  lines.append(f"{'total':<{width}}{total:>14,}")
  return "\n".join(lines)
