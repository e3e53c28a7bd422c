"""Run records: `metrics.jsonl` (one JSON object per logged step), TensorBoard events beside it.

Only process 0 writes. On resume from step s, records after s (written by the interrupted run past
its last checkpoint) are dropped, so the file reads as if the run had never stopped.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np


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


def read_records(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    text = f.read()
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
  def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not enabled:
      return
    kept = [r for r in read_records(workdir) if r.get("step", 0) <= resume_step]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, self.path)
    self._file = open(self.path, "a")
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)
    except ImportError:  # TensorBoard events are a convenience; the jsonl is the record
      self._tb = None

  def write(self, step: int, kind: str, values: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "kind": kind, **{k: _plain(v) for k, v in values.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in values.items():
        if np.ndim(v) == 0 and isinstance(_plain(v), (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(f"{kind}/{k}", float(v), step)
        elif np.ndim(v) == 1 and len(v) and np.issubdtype(np.asarray(v).dtype, np.floating):
          add_profile(self._tb, f"{kind}/{k}", np.asarray(v, np.float64), step)

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()
