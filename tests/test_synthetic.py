"""Synthetic depth tasks: answers are right, windows line up with the train/eval iterators, and
`data.source='synthetic'` trains through the library."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from keel_jax import config_lib, data
from keel_jax.data import synthetic
from keel_jax.errors import ConfigError


def test_parse_task_names_and_errors():
  assert synthetic.parse_task("s5") == synthetic.Task("perm", 5)
  assert synthetic.parse_task("khop") == synthetic.Task("khop", 2)
  assert synthetic.parse_task("addition") == synthetic.Task("add", 3)
  assert synthetic.parse_task("add4").vocab_size == 13
  assert synthetic.parse_task("s5").vocab_size == 121
  for bad in ("", "s9", "khop0", "mult3", "s"):
    with pytest.raises(ConfigError):
      synthetic.parse_task(bad)


def test_s5_answers_are_running_products():
  perms = list(itertools.permutations(range(5)))
  tokens, answer = synthetic.generate("s5", 8, 32, seed=1)
  assert tokens.shape == answer.shape == (8, 33)
  for row, mask in zip(tokens, answer):
    assert row[0] == row[-1] == synthetic.BOS
    ids = np.nonzero(mask)[0]
    state = tuple(range(5))
    for j in ids:
      g = perms[row[j - 1] - 1]
      state = tuple(state[g[i]] for i in range(5))  # p_t = p_{t-1} o g_t: apply g_t, then p_{t-1}
      assert perms[row[j] - 1] == state


def test_khop_answers_follow_k_hops():
  task = synthetic.parse_task("khop3")
  tokens, answer = synthetic.generate(task, 16, 48, seed=2)
  ctx_len = 47 // 2
  for row, mask in zip(tokens, answer):
    ctx = row[1:1 + ctx_len]
    hop = {}
    for j in range(ctx_len - 1):
      hop[int(ctx[j])] = int(ctx[j + 1])  # the last occurrence wins
    for j in np.nonzero(mask)[0]:
      assert row[j - 2] == synthetic.KHOP_ALPHABET + 1  # SEP q a
      x = int(row[j - 1])
      for _ in range(3):
        x = hop[x]
      assert row[j] == x


def test_addition_answers_are_sums():
  tokens, answer = synthetic.generate("add3", 8, 32, seed=3)
  for row, mask in zip(tokens, answer):
    digits = row - 1
    for start in range(1, 1 + (31 // 12) * 12, 12):
      a, b, c = (int("".join(map(str, digits[start + o:start + o + n]))) for o, n in ((0, 3), (4, 3), (8, 4)))
      assert row[start + 3] == 11 and row[start + 7] == 12
      assert a + b == c
      assert mask[start + 8:start + 12].all() and not mask[start:start + 8].any()


def _cfg(task: str, seq_len: int = 32, batch: int = 4):
  cfg = config_lib.base_config()
  cfg.data.update(source="synthetic", synthetic_task=task, seq_len=seq_len, batch_size=batch, eval_batches=2)
  return cfg


@pytest.mark.parametrize("task", ["s5", "khop", "addition"])
def test_windows_are_whole_examples(task):
  cfg = _cfg(task)
  token_data, tok = data.load_token_data(cfg.data, None)
  assert tok.vocab_size == synthetic.parse_task(task).vocab_size
  train_rows, _ = synthetic.generate(task, synthetic.TRAIN_EXAMPLES, 32, synthetic._seed(synthetic.parse_task(task), "train"))
  rows = {r.tobytes() for r in train_rows}
  batch = next(data.make_train_iterator(token_data.train, 32, 4, seed=0))["tokens"]
  assert all(r.astype(np.int32).tobytes() in rows for r in batch)
  evals = np.concatenate([b["tokens"] for b in data.eval_batches(token_data.val, 32, 4, 2)])
  np.testing.assert_array_equal(evals, synthetic.eval_rows(task, 32, 8)[0])
  # validation draws are not training windows
  assert not any(r.tobytes() in rows for r in evals)


def test_config_validation_accepts_synthetic_and_bad_task_is_config_error():
  config_lib.validate(_cfg("s5"), 121)
  with pytest.raises(ConfigError):
    data.load_token_data(_cfg("nope").data, None)


def test_answer_accuracy_perfect_and_chance():
  class Oracle:  # one-hot logits of the true next tokens (one batch): accuracy 1 on every answer
    def __init__(self, tokens, vocab):
      self.tokens, self.vocab = tokens, vocab

    def apply(self, variables, x):
      import jax.numpy as jnp
      return jnp.eye(self.vocab)[self.tokens[:, 1:]] + 0 * x[..., None]

  tokens, answer = synthetic.eval_rows("addition", 32, 8)
  out = synthetic.answer_accuracy(Oracle(tokens, 13), {}, tokens, answer, batch_size=8)
  assert out["answer_accuracy"] == 1.0 and out["window_accuracy"] == 1.0
  assert len(out["by_answer_index"]) == answer[:, 1:].any(0).sum()
  assert synthetic.chance_accuracy("s5") == pytest.approx(1 / 120)
