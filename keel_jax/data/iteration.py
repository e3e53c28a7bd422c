"""Iteration: a packed token stream -> training windows in random order, and fixed eval batches.

Window i is `tokens[i * seq_len : i * seq_len + seq_len + 1]` (inputs and shifted targets in one
row), so windows overlap by exactly one token and every token but the first is a target once per
epoch. With `eos_id` given (data.document_mask), each batch also carries `segment_ids`: which
packed document each token belongs to (`document_ids`), for attention that stays within one.
"""

from __future__ import annotations

import zlib

from absl import logging
import grain
import numpy as np

from keel_jax.errors import ConfigError, DataError


def document_ids(rows_BxN: np.ndarray, eos_id: int) -> np.ndarray:
  """int32 [B, N]: the index of the document each token belongs to within its row. Documents are
  joined with eos between them, and an eos starts the document after it (it plays that document's
  beginning-of-sequence token: the model predicts the document's first token from it alone)."""
  return np.cumsum(rows_BxN == eos_id, axis=1, dtype=np.int32)


def _with_segments(batch: dict[str, np.ndarray], eos_id: int | None) -> dict[str, np.ndarray]:
  if eos_id is not None:
    batch['segment_ids'] = document_ids(batch['tokens'], eos_id)
  return batch


class _LocalWindows:
  """Grain map: a global batch of window indices -> this process's rows of tokens (and segment ids)."""

  def __init__(self, tokens: np.ndarray, seq_len: int, lo: int, hi: int, eos_id: int | None = None):
    self._tokens, self._seq_len, self._lo, self._hi = tokens, seq_len, lo, hi
    self._eos_id = eos_id

  def __call__(self, window_ids: np.ndarray) -> dict[str, np.ndarray]:
    starts = np.asarray(window_ids[self._lo:self._hi], np.int64) * self._seq_len
    # Contiguous slices rather than a fancy-index gather: sequential reads from a memmap.
    rows = np.stack([self._tokens[s:s + self._seq_len + 1] for s in starts])
    return _with_segments({'tokens': rows.astype(np.int32)}, self._eos_id)

  def __repr__(self) -> str:  # Deterministic: no addresses (grain may compare reprs).
    return (f'_LocalWindows(num_tokens={len(self._tokens)}, seq_len={self._seq_len}, '
            f'rows={self._lo}:{self._hi})')


def num_windows(num_tokens: int, seq_len: int) -> int:
  return max(num_tokens - 1, 0) // seq_len


def make_train_iterator(train_tokens: np.ndarray, seq_len: int, global_batch: int, seed: int,
                        process_index: int = 0, process_count: int = 1, eos_id: int | None = None):
  """Infinite, checkpointable iterator of {'tokens': int32[global_batch // process_count,
  seq_len + 1]} (and 'segment_ids' of that shape when `eos_id` is given): windows in a fresh
  random order each epoch.

  Every process computes the same global batch of window ids and keeps its contiguous slice,
  so the processes' batches concatenated (in process order) are the one-process batch.
  State: `it.get_state()` / `it.set_state(s)`, or Orbax with `grain.checkpoint.CheckpointSave`.
  """
  if global_batch % process_count:
    raise ConfigError('data.batch_size', global_batch,
                      f'a multiple of the number of processes ({process_count})')
  n = num_windows(len(train_tokens), seq_len)
  if n < global_batch:
    raise DataError(f'{len(train_tokens)} train tokens make {n} windows of data.seq_len='
                    f'{seq_len}, fewer than one global batch of {global_batch}')
  local = global_batch // process_count
  # Hash the user seed: grain seeds epoch e with (seed + e), so raw seeds s and s+1 would share
  # all but one epoch's order.
  shuffle_seed = zlib.crc32(f'keel_jax.train_windows/{seed}'.encode())
  ds = grain.MapDataset.range(n).shuffle(seed=shuffle_seed).repeat()
  ds = ds.batch(global_batch, drop_remainder=True)
  ds = ds.map(_LocalWindows(train_tokens, seq_len, process_index * local,
                            (process_index + 1) * local, eos_id))
  # In-process, unthreaded reads were fastest here (data is in memory or page cache).
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  return iter(it)


def eval_batches(val_tokens: np.ndarray, seq_len: int, batch_size: int,
                 num_batches: int, eos_id: int | None = None) -> list[dict[str, np.ndarray]]:
  """A fixed list of {'tokens': int32[batch_size, seq_len + 1]} (and 'segment_ids' when `eos_id`
  is given): non-overlapping windows spread evenly over the validation stream. Fewer batches if
  the stream holds too few windows.
  """
  n = len(val_tokens) // (seq_len + 1)  # Non-overlapping windows of seq_len + 1.
  usable = min(num_batches, n // batch_size)
  if usable < 1:
    raise DataError(f'the validation split has {len(val_tokens)} tokens, too few for one eval '
                    f'batch of {batch_size} windows of data.seq_len={seq_len} (+1)')
  if usable < num_batches:
    logging.warning('Validation data holds %d eval batches, not data.eval_batches=%d',
                    usable, num_batches)
  total = usable * batch_size
  starts = (np.arange(total, dtype=np.int64) * n // total) * (seq_len + 1)
  rows = np.stack([val_tokens[s:s + seq_len + 1] for s in starts]).astype(np.int32)
  return [_with_segments({'tokens': rows[i * batch_size:(i + 1) * batch_size]}, eos_id) for i in range(usable)]
