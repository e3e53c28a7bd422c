"""The objective: chunked cross-entropy equals the unchunked one (loss and gradients), z-loss is
mean log(Z)^2 against numpy."""
import chex
import flax.linen as nn
import jax
import numpy as np
import pytest

from keel_jax.loss import LossOptions, lm_objective, output_logits
from keel_jax.model import Decoder, init_params
from keel_jax.model_config import ModelConfig


def setup(**kw):
  cfg = ModelConfig(**{**dict(vocab_size=64, num_blocks=2, d_model=32, num_heads=4, num_kv_heads=2, d_ff=48,
                              max_seq_len=16), **kw})
  model = Decoder(cfg)
  params = nn.meta.unbox(init_params(model, jax.random.key(0)))
  params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(1), a.shape), params)
  tokens = np.random.RandomState(0).randint(0, 64, size=(3, 17)).astype(np.int32)
  return model, params, {"tokens": tokens}


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_loss_equals_full_loss_and_gradients(tied):
  model, params, batch = setup(tie_embeddings=tied)
  f = lambda opts: jax.value_and_grad(lambda p: lm_objective(model, p, batch, opts)[0])(params)
  chex.assert_trees_all_close(f(LossOptions(chunk=4, z_loss=1e-2)), f(LossOptions(z_loss=1e-2)),
                              atol=1e-6, rtol=1e-5)


def test_z_loss_is_mean_squared_log_partition_function():
  model, params, batch = setup()
  loss, aux = lm_objective(model, params, batch, LossOptions(z_loss=0.5))
  logits = np.asarray(model.apply({"params": params}, batch["tokens"][:, :-1]), np.float64)
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  targets = batch["tokens"][:, 1:]
  ce = np.mean(log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0])
  np.testing.assert_allclose(aux["z"], np.mean(log_z ** 2), rtol=1e-5)
  np.testing.assert_allclose(aux["ce"], ce, rtol=1e-5)
  np.testing.assert_allclose(loss, ce + 0.5 * np.mean(log_z ** 2), rtol=1e-5)


def test_output_logits_are_the_model_logits():
  for tied in (True, False):
    model, params, batch = setup(tie_embeddings=tied)
    h = model.apply({"params": params}, batch["tokens"][:, :-1], return_hidden=True)
    np.testing.assert_allclose(output_logits(model, params, h),
                               model.apply({"params": params}, batch["tokens"][:, :-1]), atol=1e-6)
