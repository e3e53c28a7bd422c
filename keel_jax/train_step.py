"""The train state and the compiled functions of a run: the train step, the eval step, state creation.

Kept apart from the training loop (keel_jax/train.py) so that ahead-of-time compilation
(keel_jax/aot.py), benchmarks and notebooks build exactly the step that training runs.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from keel_jax import sharding
from keel_jax.diagnostics import sublayer_branch_ratios, sublayer_norms
from keel_jax.loss import LossOptions, lm_objective
from keel_jax.model import Decoder, init_params, strip_boxes


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimiser steps taken
  params: Any
  opt_state: Any
  skipped: jax.Array  # int32 scalar: non-finite updates skipped so far


# ---- the step ------------------------------------------------------------------------------------

def loss_and_grads(model: Decoder, params, batch, loss_options: LossOptions = LossOptions(),
                   grad_accum_steps: int = 1):
  """(loss, aux, grads) of the batch's mean loss. With grad_accum_steps = k > 1 the batch runs as k
  microbatches of B/k rows under `lax.scan`, their losses and float32 gradients summed and divided
  by k: the same values as the whole batch at once (equal-sized microbatches), with the activations
  of one microbatch live at a time. Microbatch i holds rows i, i+k, i+2k, ...: every device keeps
  its own rows (the batch is sharded in contiguous row blocks), so no row moves between devices."""
  grad_fn = jax.value_and_grad(lambda p, b: lm_objective(model, p, b, loss_options), has_aux=True)
  k = grad_accum_steps
  if k == 1:
    (loss, aux), grads = grad_fn(params, batch)
    return loss, aux, grads

  def split(a_BxN):  # [B, ...] -> [k, B/k, ...], microbatch i = rows i::k
    micro = jnp.swapaxes(a_BxN.reshape(a_BxN.shape[0] // k, k, *a_BxN.shape[1:]), 0, 1)
    return nn.with_logical_constraint(micro, (None, "batch") + (None,) * (micro.ndim - 2))

  def body(acc, microbatch):
    (loss, aux), grads = grad_fn(params, microbatch)
    step = (loss, aux, jax.tree.map(lambda g: g.astype(jnp.float32), grads))
    return jax.tree.map(jnp.add, acc, step), None

  zero = jnp.zeros((), jnp.float32)
  zeros = (zero, {"ce": zero, "z": zero}, jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
  total, _ = jax.lax.scan(body, zeros, jax.tree.map(split, batch))
  loss, aux, grads = jax.tree.map(lambda a: a / k, total)
  return loss, aux, jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)


def make_train_step(model: Decoder, tx: optax.GradientTransformation, schedule, telemetry: bool = False, loss_options: LossOptions = LossOptions(), grad_accum_steps: int = 1):
  """(state, batch) -> (state, metrics). A non-finite loss or gradient leaves the state unchanged.
  `loss_options`, `grad_accum_steps`: see `loss_and_grads`. metrics['loss'] is the cross-entropy
  (comparable with eval_loss); with a z-loss, metrics['z_loss'] is its mean log(Z)^2.

  `telemetry=True` adds per-sub-layer `update_param_ratio` (||update_l|| / ||params_l|| before the
  update) and `branch_ratio` (RMS(F_l) / RMS(alpha x_l), from one extra forward pass on the batch)
  to the metrics, each [L]; the trainer runs this variant every train.telemetry_every steps.
  """

  def train_step(state: TrainState, batch):
    objective, aux, grads = loss_and_grads(model, state.params, batch, loss_options, grad_accum_steps)
    loss = aux["ce"]
    leaf_finite = jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
    finite = jnp.isfinite(objective) & jnp.all(leaf_finite)

    # lax.cond rather than jnp.where(finite, new, old): only the taken branch runs, so the update can
    # write the donated state in place instead of holding old and new state at once (the where form
    # made donation save ~2% of the step's peak memory; docs/PERFORMANCE.md).
    def apply(params, opt_state):
      updates, opt_state = tx.update(grads, opt_state, params)
      ratio = sublayer_norms(updates, model.cfg) / sublayer_norms(params, model.cfg) if telemetry else None
      params = optax.apply_updates(params, updates)
      return params, opt_state, optax.tree.norm(updates), optax.tree.norm(params), ratio

    def skip(params, opt_state):  # norms NaN, as the discarded update's would be
      nan = jnp.full((), jnp.nan, jnp.float32)
      return params, opt_state, nan, nan, jnp.full((model.cfg.num_sublayers,), jnp.nan) if telemetry else None

    params, opt_state, update_norm, param_norm, update_ratio = jax.lax.cond(
        finite, apply, skip, state.params, state.opt_state)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           skipped=state.skipped + (~finite).astype(jnp.int32))
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step),
               "update_norm": update_norm, "param_norm": param_norm,
               "finite": finite, "leaf_finite": leaf_finite, "skipped": new_state.skipped,
               "sublayer_grad_norm": sublayer_norms(grads, model.cfg)}
    if telemetry:
      metrics["update_param_ratio"] = update_ratio
      metrics["branch_ratio"] = sublayer_branch_ratios(model, state.params, batch["tokens"][:, :-1])
    if loss_options.z_loss > 0:
      metrics["z_loss"] = aux["z"]
    return new_state, metrics

  return train_step


def make_eval_step(model: Decoder, loss_options: LossOptions = LossOptions()):
  """(params, batch) -> mean cross-entropy (no z-loss), with the training run's chunking and documents."""
  opts = dataclasses.replace(loss_options, z_loss=0.0)
  return lambda params, batch: lm_objective(model, params, batch, opts)[1]["ce"]


def init_state(model: Decoder, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  """Step 0: fresh params from `rng`, the optimiser's initial state, no skipped steps."""
  params = strip_boxes(init_params(model, rng))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    skipped=jnp.zeros((), jnp.int32))


def create_state(model, tx, mesh, rng):
  """The train state, created directly sharded: abstract shapes, then a jitted init with out_shardings.

  Makes no concrete array (`rng` may be a ShapeDtypeStruct), so it also works under `jax.set_mesh`
  of devices this host cannot hold arrays on (keel_jax.aot)."""
  abstract_boxed = jax.eval_shape(lambda r: init_params(model, r), rng)
  sharding.check_divisible(abstract_boxed, mesh)
  p_shard = sharding.param_shardings(abstract_boxed, mesh)
  abstract_params = strip_boxes(abstract_boxed)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shardings = TrainState(step=replicated, params=p_shard,
                         opt_state=sharding.opt_state_shardings(tx, abstract_params, p_shard, mesh),
                         skipped=replicated)

  init = jax.jit(lambda r: init_state(model, tx, r), out_shardings=shardings)
  return init, shardings, abstract_boxed
