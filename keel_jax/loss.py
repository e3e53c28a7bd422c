"""The training objective on a batch: next-token cross-entropy, optionally over sequence chunks, plus z-loss.

    loss, aux = lm_objective(model, params, batch, LossOptions(chunk=512, z_loss=1e-4))

`batch` holds `tokens` [B, T+1] and, for packed documents (data.document_mask), `segment_ids`
[B, T+1]; inputs are [:, :-1], targets [:, 1:]. aux = {'ce': mean cross-entropy in nats,
'z': mean log(Z)^2}, loss = ce + z_loss * z (z-loss: PaLM, Chowdhery et al. 2022, section 5).

Chunked (`chunk` > 0): the model returns its top hidden state and the output projection, softmax
and loss run over `chunk` sequence positions at a time inside a rematerialised `lax.scan`, so the
float32 logits live as [B, chunk, V] (forward and backward) instead of [B, T, V]. The result equals
the unchunked loss (the mean of equal-sized chunk means).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from keel_jax.errors import ConfigError
from keel_jax.model import Decoder, cross_entropy_loss


@dataclasses.dataclass(frozen=True)
class LossOptions:
  chunk: int = 0  # train.loss_chunk: sequence positions per chunk (0: the whole sequence at once)
  z_loss: float = 0.0  # train.z_loss: weight of mean log(Z)^2
  document_positions: bool = False  # data.document_positions: RoPE positions restart per document

  @classmethod
  def from_config(cls, cfg) -> "LossOptions":
    return cls(chunk=cfg.train.get("loss_chunk", 0), z_loss=cfg.train.get("z_loss", 0.0),
               document_positions=cfg.data.get("document_positions", False))


def document_positions(segment_ids_BxT: jax.Array) -> jax.Array:
  """int32 [B, T]: each token's offset from the start of its document (a run of equal segment ids)."""
  B, T = segment_ids_BxT.shape
  index_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))
  starts_BxT = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1)
  start_index_BxT = jax.lax.cummax(jnp.where(starts_BxT, index_BxT, 0), axis=1)
  return index_BxT - start_index_BxT


def _log_z_squared(logits_BxTxV: jax.Array) -> jax.Array:
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits_BxTxV.astype(jnp.float32), axis=-1)))


def output_logits(model: Decoder, params, h_BxCxD: jax.Array) -> jax.Array:
  """The decoder's output projection of hidden states -> float32 logits [B, C, V] (tied: the
  embedding table, as `nn.Embed.attend`; untied: the lm_head kernel), in the compute dtype."""
  dt = model.cfg.compute_dtype
  if model.cfg.tie_embeddings:
    w_VxD = params["embed"]["embedding"]
    logits = jnp.einsum("bcd,vd->bcv", h_BxCxD.astype(dt), w_VxD.astype(dt))
  else:
    logits = jnp.einsum("bcd,dv->bcv", h_BxCxD.astype(dt), params["lm_head"]["kernel"].astype(dt))
  return logits.astype(jnp.float32)


def chunked_cross_entropy(model: Decoder, params, h_BxTxD, targets_BxT, chunk: int, with_z: bool):
  """(mean cross-entropy, mean log(Z)^2 or 0) over T in chunks of `chunk` positions; each chunk's
  logits are recomputed in the backward pass instead of saved."""
  B, T, D = h_BxTxD.shape
  if T % chunk:
    raise ConfigError("train.loss_chunk", chunk, f"a divisor of the sequence length {T} (or 0: no chunks)")
  n = T // chunk
  h_NxBxCxD = jnp.swapaxes(h_BxTxD.reshape(B, n, chunk, D), 0, 1)
  t_NxBxC = jnp.swapaxes(targets_BxT.reshape(B, n, chunk), 0, 1)

  @jax.checkpoint
  def one(h_BxCxD, t_BxC):
    logits_BxCxV = output_logits(model, params, h_BxCxD)
    z = _log_z_squared(logits_BxCxV) if with_z else jnp.zeros((), jnp.float32)
    return cross_entropy_loss(logits_BxCxV, t_BxC), z

  def body(carry, xs):
    ce, z = one(*xs)
    return (carry[0] + ce, carry[1] + z), None

  zero = jnp.zeros((), jnp.float32)
  (ce_sum, z_sum), _ = jax.lax.scan(body, (zero, zero), (h_NxBxCxD, t_NxBxC))
  return ce_sum / n, z_sum / n


def lm_objective(model: Decoder, params, batch: dict, opts: LossOptions = LossOptions()):
  """(loss, {'ce', 'z'}) on a batch of seq_len + 1 tokens (see the module docstring)."""
  tokens_BxT1 = batch["tokens"]
  inputs_BxT, targets_BxT = tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]
  segments_BxT = batch["segment_ids"][:, :-1] if "segment_ids" in batch else None
  positions_BxT = None
  if opts.document_positions and segments_BxT is not None:
    positions_BxT = document_positions(segments_BxT)
  with_z = opts.z_loss > 0
  run = lambda **kw: model.apply({"params": params}, inputs_BxT, positions_BxT, segment_ids_BxT=segments_BxT, **kw)
  if opts.chunk and opts.chunk < inputs_BxT.shape[1]:
    ce, z = chunked_cross_entropy(model, params, run(return_hidden=True), targets_BxT, opts.chunk, with_z)
  else:
    logits_BxTxV = run()
    ce = cross_entropy_loss(logits_BxTxV, targets_BxT)
    z = _log_z_squared(logits_BxTxV) if with_z else jnp.zeros((), jnp.float32)
  return ce + opts.z_loss * z, {"ce": ce, "z": z}
