"""Shared plumbing for the depth studies: sizes, configs, the study runner (`run_study`: a grid of runs
through `keel_jax.train.train`, one JSON of results per study, PNG plots). Trained runs are read
back with `keel_jax.load.load_run`.

Every study is `python experiments/<study>.py --out DIR [--size cpu|paper|mini]`. Results go to
`DIR/<study>.json` (rewritten after every run, so an interrupted grid resumes where it stopped when
re-run with the same --out and --size) and `DIR/<study>_*.png`; run directories go to `DIR/runs/`.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import math
import os
import shutil
import sys
import time
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")  # headless: no display on CI or on the accelerator machines
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python experiments/x.py` from a checkout without `pip install -e .`
  sys.path.insert(0, ROOT)

from keel_jax import config_lib, metrics  # noqa: E402

SIZES = ("mini", "cpu", "paper")
BLOCKS = ("pre_ln", "post_ln", "keel", "deepnorm", "mix_ln")


def parse_args(description: str) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--out", required=True, help="output directory: <study>.json, PNG plots, runs/")
  p.add_argument("--size", default="cpu", choices=SIZES,
                 help="mini: seconds (tests); cpu: this 2-core machine; paper: the paper's setup, docs/DESIGN.md section 2.8 (accelerators)")
  p.add_argument("--fresh", action="store_true", help="ignore results already in --out and rerun every run")
  return p.parse_args()


def load_config_file(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`configs/<name>.py`'s get_config(arg): the paper sizes start from the checked-in paper configs."""
  path = os.path.join(ROOT, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"keel_configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def small_config(*, block: str, sub_layers: int, d_model: int, seq_len: int, batch_size: int,
                 num_steps: int, lr: float, warmup_steps: int, max_files: int = 200,
                 eval_batches: int = 4, **train_overrides) -> ml_collections.ConfigDict:
  """A CPU/mini config on the byte-level stdlib corpus. Heads scale with width (head_dim 16)."""
  cfg = config_lib.base_config()
  heads = max(d_model // 16, 2)
  cfg.model.update(block=block, num_blocks=sub_layers // 2, d_model=d_model, num_heads=heads,
                   num_kv_heads=max(heads // 2, 1), d_ff=2 * d_model)
  cfg.data.update(source="stdlib", max_files=max_files, seq_len=seq_len, batch_size=batch_size,
                  eval_batches=eval_batches)
  # One eval and one checkpoint at the end: the studies read the last eval and the final params.
  cfg.train.update(num_steps=num_steps, lr=lr, warmup_steps=warmup_steps, log_every=1,
                   eval_every=num_steps, checkpoint_every=num_steps, keep_checkpoints=1)
  cfg.train.update(**train_overrides)
  return cfg


def paper_config(name: str, *, block: str, sub_layers: int, **train_overrides) -> ml_collections.ConfigDict:
  cfg = load_config_file(name, f"block={block},num_blocks={sub_layers // 2}")
  cfg.train.update(**train_overrides)
  return cfg


class Study:
  """A grid of named runs whose results accumulate in one JSON (reloaded on a re-run)."""

  def __init__(self, name: str, args: argparse.Namespace, setup: dict):
    self.name, self.size, self.out = name, args.size, os.path.abspath(args.out)
    os.makedirs(self.out, exist_ok=True)
    self.path = os.path.join(self.out, f"{name}.json")
    self.log_path = os.path.join(self.out, f"{name}.log")
    self.result: dict[str, Any] = {"study": name, "size": args.size, "setup": setup, "runs": {}}
    self.fresh = args.fresh
    if os.path.exists(self.path) and not args.fresh:
      with open(self.path) as f:
        old = json.load(f)
      before = old.get("setup", {})
      same = old.get("size") == args.size and all(before[k] == v for k, v in jsonable(setup).items() if k in before)
      if same:  # same grid, or one extended by new keys (new runs, analysis settings): keep finished runs
        self.result["runs"] = old.get("runs", {})
    self.t0 = time.time()

  def workdir(self, key: str) -> str:
    return os.path.join(self.out, "runs", self.name, key)

  def log(self, *parts) -> None:
    line = " ".join(str(p) for p in parts)
    print(f"[{self.name} {time.time() - self.t0:7.1f}s] {line}", flush=True)
    with open(self.log_path, "a") as f:
      f.write(line + "\n")

  def run(self, key: str, fn: Callable[[], dict]) -> dict:
    """The result of `fn()` under `key`, computed once: a finished run is not repeated."""
    if key in self.result["runs"]:
      return self.result["runs"][key]
    t = time.time()
    out = fn()
    out["seconds"] = round(time.time() - t, 2)
    self.result["runs"][key] = jsonable(out)
    self.log(f"{key}: {summary(out)} ({out['seconds']:.1f}s)")
    self.save()
    return self.result["runs"][key]

  def save(self, **extra) -> None:
    """Writes the study JSON, keeping runs that another process running other keys of the same study
    has written since this one loaded it (so a study can be split over processes)."""
    if os.path.exists(self.path) and not self.fresh:
      with open(self.path) as f:
        disk = json.load(f)
      if disk.get("size") == self.size and disk.get("setup") == jsonable(self.result["setup"]):
        self.result["runs"] = {**disk.get("runs", {}), **self.result["runs"]}
    self.result.update(jsonable(extra))
    self.result["total_run_seconds"] = round(sum(r.get("seconds", 0) for r in self.result["runs"].values()), 1)
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.result, f, indent=1, sort_keys=True)
    os.replace(tmp, self.path)

  def png(self, stem: str) -> str:
    return os.path.join(self.out, f"{self.name}_{stem}.png")


def run_study(name: str, doc: str, setups: dict, grid: Callable, report: Callable) -> None:
  """The main() of every study: --out, --size and --fresh from the command line; each (key, fn) that
  `grid(study, size, setup)` yields run once (`Study.run`); then `report(study, setup)` writes the
  tables and plots and returns a markdown table to print (or None)."""
  args = parse_args(doc)
  setup = setups[args.size]
  study = Study(name, args, setup)
  for key, fn in grid(study, args.size, setup):
    study.run(key, fn)
  md = report(study, setup)
  if md:
    print(md)
  study.log("done", study.path)


def summary(out: dict) -> str:
  keys = [k for k, v in out.items() if isinstance(v, (int, float, str)) and k != "seconds"]
  return ", ".join(f"{k}={fmt(out[k])}" for k in keys[:6])


def fmt(v) -> str:
  return f"{v:.4g}" if isinstance(v, float) else str(v)


def jsonable(v):
  """numpy / jax values -> plain JSON (non-finite floats as strings, like metrics.jsonl)."""
  if isinstance(v, dict):
    return {str(k): jsonable(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [jsonable(x) for x in v]
  if hasattr(v, "tolist") and not isinstance(v, (str, bytes)):
    return jsonable(v.tolist())
  if isinstance(v, float):
    return v if math.isfinite(v) else str(v)
  return v


def num(v) -> float:
  """A metrics.jsonl number back to float ('nan' / 'inf' strings included)."""
  return float(v)


def train_run(cfg, workdir: str, log_path: str | None = None) -> dict:
  """Trains `cfg` from scratch in `workdir` through the library's trainer.

  Returns {'eval': last eval record, 'records': metrics.jsonl, 'halted': message or None}. A run that
  halts on non-finite values is a result here (the max-LR study ends runs that way), not an error.
  """
  from keel_jax import train  # late: importing jax costs seconds that --help should not pay
  shutil.rmtree(workdir, ignore_errors=True)  # a half-finished run from a killed grid starts over
  sink = open(log_path, "a") if log_path else io.StringIO()
  halted = None
  with sink, contextlib.redirect_stdout(sink):
    try:
      final = train.train(cfg, workdir, log=lambda *a: print(*a, file=sink))
    except train.TrainingHalted as e:
      final, halted = {}, str(e)
  return {"eval": final, "records": metrics.read_records(workdir), "halted": halted}


def train_records(records: list[dict]) -> list[dict]:
  return [r for r in records if r.get("kind") == "train"]


def model_for(cfg, vocab_size: int):
  """The library's Decoder for `cfg`, with the vocabulary padding the trainer applies."""
  from keel_jax.model import Decoder
  return Decoder(config_lib.validate(cfg, vocab_size))


def figure(ncols: int = 1, nrows: int = 1, w: float = 4.2, h: float = 3.2):
  fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows), squeeze=False)
  return fig, axes


def savefig(fig, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=72)  # small PNGs: they are committed under docs/results/
  plt.close(fig)


def block_color(block: str) -> str:
  return {"pre_ln": "tab:blue", "post_ln": "tab:red", "keel": "tab:green", "deepnorm": "tab:purple",
          "mix_ln": "tab:orange"}.get(block, "black")


def finite(x) -> bool:
  try:
    return math.isfinite(float(x))
  except (TypeError, ValueError):
    return False


def nanify(xs) -> np.ndarray:
  return np.array([float(x) if finite(x) else np.nan for x in xs])
