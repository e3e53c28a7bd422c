"""Model library: each block's equations, causality, scan == loop, remat, Keel's scale identity."""
import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference
from keel_jax import block_rules
from keel_jax.block_rules import BLOCKS
from keel_jax.errors import ConfigError
from keel_jax.model import Decoder, init_params, lm_loss, unstack_layers, layer_stack
from keel_jax.model_config import ModelConfig



@pytest.fixture(autouse=True)
def no_silent_broadcasting():
  """Rank promotion raises in the model's tests only (a module-level config update would leak into
  every test module collected after this one)."""
  with jax.numpy_rank_promotion("raise"):
    yield

def tiny(block="keel", **kw) -> ModelConfig:
  base = dict(vocab_size=61, block=block, num_blocks=3, d_model=32, num_heads=4, num_kv_heads=2,
              d_ff=48, max_seq_len=16, mix_ln_fraction=0.34)
  return ModelConfig(**{**base, **kw})


def build(cfg, seed=0):
  model = Decoder(cfg)
  return model, nn.meta.unbox(init_params(model, jax.random.key(seed)))


def perturb(params, seed=1, scale=0.1):
  """Random gains and larger weights so every term of the equations matters (init gains are 1)."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return tree.unflatten([a + scale * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


TOKENS = np.random.RandomState(0).randint(0, 61, size=(2, 10))


def test_a_new_block_type_is_one_row_of_the_rule_table(monkeypatch):
  monkeypatch.setitem(block_rules.BLOCK_RULES, "pre_ln_copy", block_rules.BLOCK_RULES["pre_ln"])
  cfg = tiny("pre_ln", scan_layers=False)
  model, params = build(cfg)
  params = perturb(params)
  copy = Decoder(dataclasses.replace(cfg, block="pre_ln_copy"))
  np.testing.assert_array_equal(copy.apply({"params": params}, TOKENS), model.apply({"params": params}, TOKENS))


@pytest.mark.parametrize("block,extra", [(b, {}) for b in BLOCKS] + [
    ("keel", {"keel_first_layer": "v1"}), ("keel", {"keel_alpha": "sqrt_L"}), ("keel", {"keel_alpha": "2.5"})])
def test_forward_matches_numpy_reference(block, extra):
  cfg = tiny(block, scan_layers=False, **extra)
  model, params = build(cfg)
  params = perturb(params)
  got = model.apply({"params": params}, TOKENS)
  want = numpy_reference.forward(jax.tree.map(np.asarray, params), TOKENS, block, cfg.num_blocks,
                                 cfg.num_heads, cfg.num_kv_heads, alpha=cfg.alpha,
                                 first_layer=cfg.keel_first_layer, mix_fraction=cfg.mix_ln_fraction)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block", BLOCKS)
def test_logits_at_t_do_not_depend_on_later_tokens(block):
  model, params = build(tiny(block))
  params = perturb(params)
  t = 4
  other = TOKENS.copy()
  other[:, t + 1:] = (other[:, t + 1:] + 7) % 61
  a, b = model.apply({"params": params}, TOKENS), model.apply({"params": params}, other)
  np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-6)
  assert not np.allclose(a[:, t + 1:], b[:, t + 1:])


@pytest.mark.parametrize("block", BLOCKS)
def test_scanned_and_looped_stacks_agree_on_logits_and_gradients(block):
  cfg = tiny(block)
  model, params = build(cfg)
  params = perturb(params)
  loop_model = Decoder(dataclasses.replace(cfg, scan_layers=False))
  loop_params = unstack_layers(params, cfg)
  chex.assert_trees_all_close(model.apply({"params": params}, TOKENS),
                              loop_model.apply({"params": loop_params}, TOKENS), atol=1e-5)
  g_scan = jax.grad(lambda p: lm_loss(model, p, TOKENS))(params)
  g_loop = jax.grad(lambda p: lm_loss(loop_model, p, TOKENS))(loop_params)
  chex.assert_trees_all_close(unstack_layers(g_scan, cfg), g_loop, atol=1e-5)


@pytest.mark.parametrize("policy", ["none", "save_dots", "save_dots_no_batch"])
def test_remat_policies_give_the_same_loss_and_gradients_as_full_remat(policy):
  model, params = build(tiny("keel", remat_policy="full"))
  other = Decoder(tiny("keel", remat_policy=policy))
  f = lambda m: jax.jit(jax.value_and_grad(lambda p: lm_loss(m, p, TOKENS)))(params)
  chex.assert_trees_all_close(f(model), f(other), atol=1e-6)


def test_nested_scan_equals_flat_scan():
  cfg = tiny("keel", num_blocks=4)
  model, params = build(cfg)
  nested = Decoder(dataclasses.replace(cfg, scan_groups=2))
  nested_params = dict(params)
  nested_params["layers"] = {"blocks": jax.tree.map(lambda a: a.reshape((2, 2) + a.shape[1:]), params["layers"])}
  chex.assert_trees_all_close(jax.value_and_grad(lambda p: lm_loss(model, p, TOKENS))(params)[0],
                              jax.value_and_grad(lambda p: lm_loss(nested, p, TOKENS))(nested_params)[0],
                              atol=1e-6)
  g = jax.grad(lambda p: lm_loss(nested, p, TOKENS))(nested_params)
  g_flat = jax.grad(lambda p: lm_loss(model, p, TOKENS))(params)
  chex.assert_trees_all_close(layer_stack(g, nested.cfg), layer_stack(g_flat, cfg), atol=1e-6)


def test_keel_alpha_a_equals_post_norm_with_branch_divided_by_a():
  """N(a*x + F) = N(x + F/a) up to eps: scale the branch output projections of layers >= 1 by 1/a."""
  a = 7.0
  model_a, params = build(tiny("keel", keel_alpha=str(a)))
  params = perturb(params, scale=0.1)
  model_1 = Decoder(tiny("keel", keel_alpha="1"))
  scaled = jax.tree.map(lambda x: x, params)
  for sub, proj in (("attn", ("attn", "o")), ("ffn", ("mlp", "down"))):
    k = scaled["layers"][sub][proj[0]][proj[1]]["kernel"]
    scale = jnp.where(jnp.arange(k.shape[0]) == 0, 1.0, 1.0 / a).reshape((-1,) + (1,) * (k.ndim - 1))
    scaled["layers"][sub][proj[0]][proj[1]]["kernel"] = k * scale  # layer 0 has alpha 1 in both
  np.testing.assert_allclose(model_a.apply({"params": params}, TOKENS),
                             model_1.apply({"params": scaled}, TOKENS), atol=1e-4, rtol=1e-4)


def test_keel_shortcut_sum_is_float32_under_bfloat16_compute():
  """At alpha = 2048, N(alpha*x + F) differs from N(x) by ~F/alpha: a bfloat16 sum would round it away."""
  from keel_jax.blocks import SubLayer
  from keel_jax.norms import rms_norm_xla
  cfg = tiny("keel", dtype="bfloat16")
  x = rms_norm_xla(jax.random.normal(jax.random.key(0), (2, 8, 32)), jnp.ones(32), 1e-5)
  consts = {"alpha": jnp.float32(2048), "pre": jnp.float32(1), "post": jnp.float32(1), "keep": jnp.float32(1)}
  pos = jnp.broadcast_to(jnp.arange(8)[None], (2, 8))
  layer = SubLayer(cfg, "ffn")
  params = layer.init(jax.random.key(1), x, consts, pos)
  out, state = layer.apply(params, x, consts, pos, mutable=["intermediates"])
  assert out.dtype == jnp.float32
  moved = float(jnp.sqrt(jnp.mean(jnp.square(out - rms_norm_xla(2048 * x, jnp.ones(32), 1e-5)))))
  expected = float(state["intermediates"]["branch_rms"][0]) / 2048  # |F| / alpha
  assert 0.3 * expected < moved < 3 * expected


def test_sublayer_keep_zero_makes_that_sublayer_the_identity():
  cfg = tiny("post_ln", num_blocks=2)
  model, params = build(cfg)
  keep = jnp.array([1, 1, 0, 0.])
  short = Decoder(dataclasses.replace(cfg, num_blocks=1))
  short_params = {**params, "layers": jax.tree.map(lambda a: a[:1], params["layers"])}
  np.testing.assert_allclose(model.apply({"params": params}, TOKENS, sublayer_keep=keep),
                             short.apply({"params": short_params}, TOKENS), atol=1e-6)


def test_deepnorm_scales_ffn_v_o_init_by_beta():
  cfg = tiny("deepnorm", num_blocks=8, d_model=64, d_ff=256)
  _, params = build(cfg)
  beta = (8 * 8) ** -0.25
  lay = params["layers"]
  assert abs(float(jnp.std(lay["attn"]["attn"]["q"]["kernel"])) - 0.02) < 2e-3
  for w in (lay["attn"]["attn"]["v"]["kernel"], lay["attn"]["attn"]["o"]["kernel"], lay["ffn"]["mlp"]["down"]["kernel"]):
    assert abs(float(jnp.std(w)) - 0.02 * beta) < 2e-3


def test_params_carry_logical_axis_names():
  model = Decoder(tiny("keel"))
  boxed = init_params(model, jax.random.key(0))
  specs = nn.get_partition_spec(boxed)
  assert tuple(specs["layers"]["attn"]["attn"]["q"]["kernel"]) == ("layers", "embed", "heads", "kv")
  assert tuple(specs["layers"]["ffn"]["mlp"]["down"]["kernel"]) == ("layers", "mlp", "embed")
  assert tuple(specs["embed"]["embedding"]) == ("vocab", "embed")
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.meta.unbox(boxed)))


@pytest.mark.parametrize("kw,field", [
    (dict(block="resnet"), "model.block"),
    (dict(d_model=30), "model.d_model"),
    (dict(num_heads=4, num_kv_heads=3), "model.num_heads"),
    (dict(num_blocks=0), "model.num_blocks"),
    (dict(d_model=36, num_heads=4, num_kv_heads=2), "model.d_model"),  # head dim 9: odd for RoPE
    (dict(keel_alpha="cube_L"), "model.keel_alpha"),
    (dict(keel_alpha="-3"), "model.keel_alpha"),
    (dict(remat_policy="some"), "model.remat_policy"),
    (dict(scan_groups=2), "model.scan_groups"),  # 3 blocks are not divisible into 2 groups
])
def test_bad_model_config_names_the_field(kw, field):
  with pytest.raises(ConfigError) as e:
    tiny(**kw)
  assert e.value.field == field and field in str(e.value)


@pytest.mark.parametrize("block", ["keel", "pre_ln"])
def test_pallas_norms_give_the_same_loss_and_gradients_as_xla(block):
  """norm_impl='pallas' (interpret mode on CPU) is a drop-in for the XLA expression in every block."""
  model, params = build(tiny(block, num_blocks=2, norm_impl="xla"))
  params = perturb(params)
  pallas = Decoder(tiny(block, num_blocks=2, norm_impl="pallas"))
  f = lambda m: jax.value_and_grad(lambda p: lm_loss(m, p, TOKENS))(params)
  chex.assert_trees_all_close(f(model), f(pallas), atol=2e-5, rtol=2e-5)
