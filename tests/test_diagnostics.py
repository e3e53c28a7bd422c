"""The per-sub-layer gradient-norm helper reports the right sub-layer and the right number."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keel_jax.diagnostics import gradient_ratio, sublayer_branch_ratios, sublayer_grad_norms, sublayer_norms
from keel_jax.model import Decoder, init_params, lm_loss, unstack_layers
from keel_jax.model_config import ModelConfig

CFG = ModelConfig(vocab_size=50, block="keel", num_blocks=3, d_model=32, num_heads=4,
                  num_kv_heads=2, d_ff=48, max_seq_len=16)


def params_for(cfg):
  return nn.meta.unbox(init_params(Decoder(cfg), jax.random.key(0)))


@pytest.mark.parametrize("block,sub", [(1, "ffn"), (2, "attn"), (0, "attn")])
def test_loss_on_one_sublayer_shows_only_at_that_sublayer(block, sub):
  params = params_for(CFG)
  def loss(p):  # depends on block `block`'s `sub` sub-layer parameters only
    return sum(jnp.sum(a[block] ** 2) for a in jax.tree.leaves(p["layers"][sub]))
  norms = np.asarray(sublayer_norms(jax.grad(loss)(params), CFG))
  index = 2 * block + (0 if sub == "attn" else 1)
  assert norms[index] > 0
  assert np.all(np.delete(norms, index) == 0)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_norms_agree_with_direct_computation_on_unstacked_tree(scan_layers):
  cfg = dataclasses.replace(CFG, scan_layers=scan_layers)
  model, params = Decoder(cfg), params_for(cfg)
  tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, 50)
  got = np.asarray(sublayer_grad_norms(model, params, tokens))
  grads = jax.grad(lambda p: lm_loss(model, p, tokens))(params)
  loop = grads if not scan_layers else unstack_layers(grads, cfg)
  want = [np.sqrt(sum(np.sum(np.square(np.asarray(a))) for a in jax.tree.leaves(loop[f"layers_{i}"][s])))
          for i in range(cfg.num_blocks) for s in ("attn", "ffn")]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert got.shape == (cfg.num_sublayers,)


def test_branch_ratio_has_one_entry_per_sublayer_and_is_positive():
  model, params = Decoder(CFG), params_for(CFG)
  r = np.asarray(sublayer_branch_ratios(model, params, jnp.zeros((1, 8), jnp.int32) + 3))
  assert r.shape == (6,) and np.all(r > 0)


def test_gradient_ratio_is_block_geometric_mean_over_the_last_block():
  g = [9.0, 1.0, 4.0, 1.0, 3.0, 2.0, 1.0, 4.0]  # blocks (9, 1), (4, 1), (3, 2), (1, 4)
  assert gradient_ratio(g) == pytest.approx(2.0 / 2.0)
  assert gradient_ratio(g, low_block=0) == pytest.approx(3.0 / 2.0)
  assert gradient_ratio(g, low_block=2) == pytest.approx(np.sqrt(6.0) / 2.0)
  assert np.isnan(gradient_ratio([1.0, 2.0])) and np.isnan(gradient_ratio([1.0, 1.0, 0.0, 0.0]))
