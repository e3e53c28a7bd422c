"""Run records: `metrics.jsonl` (one JSON object per logged step), TensorBoard events beside it.

Only process 0 writes. On resume from step s, records after s (written by the interrupted run past
its last checkpoint) are dropped, so the file reads as if the run had never stopped.

The workdir may be local or `gs://` (keel_jax/paths.py). Cloud Storage cannot append: there the
records are kept in memory and the object is rewritten whole by `sync()` (the loop calls it with
every checkpoint), by `close()`, and by `write` at most every SYNC_SECONDS. A run killed in between
loses only records after its last checkpoint, which its resume drops anyway. TensorBoard event files
are written locally (a temporary directory) and copied to `workdir/tensorboard` by the same syncs:
tensorboardX's own gs:// writer re-uploads its whole file at every flush and again when collected.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time

import numpy as np

from keel_jax import paths

SYNC_SECONDS = 60.0


def _plain(v):
  if isinstance(v, (np.ndarray, list, tuple)):
    v = np.asarray(v)
    return _plain(v.item()) if v.ndim == 0 else [_plain(x) for x in v.tolist()]
  if isinstance(v, (np.floating, float)):
    v = float(v)
    return v if math.isfinite(v) else str(v)  # JSON has no NaN/inf: write "nan" / "inf"
  if isinstance(v, (np.integer, np.bool_)):
    return v.item()
  return v


def significant(v, digits: int = 6) -> np.ndarray:
  """`v` rounded to `digits` significant digits (not decimals: gradient norms of a deep stack go far below
  1e-6 and must not become 0), for compact records."""
  return np.array([float(f"{x:.{digits}g}") for x in np.asarray(v, np.float64).ravel()]).reshape(np.shape(v))


def read_records(workdir) -> list[dict]:
  path = paths.path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  text = path.read_text()
  # Each record is written as one line ending in '\n'; text after the last '\n' is a write torn by a
  # crash, and is dropped (the resumed run rewrites the file without it).
  return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line.strip()]


def add_profile(tb, tag: str, values_L: np.ndarray, step: int) -> None:
  """A per-sub-layer vector as a TensorBoard histogram whose bucket i (x = i + 1) holds value i: the
  histogram dashboard then draws the depth profile at each step (TensorBoard keeps no vector scalars).
  Non-finite values are written as 0."""
  v = np.where(np.isfinite(values_L), values_L, 0.0)
  tb.add_histogram_raw(tag, min=0.0, max=float(len(v)), num=float(len(v)), sum=float(v.sum()),
                       sum_squares=float(np.square(v).sum()), bucket_limits=np.arange(1.0, len(v) + 1).tolist(),
                       bucket_counts=v.tolist(), global_step=step)


class MetricsWriter:
  def __init__(self, workdir, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self.path = paths.path(workdir) / "metrics.jsonl"
    self._tb = None
    if not enabled:
      return
    kept = [json.dumps(r) + "\n" for r in read_records(workdir) if r.get("step", 0) <= resume_step]
    paths.write_text(self.path, "".join(kept))
    self._remote = paths.is_remote(self.path)
    self._lines, self._synced = (kept, time.monotonic()) if self._remote else (None, None)
    self._file = None if self._remote else open(self.path, "a")
    self._tb_dir = paths.path(workdir) / "tensorboard"
    self._tb_local = tempfile.mkdtemp(prefix="keel_tensorboard_") if self._remote else str(self._tb_dir)
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(self._tb_local, purge_step=resume_step + 1)
    except ImportError:  # TensorBoard events are a convenience; the jsonl is the record
      self._tb = None

  def write(self, step: int, kind: str, values: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "kind": kind, **{k: _plain(v) for k, v in values.items()}}
    if self._remote:
      self._lines.append(json.dumps(record) + "\n")
      if time.monotonic() - self._synced > SYNC_SECONDS:
        self.sync()
    else:
      self._file.write(json.dumps(record) + "\n")
      self._file.flush()
    if self._tb is not None:
      for k, v in values.items():
        if np.ndim(v) == 0 and isinstance(_plain(v), (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(f"{kind}/{k}", float(v), step)
        elif np.ndim(v) == 1 and len(v) and np.issubdtype(np.asarray(v).dtype, np.floating):
          add_profile(self._tb, f"{kind}/{k}", np.asarray(v, np.float64), step)

  def sync(self) -> None:
    """Everything written so far is in the workdir (a no-op for a local one: each line is flushed)."""
    if self.enabled and self._remote:
      paths.write_text(self.path, "".join(self._lines))
      self._synced = time.monotonic()
      if self._tb is not None:
        self._tb.flush()
        for name in os.listdir(self._tb_local):  # this run's event files (new names on each resume)
          (self._tb_dir / name).write_bytes(paths.path(os.path.join(self._tb_local, name)).read_bytes())

  def close(self) -> None:
    if self.enabled:
      if self._tb is not None:
        self._tb.close()
      self.sync()
      if self._file is not None:
        self._file.close()
      if self._remote:
        shutil.rmtree(self._tb_local, ignore_errors=True)
