"""Sampling CLI: `python -m keel_jax.sample --workdir DIR --prompt "def main(" [--max_new_tokens 100]`.

Loads the newest checkpoint (or `--step`) and the tokenizer from the workdir (local or gs://),
onto this machine's devices (`--config.mesh.fsdp=N` etc. to shard; keel_jax/load.py), and prints the
continuation of each prompt on stdout (several `--prompt`s run as one left-padded batch, each
continuation printed after a `--- sample i ---` line). The continuation ends at the first eos (the
end of the document) unless `--nostop_at_eos`. An empty prompt starts a new document (eos).
Synthetic-task runs take prompts as whitespace-separated token ids.

Defaults sample from the model's own distribution (temperature 1, no top-k/top-p); temperature 0
is greedy. Any number of new tokens can be generated: each token attends to the last data.seq_len
tokens (a sliding window, stated on stderr); a longer prompt keeps its last data.seq_len tokens,
with a one-line notice. Bad input (no checkpoint, a prompt the tokenizer cannot encode,
max_new_tokens < 1) exits with status 2 and a message on stderr.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging

from keel_jax import generate as gen
from keel_jax.errors import EXIT_BAD_INPUT, ConfigError, DataError
from keel_jax.load import RunError, define_override_flags, load_run, overrides_from_flags
from keel_jax.tokenizer import can_encode

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json, checkpoints/, tokenizer/)")
_PROMPT = flags.DEFINE_multi_string("prompt", [""], "Prompt text; repeat the flag for a batch of prompts")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate, any number: past "
                                "the training context a sliding window over the last data.seq_len tokens")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Softmax temperature; 0 = greedy")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens; 0 = off")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass; 1 = off")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest)")
_STOP = flags.DEFINE_bool("stop_at_eos", True, "Cut each continuation at the first eos token")
define_override_flags()  # --config.mesh.*, --config.model.norm_impl=... (keel_jax/load.py)


class BadInput(ValueError):
  pass


def encode_prompt(tokenizer, text: str) -> list[int]:
  """Token ids of `text`; [eos] for an empty prompt. BadInput if the tokenizer cannot encode it."""
  if not hasattr(tokenizer, "encode"):  # synthetic tasks: ids, not text
    try:
      ids = [int(t) for t in text.split()]
    except ValueError:
      raise BadInput(f"this run's tokenizer ({tokenizer!r}) takes prompts as whitespace-separated token "
                     f"ids, got {text!r}") from None
    bad = [i for i in ids if not 0 <= i < tokenizer.vocab_size]
    if bad:
      raise BadInput(f"token ids {bad} are outside the vocabulary [0, {tokenizer.vocab_size})")
    return ids or [tokenizer.eos_id]
  ok, bad_chars = can_encode(tokenizer, text)
  if not ok:
    shown = ", ".join(f"U+{ord(c):04X}" for c in bad_chars[:8])
    raise BadInput(f"the prompt has characters the tokenizer ({tokenizer!r}) cannot encode: {shown} "
                   "(lone surrogates: the prompt was not valid UTF-8)")
  return [int(i) for i in tokenizer.encode(text)] or [tokenizer.eos_id]


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.ERROR)  # Orbax warns about metadata files it does not need
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  try:
    sampling = gen.Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
    run = load_run(_WORKDIR.value, _STEP.value, overrides_from_flags())
    prompts = [encode_prompt(run.tokenizer, p) for p in _PROMPT.value]
    gen.check_new_tokens(_MAX_NEW.value)
  except (RunError, ConfigError, DataError, gen.PromptError, BadInput, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)

  window = run.model_cfg.max_seq_len
  prompts, notice = gen.fit_prompts(prompts, window)
  if notice:
    print(f"note: {notice}", file=sys.stderr)
  print(f"sliding window: each token attends to the last {window} tokens (the training context)",
        file=sys.stderr)
  with run.context():
    out = gen.generate(run.model, run.params, prompts, _MAX_NEW.value, sampling, seed=_SEED.value,
                       vocab_limit=run.tokenizer.vocab_size)
  for i, tokens in enumerate(out.tokens_BxN):
    ids = gen.cut_at_eos(tokens, run.tokenizer.eos_id) if _STOP.value else [int(t) for t in tokens]
    if len(prompts) > 1:
      print(f"--- sample {i} ---")
    print(run.tokenizer.decode(ids), flush=True)


if __name__ == "__main__":
  app.run(main)
