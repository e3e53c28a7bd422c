"""Attention implementations: each equals the xla reference (logits and gradients) with and without
packed-document masks, with GQA; documents never see each other; bad choices fail naming what works."""
import json
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cli_utils import REPO, cli_env
from keel_jax import attention_impls
from keel_jax.errors import ConfigError
from keel_jax.kernels import splash
from keel_jax.loss import LossOptions, document_positions, lm_objective
from keel_jax.model import Decoder, init_params
from keel_jax.model_config import ModelConfig

V = 61


def tiny(T, **kw) -> ModelConfig:  # GQA: 4 query heads share 2 key/value heads
  base = dict(vocab_size=V, block="keel", num_blocks=2, d_model=32, num_heads=4, num_kv_heads=2, d_ff=48,
              max_seq_len=T)
  return ModelConfig(**{**base, **kw})


def packed_batch(B, T, seed=0):
  """tokens [B, T+1] and segment ids [B, T+1]: 3 documents per row at different boundaries."""
  rs = np.random.RandomState(seed)
  tokens = rs.randint(0, V, size=(B, T + 1)).astype(np.int32)
  cuts = [sorted(rs.choice(np.arange(1, T), 2, replace=False)) for _ in range(B)]
  segments = np.stack([np.searchsorted(c, np.arange(T + 1), side="right") for c in cuts]).astype(np.int32)
  return {"tokens": tokens, "segment_ids": segments}


def loss_and_grads(impl, T, batch, **opts):
  cfg = tiny(T, attention_impl=impl)
  model = Decoder(cfg)
  params = nn.meta.unbox(init_params(model, jax.random.key(0)))
  params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape), params)
  loss_fn = lambda p: lm_objective(model, p, batch, LossOptions(**opts))[0]
  segments = batch.get("segment_ids")
  logits = model.apply({"params": params}, batch["tokens"][:, :-1],
                       segment_ids_BxT=None if segments is None else segments[:, :-1])
  return logits, jax.jit(jax.value_and_grad(loss_fn))(params)


@pytest.mark.parametrize("impl,T,documents", [
    ("dot_product", 24, False), ("dot_product", 24, True),
    ("splash", 128, False), ("splash", 128, True)])  # splash: interpret mode, its smallest block
def test_impl_equals_xla_on_logits_and_gradients(impl, T, documents):
  batch = packed_batch(2, T)
  if not documents:
    del batch["segment_ids"]
  want_logits, want = loss_and_grads("xla", T, batch, document_positions=documents)
  got_logits, got = loss_and_grads(impl, T, batch, document_positions=documents)
  np.testing.assert_allclose(got_logits, want_logits, atol=2e-5, rtol=2e-5)
  chex.assert_trees_all_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", ["xla", "dot_product"])
def test_a_packed_document_is_computed_as_if_alone(impl):
  """With document masks and per-document positions, the logits of a row's middle document equal
  those of that document run on its own; changing another document's tokens changes nothing in it."""
  T = 20
  model = Decoder(tiny(T, attention_impl=impl))
  params = nn.meta.unbox(init_params(model, jax.random.key(0)))
  tokens = np.random.RandomState(0).randint(0, V, size=(1, T)).astype(np.int32)
  segments = np.array([[0] * 6 + [1] * 8 + [2] * 6], np.int32)
  run = lambda t: model.apply({"params": params}, t, document_positions(segments), segment_ids_BxT=segments)
  packed = run(tokens)
  alone = model.apply({"params": params}, tokens[:, 6:14])
  np.testing.assert_allclose(packed[:, 6:14], alone, atol=2e-5)
  other = tokens.copy()
  other[:, :6] = (other[:, :6] + 5) % V  # the first document
  other[:, 14:] = (other[:, 14:] + 3) % V  # the last one
  changed = run(other)
  np.testing.assert_allclose(changed[:, 6:14], packed[:, 6:14], atol=1e-6)
  assert not np.allclose(changed[:, 14:], packed[:, 14:])


def test_document_positions_restart_at_each_segment():
  seg = jnp.array([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
  np.testing.assert_array_equal(document_positions(seg), [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])


@pytest.mark.parametrize("impl", ["xla", "dot_product"])
def test_kv_cache_decode_matches_the_full_forward(impl):
  from keel_jax.generate import generate
  cfg = tiny(16, attention_impl=impl)
  params = nn.meta.unbox(init_params(Decoder(cfg), jax.random.key(0)))
  prompts = [[3, 4, 5, 6], [7, 8]]
  out = generate(Decoder(cfg, decode=True), params, prompts, 5, return_logits=True)
  for b, p in enumerate(prompts):
    seq = np.array([p + list(out.tokens_BxN[b, :4])], np.int32)
    full = Decoder(cfg).apply({"params": params}, seq)
    np.testing.assert_allclose(out.logits_BxNxV[b, :5], full[0, len(p) - 1:], atol=2e-5)


def test_splash_decodes_with_xla():
  """Splash is a training kernel: the KV-cache path of a splash model computes what xla's does."""
  from keel_jax.generate import generate
  params = nn.meta.unbox(init_params(Decoder(tiny(16)), jax.random.key(0)))
  run = lambda impl: generate(Decoder(tiny(16, attention_impl=impl), decode=True), params, [[1, 2, 3]], 4,
                              return_logits=True).logits_BxNxV
  np.testing.assert_array_equal(run("splash"), run("xla"))


def test_unavailable_impl_names_what_is_available():
  with pytest.raises(ConfigError) as e:
    attention_impls.resolve("splash", "gpu", 4096)
  assert "('xla', 'dot_product')" in str(e.value) and "gpu" in str(e.value)
  with pytest.raises(ConfigError) as e:
    tiny(16, attention_impl="flash")
  assert e.value.field == "model.attention_impl"


def test_auto_picks_per_platform_and_falls_back_with_one_line():
  lines = []
  assert attention_impls.resolve("auto", "tpu", 4096, lines.append) == "splash" and not lines
  assert attention_impls.resolve("auto", "tpu", 100, lines.append) == "xla"
  assert len(lines) == 1 and "splash" in lines[0] and "100" in lines[0]
  assert attention_impls.resolve("auto", "gpu", 100) == "dot_product"
  assert attention_impls.resolve("auto", "cpu", 100) == attention_impls.AUTO_CHOICE["cpu"]


def test_splash_sequence_not_a_multiple_of_the_block_names_the_numbers():
  assert splash.block_size(4096) == 512 and splash.block_size(384) == 128
  with pytest.raises(ConfigError) as e:
    attention_impls.resolve("splash", "tpu", 200)
  assert e.value.field == "data.seq_len" and "200" in str(e.value) and "128" in str(e.value)


@pytest.mark.slow
def test_splash_compiles_for_an_8_chip_tpu_slice():
  """The splash model's train step, sharded over a v5p-16 slice (8 chips: data 2 x fsdp 2 x tensor 2),
  compiles for TPU from this host through keel_jax.aot, with the kernels as Mosaic calls."""
  aot = pytest.importorskip("keel_jax.aot")
  if not aot.libtpu_available():
    pytest.skip("libtpu not installed (pip install -e '.[tpu]')")
  env = cli_env(**aot.TPU_ENV)
  args = ["--config", "configs/tiny.py:seq_len=256,batch_size=8,d_model=256,attention_impl=splash,document_mask=true",
          "--topology", "v5p-16", "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
          "--steps=train", "--json"]
  proc = subprocess.run([sys.executable, "-m", "keel_jax.aot", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  report = json.loads(proc.stdout)
  assert report["fits"] and report["steps"]["train"]["mosaic_calls"] > 0

def test_xla_attention_in_query_blocks_equals_all_at_once():
  B, T, H, K, Dh = 2, 32, 4, 2, 8
  q, k, v = (jax.random.normal(jax.random.key(i), (B, T, n, Dh)) for i, n in enumerate((H, K, K)))
  index = jnp.broadcast_to(jnp.arange(T)[None], (B, T))
  seg = jnp.asarray(packed_batch(B, T - 1)["segment_ids"])
  visible = attention_impls.causal_mask(index, index, index, (seg, seg))
  f = lambda block: jax.value_and_grad(
      lambda q, k, v: jnp.sum(jnp.sin(attention_impls.xla_attention(q, k, v, visible, query_block=block))),
      argnums=(0, 1, 2))(q, k, v)
  chex.assert_trees_all_close(f(8), f(T), atol=1e-5)
