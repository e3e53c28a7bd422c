"""The depth studies: the max-LR divergence rule on hand-made curves, and every study end to end at
`--size mini` (a miniature grid through the real trainer), checking the JSON and the plots it writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))

import max_lr  # noqa: E402


def _verdict(loss, lr=None, nonfinite=(), **kw):
  n = len(loss)
  lr = np.linspace(0, 5e-2, n) if lr is None else lr
  rule = dict(recover_window=30, stag_window=50, stag_eps=0.02) | kw
  return max_lr.find_divergence(list(range(1, n + 1)), list(loss), list(lr), set(nonfinite), **rule)


def test_divergence_rule_healthy_run_is_a_lower_bound():
  v = _verdict(5 * np.exp(-np.arange(200) / 40) + 1)
  assert not v["diverged"] and v["max_lr_is_lower_bound"] and v["max_lr"] == pytest.approx(5e-2)


def test_divergence_rule_nonfinite_takes_lr_of_step_before():
  loss = list(5 * np.exp(-np.arange(100) / 20) + 1) + [float("nan")] * 5
  lr = np.arange(105) * 1e-3
  v = _verdict(loss, lr)
  assert v["reason"] == "nonfinite" and v["divergence_step"] == 101 and v["max_lr"] == pytest.approx(lr[99])
  # a finite loss with a skipped (non-finite gradient) update counts too
  v = _verdict(5 * np.exp(-np.arange(100) / 20) + 1, nonfinite={61})
  assert v["reason"] == "nonfinite" and v["divergence_step"] == 61


def test_divergence_rule_spike_recovered_or_not():
  base = 5 * np.exp(-np.arange(150) / 20) + 1
  unrecovered = base.copy()
  unrecovered[100:] = 4.0  # jumps and stays
  v = _verdict(unrecovered, stag_window=1000)
  assert v["reason"] == "spike" and v["divergence_step"] == 101
  recovered = base.copy()
  recovered[100:103] = 4.0  # a short spike, back within the window
  assert max_lr.SMOOTH < 30
  assert not _verdict(recovered, stag_window=1000)["diverged"]


def test_divergence_rule_stagnation_and_criteria_subset():
  decay = 5 * np.exp(-np.arange(60) / 10) + 1
  loss = np.concatenate([decay, np.full(140, decay[-1])])  # progress stops, no jump
  v = _verdict(loss)
  assert v["reason"] == "stagnation" and v["stagnation_step"] is not None
  assert not _verdict(loss, criteria=("nonfinite", "spike"))["diverged"]


STUDIES = {  # study -> keys its JSON must hold, PNG stems it must write
    "gradient_flow": (["table"], ["profile", "ratio_vs_depth", "ratio_vs_step", "branch_ratio"]),
    "max_lr": (["table", "table_markdown", "rule"], ["loss_vs_lr"]),
    "lr_sweep": (["best", "table_markdown"], ["loss_vs_lr"]),
    "depth_scaling": (["table_markdown"], ["loss_vs_depth"]),
    "synthetic_depth": (["table_markdown"], ["accuracy_vs_depth", "by_answer_index"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("study", sorted(STUDIES))
def test_study_runs_end_to_end_at_mini_size(study, tmp_path):
  out = tmp_path / "out"
  cmd = [sys.executable, os.path.join(REPO, "experiments", f"{study}.py"), "--out", str(out), "--size", "mini"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / f"{study}.json") as f:
    result = json.load(f)
  keys, pngs = STUDIES[study]
  assert result["size"] == "mini" and result["runs"]
  for k in keys:
    assert k in result, k
  for stem in pngs:
    assert (out / f"{study}_{stem}.png").stat().st_size > 1000
  # every run finished through the trainer (no run crashed)
  for name, run in result["runs"].items():
    assert run.get("halted") is None, (name, run.get("halted"))
  # a second invocation reuses the finished runs instead of training again
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / f"{study}.json") as f:
    again = json.load(f)
  assert {k: r["seconds"] for k, r in again["runs"].items()} == {k: r["seconds"] for k, r in result["runs"].items()}


def test_a_study_split_over_processes_keeps_every_processs_runs(tmp_path):
  """Two Study objects on one file (two processes running different keys): neither save loses the
  other's runs; --fresh starts from nothing."""
  import argparse
  import common
  args = argparse.Namespace(out=str(tmp_path), size="cpu", fresh=False)
  first, second = common.Study("s", args, {"width": 32}), common.Study("s", args, {"width": 32})
  first.run("a", lambda: {"loss": 1.0})
  second.run("b", lambda: {"loss": 2.0})
  first.run("c", lambda: {"loss": 3.0})
  assert sorted(json.load(open(tmp_path / "s.json"))["runs"]) == ["a", "b", "c"]
  assert sorted(common.Study("s", args, {"width": 32}).result["runs"]) == ["a", "b", "c"]
  other_setup = common.Study("s", args, {"width": 64})  # another grid: starts afresh, keeps nothing
  other_setup.run("d", lambda: {"loss": 4.0})
  assert sorted(json.load(open(tmp_path / "s.json"))["runs"]) == ["d"]
  fresh = common.Study("s", argparse.Namespace(out=str(tmp_path), size="cpu", fresh=True), {"width": 64})
  fresh.run("e", lambda: {"loss": 5.0})
  assert sorted(json.load(open(tmp_path / "s.json"))["runs"]) == ["e"]
