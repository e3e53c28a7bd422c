"""Depth-sensitive synthetic tasks, usable as a data source: `data.source='synthetic'` with
`data.synthetic_task` one of

  's5' (or 's<n>', n in 2..6)  permutation word problem on S_n: inputs g_1..g_m, after each the
                               running product p_t = p_{t-1} o g_t. S5 is the standard example of a
                               state-tracking task that needs depth growing with length (Merrill &
                               Sabharwal; Liu et al., "Transformers learn shortcuts to automata").
  'khop' (or 'khop<k>', k=2)   k-hop induction heads: a random context over a 16-letter alphabet, then
                               queries `SEP q a` with a = hop^k(q), hop(x) = the token that follows the
                               last earlier occurrence of x in the context (Sanford et al. 2024).
  'addition' (or 'add<d>', d=3)  d-digit addition, most significant digit first, so the first answer
                               digit already needs the whole carry chain.

Every example is one training window `[BOS, c_1 .. c_{T-1}, BOS]` of `seq_len + 1` tokens. The train
stream is `BOS c^0 BOS c^1 BOS ...`, so `data.make_train_iterator`'s window i (which starts at i * T and
overlaps the next by one token) is exactly example i; the validation stream is whole windows back to
back, which is what `data.eval_batches` reads. The LM loss covers every position (the library's loss
is unmasked); `answer_accuracy` scores only the answer positions, which is the number to report.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from keel_jax.data.packing import TokenData
from keel_jax.errors import ConfigError

BOS = 0
TRAIN_EXAMPLES = 16384  # unique training windows; the iterator repeats them in a new order each epoch
KHOP_ALPHABET = 16


@dataclasses.dataclass(frozen=True)
class Task:
  kind: str  # 'perm' | 'khop' | 'add'
  n: int  # group degree, number of hops, or number of digits

  @property
  def vocab_size(self) -> int:
    if self.kind == "perm":
      return math.factorial(self.n) + 1
    if self.kind == "khop":
      return KHOP_ALPHABET + 2  # letters 1..16, SEP 17
    return 13  # digits 1..10, '+' 11, '=' 12

  @property
  def name(self) -> str:
    return {"perm": f"s{self.n}", "khop": f"khop{self.n}", "add": f"add{self.n}"}[self.kind]


def parse_task(name: str) -> Task:
  """'s5' / 'khop' / 'khop3' / 'addition' / 'add4' -> Task. Raises ConfigError."""
  text = (name or "").strip().lower()
  aliases = {"khop": "khop2", "addition": "add3"}
  text = aliases.get(text, text)
  m = re.fullmatch(r"(s|khop|add)(\d+)", text)
  allowed = "'s<n>' (n in 2..6, e.g. 's5'), 'khop' / 'khop<k>' (k in 1..8), 'addition' / 'add<d>' (d in 1..12)"
  if not m:
    raise ConfigError("data.synthetic_task", name, allowed)
  kind, n = {"s": "perm", "khop": "khop", "add": "add"}[m.group(1)], int(m.group(2))
  if not {"perm": 2 <= n <= 6, "khop": 1 <= n <= 8, "add": 1 <= n <= 12}[kind]:
    raise ConfigError("data.synthetic_task", name, allowed)
  return Task(kind, n)


# ---- generators: (tokens int32[num, T+1], answer bool[num, T+1]) ----------------------------------

def _perm_table(n: int) -> np.ndarray:
  """table[a, b] = index of the permutation a o b (apply b, then a) over the sorted permutations."""
  perms = list(itertools.permutations(range(n)))
  index = {p: i for i, p in enumerate(perms)}
  return np.array([[index[tuple(a[b[i]] for i in range(n))] for b in perms] for a in perms], np.int32)


def _perm_content(task: Task, num: int, length: int, rng: np.random.Generator):
  table = _perm_table(task.n)
  m = length // 2
  g = rng.integers(0, len(table), (num, m)).astype(np.int32)
  p = np.empty_like(g)
  p[:, 0] = g[:, 0]
  for t in range(1, m):
    p[:, t] = table[p[:, t - 1], g[:, t]]
  content = np.full((num, length), BOS, np.int32)  # an odd length leaves one BOS filler at the end
  content[:, 0:2 * m:2], content[:, 1:2 * m:2] = g + 1, p + 1
  answer = np.zeros((num, length), bool)
  answer[:, 1:2 * m:2] = True
  return content, answer


def _khop_content(task: Task, num: int, length: int, rng: np.random.Generator):
  sep, ctx_len = KHOP_ALPHABET + 1, length // 2
  num_queries = (length - ctx_len) // 3
  if ctx_len < 2 or num_queries < 1:
    raise ConfigError("data.seq_len", length + 1, f"at least 8 for task {task.name!r}")
  content = np.full((num, length), BOS, np.int32)
  answer = np.zeros((num, length), bool)
  for i in range(num):
    while True:
      ctx = rng.integers(1, KHOP_ALPHABET + 1, ctx_len)
      hop = {int(ctx[j]): int(ctx[j + 1]) for j in range(ctx_len - 1)}  # later occurrences win: the last one
      answers = {}
      for q in hop:
        x = q
        for _ in range(task.n):
          x = hop.get(x)
          if x is None:
            break
        if x is not None:
          answers[q] = x
      if answers:
        break
    keys = np.array(sorted(answers))
    queries = rng.choice(keys, num_queries)
    content[i, :ctx_len] = ctx
    for j, q in enumerate(queries):
      at = ctx_len + 3 * j
      content[i, at:at + 3] = (sep, q, answers[int(q)])
      answer[i, at + 2] = True
  return content, answer


def _add_content(task: Task, num: int, length: int, rng: np.random.Generator):
  d = task.n
  size = 3 * d + 3  # a (d) '+' b (d) '=' sum (d+1)
  per_row = length // size
  if per_row < 1:
    raise ConfigError("data.seq_len", length + 1, f"at least {size + 2} for task {task.name!r}")
  a = rng.integers(0, 10 ** d, (num, per_row))
  b = rng.integers(0, 10 ** d, (num, per_row))
  def digits(x, k):  # most significant first, zero padded: [num, per_row, k]
    return np.stack([(x // 10 ** (k - 1 - i)) % 10 for i in range(k)], -1)
  problem = np.concatenate([digits(a, d) + 1, np.full((num, per_row, 1), 11), digits(b, d) + 1,
                            np.full((num, per_row, 1), 12), digits(a + b, d + 1) + 1], -1)
  content = np.full((num, length), BOS, np.int32)
  content[:, :per_row * size] = problem.reshape(num, -1)
  answer = np.zeros((num, length), bool)
  mask = np.zeros(size, bool)
  mask[2 * d + 2:] = True
  answer[:, :per_row * size] = np.tile(mask, per_row)
  return content, answer


def generate(task: Task | str, num: int, seq_len: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """`num` windows: tokens int32[num, seq_len + 1] = [BOS, content, BOS], and answer bool[num, seq_len + 1]
  (True where the token is an answer: a target whose prediction is scored)."""
  task = parse_task(task) if isinstance(task, str) else task
  rng = np.random.default_rng(seed)
  content, answer = {"perm": _perm_content, "khop": _khop_content, "add": _add_content}[task.kind](
      task, num, seq_len - 1, rng)
  tokens = np.concatenate([np.full((num, 1), BOS, np.int32), content, np.full((num, 1), BOS, np.int32)], 1)
  pad = np.zeros((num, 1), bool)
  return tokens.astype(np.int32), np.concatenate([pad, answer, pad], 1)


def _seed(task: Task, split: str) -> int:
  return zlib.crc32(f"keel_jax.synthetic/{task.name}/{split}".encode())


# ---- the data source ----------------------------------------------------------------------------

class SyntheticTokenizer:
  """The tokenizer interface the trainer needs (vocab_size, eos_id, kind, decode, fingerprint)."""

  kind = "synthetic"
  eos_id = BOS
  bytes_per_token = 1.0

  def __init__(self, task: Task):
    self.task, self.vocab_size = task, task.vocab_size

  def decode(self, ids) -> str:
    return " ".join(str(int(i)) for i in np.asarray(ids).reshape(-1))

  def fingerprint(self) -> str:
    return f"synthetic:{self.task.name}"

  def __repr__(self) -> str:
    return f"SyntheticTokenizer({self.task.name!r})"


def load_token_data(data_cfg):
  """(TokenData, SyntheticTokenizer) for `data.synthetic_task`; val windows are disjoint draws."""
  task, T = parse_task(data_cfg.synthetic_task), data_cfg.seq_len
  train_rows, _ = generate(task, max(TRAIN_EXAMPLES, data_cfg.batch_size), T, _seed(task, "train"))
  val_rows, _ = generate(task, data_cfg.eval_batches * data_cfg.batch_size, T, _seed(task, "val"))
  # Windows overlap by one token and every row ends in the BOS the next one starts with.
  train = np.concatenate([train_rows[:, :-1].reshape(-1), [BOS]]).astype(np.uint16)
  return TokenData(train=train, val=val_rows.reshape(-1).astype(np.uint16), bytes_per_token_val=1.0,
                   num_files_train=0, num_files_val=0, skipped={}), SyntheticTokenizer(task)


def eval_rows(task: Task | str, seq_len: int, num: int) -> tuple[np.ndarray, np.ndarray]:
  """Held-out windows for `answer_accuracy` (the validation draws, or more of the same seed)."""
  task = parse_task(task) if isinstance(task, str) else task
  return generate(task, num, seq_len, _seed(task, "val"))


def answer_accuracy(model, params, tokens: np.ndarray, answer: np.ndarray, batch_size: int = 64) -> dict:
  """Greedy next-token accuracy on answer positions only: per token, per window (all answers right),
  and by answer index within the window (for S5: by prefix length, the depth-hungry direction)."""
  apply = jax.jit(lambda p, x: jnp.argmax(model.apply({"params": p}, x), -1))
  right_all, mask_all = [], []
  for i in range(0, len(tokens), batch_size):
    x, m = tokens[i:i + batch_size], answer[i:i + batch_size, 1:]
    pred = np.asarray(apply(params, jnp.asarray(x[:, :-1])))
    right_all.append((pred == x[:, 1:]) & m)
    mask_all.append(m)
  right, mask = np.concatenate(right_all), np.concatenate(mask_all)
  cols = mask.any(0)  # answer positions are the same in every window of a task
  return {"answer_accuracy": float(right.sum() / max(mask.sum(), 1)),
          "window_accuracy": float(np.mean(right.sum(1) == mask.sum(1))),
          "by_answer_index": (right[:, cols].sum(0) / np.maximum(mask[:, cols].sum(0), 1)).tolist(),
          "answer_tokens": int(mask.sum())}


def chance_accuracy(task: Task | str) -> float:
  """Accuracy of guessing an answer token uniformly (the floor the plots draw)."""
  task = parse_task(task) if isinstance(task, str) else task
  return {"perm": 1 / math.factorial(task.n), "khop": 1 / KHOP_ALPHABET, "add": 0.1}[task.kind]
