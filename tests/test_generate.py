"""Generation with the KV cache equals re-running the full forward pass at every step, also past the
training context (sliding window).

Tiny random models (no training): params are drawn with numpy from the abstract init shapes, which
avoids compiling an init per model, and with a large spread, so the logits are far apart and a
greedy argmax is never decided by float32 rounding.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keel_jax.generate import (GREEDY, PromptError, Sampling, check_new_tokens, cut_at_eos, filter_logits,
                               fit_prompts, generate, pad_prompts)
from keel_jax.model import Decoder, init_params, strip_boxes
from keel_jax.block_rules import BLOCKS
from keel_jax.model_config import ModelConfig

V, T_MAX, NEW = 48, 16, 7
PROMPTS = [[3, 5, 7, 9, 11], [2, 4], [40, 1, 8, 30]]  # different lengths: left padding is exercised


def tiny_model(block: str, **overrides) -> tuple[Decoder, dict]:
  cfg = ModelConfig(**{**dict(vocab_size=V, block=block, num_blocks=2, d_model=32, num_heads=4, num_kv_heads=2,
                            d_ff=64, max_seq_len=T_MAX), **overrides})
  model = Decoder(cfg)
  abstract = strip_boxes(jax.eval_shape(lambda r: init_params(model, r), jax.random.key(0)))
  rng = np.random.default_rng(0)
  def draw(path, leaf):
    if jax.tree_util.keystr(path).endswith("['scale']"):  # norm gains around 1
      return jnp.asarray(1 + 0.2 * rng.standard_normal(leaf.shape), jnp.float32)
    return jnp.asarray(0.2 * rng.standard_normal(leaf.shape), jnp.float32)
  return model, jax.tree_util.tree_map_with_path(draw, abstract)


def reference_greedy(model, params, prompt, n, context=None):
  """Greedy decoding by re-running the whole (uncached) model on the sequence so far, each step;
  `context`: on only its last `context` tokens (positions from 0)."""
  fwd = jax.jit(lambda p, x: model.apply({"params": p}, x))
  seq, tokens, logits = list(prompt), [], []
  length = context or max(T_MAX, len(prompt) + n)
  for _ in range(n):
    # One compile: right-padded to a fixed length; causality makes the padding invisible.
    x = np.zeros((1, length), np.int32)
    seen = seq[-context:] if context else seq
    x[0, :len(seen)] = seen
    seq, seq_all = seen, seq
    lg = np.asarray(fwd(params, x))[0, len(seq) - 1]
    top2 = np.sort(lg)[-2:]
    assert top2[1] - top2[0] > 1e-4, "near-tie in the reference: choose another seed"
    tokens.append(int(np.argmax(lg)))
    logits.append(lg)
    seq = seq_all + [tokens[-1]]
  return np.array(tokens), np.stack(logits)


# Every block type scanned over depth, plus the unscanned loop and the nested scan (their caches
# live in other collections' layouts), with and without remat.
CASES = [(b, {}) for b in BLOCKS] + [("keel", {"scan_layers": False, "remat_policy": "none"}),
                                     ("mix_ln", {"scan_groups": 2})]


@pytest.mark.parametrize("block,overrides", CASES, ids=[f"{b}-{o}" if o else b for b, o in CASES])
def test_cached_greedy_equals_full_forward(block, overrides):
  model, params = tiny_model(block, **overrides)
  out = generate(Decoder(model.cfg, decode=True), params, PROMPTS, NEW, GREEDY, return_logits=True)
  assert out.tokens_BxN.shape == (len(PROMPTS), NEW) and out.logits_BxNxV.shape == (len(PROMPTS), NEW, V)
  for b, prompt in enumerate(PROMPTS):
    tokens, logits = reference_greedy(model, params, prompt, NEW)
    np.testing.assert_array_equal(out.tokens_BxN[b], tokens)
    np.testing.assert_allclose(out.logits_BxNxV[b], logits, rtol=1e-5, atol=1e-5)


LONG = list(range(1, 21))  # longer than the window T_MAX: keeps its last T_MAX tokens


@pytest.mark.parametrize("num_blocks", [1, 2])
def test_generation_past_the_context_uses_a_sliding_window(num_blocks):
  """30 new tokens through a 16-slot ring buffer equal the full forward pass over the whole sequence
  with attention limited to the last 16 positions. With one block that is (independently of the
  window mask) a plain causal forward over only the last 16 tokens: rotary attention depends on
  relative positions alone."""
  model, params = tiny_model("keel", num_blocks=num_blocks)
  new = 2 * T_MAX - 2
  prompts = PROMPTS + [LONG]
  out = generate(Decoder(model.cfg, decode=True), params, prompts, new, GREEDY, return_logits=True)
  assert out.window == T_MAX and out.tokens_BxN.shape == (len(prompts), new)
  for b, prompt in enumerate(prompts):
    prompt = prompt[-T_MAX:]
    tokens, logits = reference_greedy(model, params, prompt, new, context=T_MAX if num_blocks == 1 else None)
    np.testing.assert_array_equal(out.tokens_BxN[b], tokens)
    np.testing.assert_allclose(out.logits_BxNxV[b], logits, rtol=1e-4, atol=1e-4)


def test_sampling_top_k1_is_greedy_and_seeded():
  model, params = tiny_model("keel")
  greedy = generate(model, params, PROMPTS, NEW, GREEDY).tokens_BxN
  for s in (Sampling(temperature=1.5, top_k=1), Sampling(temperature=1.0, top_p=1e-6)):
    np.testing.assert_array_equal(generate(model, params, PROMPTS, NEW, s, seed=3).tokens_BxN, greedy)
  hot = Sampling(temperature=2.0)
  a, b = (generate(model, params, PROMPTS, NEW, hot, seed=s).tokens_BxN for s in (0, 0))
  c = generate(model, params, PROMPTS, NEW, hot, seed=1).tokens_BxN
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # Ids past the tokenizer's vocabulary (the model's is padded) are never drawn.
  assert generate(model, params, PROMPTS, NEW, hot, vocab_limit=5).tokens_BxN.max() < 5


def test_filter_logits():
  logits = jnp.log(jnp.array([[0.5, 0.05, 0.3, 0.15]]))
  kept = lambda **kw: np.isfinite(np.asarray(filter_logits(logits, **kw)))[0].tolist()
  assert kept(top_k=2) == [True, False, True, False]
  assert kept(top_p=0.5) == [True, False, False, False]  # 0.5 alone reaches p
  assert kept(top_p=0.7) == [True, False, True, False]
  assert kept(top_p=0.9) == [True, False, True, True]
  assert kept(top_k=1, top_p=0.9) == [True, False, False, False]


def test_prompt_checks():
  tokens, positions = pad_prompts([[7, 8, 9], [5]])
  np.testing.assert_array_equal(positions, [[0, 1, 2], [-1, -1, 0]])
  assert tokens[1, -1] == 5
  with pytest.raises(PromptError, match="at least one token"):
    pad_prompts([[1], []])
  with pytest.raises(PromptError, match="max_new_tokens must be >= 1"):
    check_new_tokens(0)
  assert fit_prompts([[1, 2], [3]], 4) == ([[1, 2], [3]], None)
  fitted, notice = fit_prompts([[1, 2, 3, 4, 5, 6], [3]], 4)
  assert fitted == [[3, 4, 5, 6], [3]] and "6 tokens truncated from the left" in notice and "\n" not in notice
  with pytest.raises(ValueError, match="top_p"):
    Sampling(top_p=0)
  assert cut_at_eos([4, 5, 256, 6], 256) == [4, 5]
