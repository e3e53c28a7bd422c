"""Autoregressive generation with a key/value cache, for every block type.

    out = generate(Decoder(cfg, decode=True), params, [ids_a, ids_b], max_new_tokens=64,
                   sampling=Sampling(temperature=0.8, top_p=0.95), seed=0)
    out.tokens_BxN  # int32 [num_prompts, max_new_tokens]

How it runs: one jitted function per (model config, max_new_tokens, batch and prompt shape); the
sampling settings are traced arguments, so changing them does not recompile. It runs the prompt
through the decode=True model once (prefill, which creates and fills the cache), then a `lax.scan`
over the new tokens whose body is the one-token decode step. The model itself scans over depth (cfg.scan_layers), with each layer's cache slice carried
along the layer axis, so the decode step is one compiled scan over depth.

Sliding window: every token attends to the last `window = cfg.max_seq_len` tokens (the training
data.seq_len; keel_jax/attention.py), and the cache is a ring buffer of that many slots, so any
number of new tokens can be generated: past the training context the oldest tokens drop out of
the window. A prompt longer than the window keeps its last `window` tokens (`fit_prompts` says so
in a one-line notice). Rotary embeddings make attention depend on relative positions only, so
absolute positions past the context see the distances training saw.

Batches of prompts of different lengths are LEFT-PADDED to the longest, with per-row positions:
row b's real tokens get positions 0, 1, ... and its pad tokens position -1, which attention treats
as padding and never attends to. Every row therefore computes exactly what it would alone.

Sampling (`Sampling`): temperature 0 is greedy (argmax; top-k/top-p are then irrelevant). Otherwise
logits / temperature, then top-k (keep the k largest; 0 = off), then top-p (keep the smallest set
of most likely tokens whose probability reaches p; 1 = off), then a categorical draw. Ties at a
cut-off are kept. Token ids >= `vocab_limit` (the tokenizer's size; the model's vocabulary is
padded to a multiple of 64) are never produced. Step t draws every row (independently) with
fold_in(key(seed), t): the same seed, prompts and settings give the same tokens.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from keel_jax.model import Decoder
from keel_jax.model_config import ModelConfig

PAD_ID = 0  # what left padding holds; any valid id works, since padded positions are never attended
PAD_POSITION = -1


class PromptError(ValueError):
  """A prompt that cannot be generated from (empty), or a number of new tokens < 1."""


@dataclasses.dataclass(frozen=True)
class Sampling:
  temperature: float = 1.0  # 0 = greedy
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1 = off

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
    if not (isinstance(self.top_k, int) and self.top_k >= 0):
      raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")


GREEDY = Sampling(temperature=0.0)


class Generation(NamedTuple):
  tokens_BxN: np.ndarray  # int32 new tokens (eos included, nothing cut)
  logits_BxNxV: np.ndarray | None  # float32 model logits each token was drawn from (return_logits)
  window: int  # tokens each new token attended to at most (the model's max_seq_len)


# ---- sampling ------------------------------------------------------------------------------------
# The settings are traced values, not compile-time constants: changing temperature, top-k or top-p
# (or greedy <-> sampled) reuses the compiled generation.

def filter_logits(logits_BxV: jax.Array, top_k=0, top_p=1.0) -> jax.Array:
  """-inf outside the top-k tokens (k = 0: all), then outside the top-p nucleus of what is left
  (p >= 1: all). float32; the cuts are logit thresholds, so ties at a cut are kept."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  V = logits_BxV.shape[-1]
  rank_V = jnp.arange(V)
  top_k, top_p = jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, jnp.float32)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
  sorted_BxV = jnp.where(rank_V[None] < k, -jnp.sort(-logits_BxV, axis=-1), -jnp.inf)  # descending
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
  # The most likely token is always kept (no mass before it); p >= 1 keeps all despite rounding.
  keep_BxV = (rank_V[None] < k) & ((mass_before_BxV < top_p) | (top_p >= 1))
  num_kept_B = jnp.sum(keep_BxV, axis=-1)
  threshold_Bx1 = jnp.take_along_axis(sorted_BxV, num_kept_B[:, None] - 1, axis=-1)
  return jnp.where(logits_BxV < threshold_Bx1, -jnp.inf, logits_BxV)


def sample_next(logits_BxV: jax.Array, rng: jax.Array, temperature, top_k, top_p, vocab_limit) -> jax.Array:
  """int32 [B]: each row's next token (temperature 0: argmax), never an id >= vocab_limit."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  allowed_V = jnp.arange(logits_BxV.shape[-1]) < vocab_limit
  logits_BxV = jnp.where(allowed_V[None], logits_BxV, -jnp.inf)
  greedy_B = jnp.argmax(logits_BxV, axis=-1)
  scaled_BxV = filter_logits(logits_BxV / jnp.maximum(temperature, 1e-6), top_k, top_p)
  sampled_B = jax.random.categorical(rng, scaled_BxV, axis=-1)
  return jnp.where(temperature > 0, sampled_B, greedy_B).astype(jnp.int32)


# ---- prompts -------------------------------------------------------------------------------------

def pad_prompts(prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads to the longest prompt: (tokens_BxP int32, positions_BxP int32, PAD_POSITION on pads)."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise PromptError("every prompt needs at least one token (an empty text can start from the "
                      "tokenizer's eos id, the document separator)")
  P = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), P), PAD_ID, np.int32)
  positions = np.full((len(prompts), P), PAD_POSITION, np.int32)
  for b, p in enumerate(prompts):
    n = len(p)
    tokens[b, P - n:] = np.asarray(p, np.int32)
    positions[b, P - n:] = np.arange(n, dtype=np.int32)
  return tokens, positions


def fit_prompts(prompts: Sequence[Sequence[int]], window: int) -> tuple[list[list[int]], str | None]:
  """Each prompt cut to its last `window` tokens; and a one-line notice when any was cut, else None."""
  longest = max((len(p) for p in prompts), default=0)
  fitted = [list(p)[-window:] for p in prompts]
  if longest <= window:
    return fitted, None
  return fitted, (f"prompt of {longest} tokens truncated from the left to the model's window of "
                  f"{window} tokens (its training context)")


def check_new_tokens(max_new_tokens: int) -> None:
  if max_new_tokens < 1:
    raise PromptError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


# ---- the compiled loop ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=32)
def _compiled(model_cfg: ModelConfig, max_new_tokens: int, return_logits: bool):
  """jit(params, tokens_BxP, positions_BxP, rng, temperature, top_k, top_p, vocab_limit)
  -> (tokens_BxN, logits_BxNxV | None). Recompiles only for a new batch or prompt shape."""
  model = Decoder(model_cfg, decode=True)

  def run(params, tokens_BxP, positions_BxP, rng, *settings):
    # Prefill. No cache is passed in: with 'cache' mutable, the attention layers create theirs
    # (a ring buffer of max_seq_len slots, per layer along the scanned axis) and write the prompt.
    logits_BxPxV, mut = model.apply({"params": params}, tokens_BxP, positions_BxP, mutable=["cache"])
    first_logits_BxV = logits_BxPxV[:, -1]  # every row's last prompt token is at the last slot
    first_B = sample_next(first_logits_BxV, jax.random.fold_in(rng, 0), *settings)
    next_pos_B = positions_BxP[:, -1] + 1

    def step(carry, t):  # the decode step: one token per row through the whole (scanned) stack
      cache, tok_B, pos_B = carry
      logits_Bx1xV, mut = model.apply({"params": params, "cache": cache}, tok_B[:, None], pos_B[:, None],
                                      mutable=["cache"])
      new_B = sample_next(logits_Bx1xV[:, 0], jax.random.fold_in(rng, t), *settings)
      return (mut["cache"], new_B, pos_B + 1), (new_B, logits_Bx1xV[:, 0] if return_logits else None)

    carry = (mut["cache"], first_B, next_pos_B)
    _, (rest_NxB, rest_logits) = jax.lax.scan(step, carry, jnp.arange(1, max_new_tokens))
    tokens_BxN = jnp.concatenate([first_B[:, None], rest_NxB.T], axis=1)
    if not return_logits:
      return tokens_BxN, None
    logits_BxNxV = jnp.concatenate([first_logits_BxV[:, None], jnp.swapaxes(rest_logits, 0, 1)], axis=1)
    return tokens_BxN, logits_BxNxV

  return jax.jit(run)


def generate(model: Decoder, params: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: Sampling = GREEDY, seed: int = 0, vocab_limit: int | None = None,
             return_logits: bool = False) -> Generation:
  """Continues each prompt (a sequence of token ids) by `max_new_tokens` tokens, any number.

  `model` may be built with decode True or False (its config is what counts). `params` are the
  plain (unboxed) params. A prompt longer than the window (cfg.max_seq_len) keeps its last tokens,
  with a logged warning. Raises PromptError for an empty prompt or max_new_tokens < 1.
  """
  cfg = model.cfg
  check_new_tokens(max_new_tokens)
  prompts, notice = fit_prompts(prompts, cfg.max_seq_len)
  if notice:
    logging.warning(notice)
  tokens_BxP, positions_BxP = pad_prompts(prompts)
  limit = cfg.vocab_size if vocab_limit is None else min(vocab_limit, cfg.vocab_size)
  fn = _compiled(cfg, int(max_new_tokens), bool(return_logits))
  settings = (np.float32(sampling.temperature), np.int32(sampling.top_k), np.float32(sampling.top_p),
              np.int32(limit))
  tokens, logits = fn(params, tokens_BxP, positions_BxP, jax.random.key(seed), *settings)
  return Generation(np.asarray(tokens), None if logits is None else np.asarray(logits), cfg.max_seq_len)


def cut_at_eos(tokens_N: Sequence[int], eos_id: int) -> list[int]:
  """The tokens before the first eos (the end of the document the model was writing)."""
  out = []
  for t in tokens_N:
    if int(t) == eos_id:
      break
    out.append(int(t))
  return out
