"""The train step: k microbatches give the loss and gradients of the whole batch; a run with
train.grad_accum_steps logs the losses of the run without; a non-finite gradient (injected from the
test by wrapping the objective; the library has no fault hook) leaves the state unchanged, is
counted, and names its leaf."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cli_utils import run_train
from keel_jax import config_lib, train_step
from keel_jax.errors import ConfigError
from keel_jax.loss import LossOptions, lm_objective
from keel_jax.metrics import read_records
from keel_jax.model import Decoder, init_params
from keel_jax.optimizer import lr_schedule, make_optimizer
from keel_jax.model_config import ModelConfig
from keel_jax.train import train
from keel_jax.train_step import loss_and_grads


def test_accumulated_microbatches_equal_the_whole_batch():
  cfg = ModelConfig(vocab_size=64, num_blocks=2, d_model=32, num_heads=4, num_kv_heads=2, d_ff=48, max_seq_len=12)
  model = Decoder(cfg)
  params = nn.meta.unbox(init_params(model, jax.random.key(0)))
  rs = np.random.RandomState(0)
  batch = {"tokens": rs.randint(0, 64, size=(8, 13)).astype(np.int32)}
  batch["segment_ids"] = np.cumsum(batch["tokens"] < 6, axis=1).astype(np.int32)  # some documents too
  opts = LossOptions(z_loss=1e-3, document_positions=True)
  whole = jax.jit(lambda p: loss_and_grads(model, p, batch, opts, 1))(params)
  accumulated = jax.jit(lambda p: loss_and_grads(model, p, batch, opts, 4))(params)
  chex.assert_trees_all_close(accumulated, whole, atol=1e-6, rtol=1e-5)


def test_batch_not_divisible_by_grad_accum_steps_names_the_numbers():
  cfg = config_lib.base_config()
  cfg.data.batch_size, cfg.train.grad_accum_steps = 12, 5
  with pytest.raises(ConfigError) as e:
    config_lib.validate(cfg)
  assert e.value.field == "train.grad_accum_steps" and "12" in str(e.value) and "5" in str(e.value)
  cfg.train.grad_accum_steps, cfg.train.loss_chunk = 4, 100
  with pytest.raises(ConfigError) as e:
    config_lib.validate(cfg)
  assert e.value.field == "train.loss_chunk" and "256" in str(e.value)


@pytest.mark.slow
def test_cli_run_with_grad_accum_logs_the_losses_of_the_run_without(tmp_path):
  args = "num_steps=6,log_every=1,eval_every=6,checkpoint_every=6"
  from test_train import tiny_config
  train(tiny_config(args), str(tmp_path / "plain"), log=lambda *_: None)
  run_train(tmp_path / "accum", f"--config.train.grad_accum_steps=4", "--config.train.num_steps=6",
            "--config.train.log_every=1", "--config.train.eval_every=6", "--config.train.checkpoint_every=6")
  losses = lambda w: [r["loss"] for r in read_records(w) if r["kind"] == "train"]
  a, b = losses(tmp_path / "plain"), losses(tmp_path / "accum")
  assert len(a) == len(b) == 6
  np.testing.assert_allclose(b, a, rtol=1e-5)


@jax.custom_vjp
def nan_gradient(x):
  return x


nan_gradient.defvjp(lambda x: (x, None), lambda _, g: (jnp.full_like(g, jnp.nan),))


def step_once(objective_fn, monkeypatch):
  monkeypatch.setattr(train_step, "lm_objective", objective_fn)
  cfg = config_lib.base_config()
  cfg.model.update(num_blocks=1, d_model=16, num_heads=2, num_kv_heads=1, d_ff=32)
  cfg.data.update(seq_len=8, batch_size=2)
  cfg.train.update(warmup_steps=0)  # the first step at the full learning rate
  model = Decoder(config_lib.validate(cfg, 61))
  tx = make_optimizer(cfg.train)
  state = train_step.init_state(model, tx, jax.random.key(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 9)), jnp.int32)
  new, metrics = jax.jit(train_step.make_train_step(model, tx, lr_schedule(cfg.train)))(state, {"tokens": tokens})
  return state, new, jax.device_get(metrics)


def test_nonfinite_gradient_skips_the_update_and_names_the_leaf(monkeypatch):
  def poisoned(model, params, batch, opts):  # finite loss, NaN gradient for the last leaf only
    loss, aux = lm_objective(model, params, batch, opts)
    return loss + 0.0 * jnp.sum(nan_gradient(jax.tree.leaves(params)[-1])), aux
  state, new, m = step_once(poisoned, monkeypatch)
  assert np.isfinite(m["loss"]) and not m["finite"]
  assert m["leaf_finite"][:-1].all() and not m["leaf_finite"][-1]
  assert int(new.step) == 1 and int(new.skipped) == 1
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params)):
    np.testing.assert_array_equal(a, b)


def test_finite_step_updates_the_params(monkeypatch):
  state, new, m = step_once(lm_objective, monkeypatch)
  assert m["finite"] and m["leaf_finite"].all() and int(new.skipped) == 0
  assert not np.array_equal(state.params["embed"]["embedding"], new.params["embed"]["embedding"])
