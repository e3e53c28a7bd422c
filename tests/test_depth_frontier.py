"""The depth-frontier study: its helpers on hand-made inputs, and `--size smoke` end to end (grid,
10,000-sub-layer config shrunk, published JSON and PNGs, a rerun reusing every finished run)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))

import depth_frontier  # noqa: E402
import gain_spread  # noqa: E402


def test_unigram_entropy_of_known_distributions():
  assert depth_frontier.unigram_entropy(np.arange(8).repeat(5)) == pytest.approx(math.log(8))
  tokens = np.array([0] * 3 + [7] * 1)  # p = 3/4, 1/4; unused ids in between do not count
  assert depth_frontier.unigram_entropy(tokens) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


def test_unigram_cross_entropy_is_the_frequency_models_loss():
  train = np.array([0, 0, 0, 1])  # p(0) = 3/4, p(1) = 1/4
  assert depth_frontier.unigram_cross_entropy(train, np.array([0, 1])) == pytest.approx(
      -(math.log(0.75) + math.log(0.25)) / 2)
  assert depth_frontier.unigram_cross_entropy(train, np.array([0, 5])) == math.inf  # a byte never seen in training


def test_max_stable_lr_is_the_largest_lr_that_neither_diverged_nor_stagnated():
  def run(lr, diverged=False, stagnated=False, seed=0):
    return dict(block="keel", sublayers=256, seed=seed, lr=lr, diverged=diverged, stagnated=stagnated)
  ok_then_bad = [run(1e-3), run(3e-3), run(1e-2, stagnated=True), run(3e-2, seed=1, diverged=True)]
  assert depth_frontier.max_stable_lr(ok_then_bad, "keel", 256) == "0.003"
  assert depth_frontier.max_stable_lr([run(1e-3), run(1e-2)], "keel", 256) == ">= 0.01"
  assert depth_frontier.max_stable_lr([run(1e-3, diverged=True), run(1e-2, stagnated=True)], "keel", 256) == "< 0.001"
  assert depth_frontier.max_stable_lr([run(1e-3)], "keel", 256) is None  # one LR: no verdict
  at_unigram_level = dict(run(1e-2), no_context=True)
  assert depth_frontier.max_stable_lr([run(1e-3), at_unigram_level], "keel", 256) == "0.001"


def test_grad_ratio_is_the_geometric_mean_over_the_last_steps_and_zero_once_the_bottom_underflows():
  def record(low, high):  # 3 blocks: block 1's two sub-layers at `low`, the last block's at `high`
    return {"sublayer_grad_norm": [1.0, 1.0, low, low, high, high]}
  assert depth_frontier.grad_ratio([record(1.0, 2.0)] * 30 + [record(1.0, 4.0), record(1.0, 1.0)]) == pytest.approx(
      (0.5 ** 8 * 0.25 * 1.0) ** 0.1)  # the last 10 records only
  assert depth_frontier.grad_ratio([record(0.5, 1.0), record(0.0, 1.0)]) == 0.0
  assert math.isnan(depth_frontier.grad_ratio([{"loss": 1.0}]))


def test_compounded_log_gain_spread_matches_a_loop():
  rng = np.random.default_rng(0)
  gains = np.exp(rng.normal(0, 0.1, (6, 4)))
  want = [np.std(np.sum(np.log(gains[k:]), axis=0)) for k in range(6)]
  np.testing.assert_allclose(gain_spread.compounded_log_gain_spread(gains), want, rtol=1e-12)
  assert gain_spread.compounded_log_gain_spread(np.full((5, 3), 1.3)).max() < 1e-12  # equal gains: no spread


def test_gain_coherence_is_one_for_identical_profiles_and_small_for_independent_ones():
  rng = np.random.default_rng(0)
  profile = np.exp(rng.normal(0, 0.01, 64))
  assert gain_spread.gain_coherence(np.tile(profile, (400, 1))) == pytest.approx(1.0)
  independent = gain_spread.gain_coherence(np.exp(rng.normal(0, 0.01, (400, 64))))
  assert 0.5 / 20 < independent < 2 / 20  # ~ 1/sqrt(400)


def test_perturb_gains_touches_only_the_named_norm():
  import jax
  params = {"layers": {"attn": {"norm_out": {"scale": np.ones((3, 4))}, "norm_in": {"scale": np.ones((3, 4))},
                                "attn": {"kernel": np.ones((3, 4))}}}}
  new = gain_spread.perturb_gains(params, "norm_out", 0.1, jax.random.key(0))
  assert np.std(new["layers"]["attn"]["norm_out"]["scale"]) > 0.01
  assert np.std(new["layers"]["attn"]["norm_out"]["scale"], axis=0).min() > 0  # independent per sub-layer
  coherent = gain_spread.perturb_gains(params, "norm_out", 0.1, jax.random.key(0), coherent=True)["layers"]["attn"]
  assert np.std(coherent["norm_out"]["scale"], axis=1).min() > 0.01
  np.testing.assert_array_equal(coherent["norm_out"]["scale"], np.tile(coherent["norm_out"]["scale"][0], (3, 1)))
  np.testing.assert_array_equal(new["layers"]["attn"]["norm_in"]["scale"], 1.0)
  np.testing.assert_array_equal(new["layers"]["attn"]["attn"]["kernel"], 1.0)


@pytest.mark.slow
def test_smoke_size_writes_runs_deepest_and_plots_and_reuses_finished_runs(tmp_path):
  out, pub = tmp_path / "out", tmp_path / "published"
  cmd = [sys.executable, os.path.join(REPO, "experiments", "depth_frontier.py"), "--out", str(out),
         "--size", "smoke", "--publish", str(pub)]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  doc = json.load(open(pub / "depth_frontier.json"))
  assert len(doc["runs"]) == 3  # keel x 2 seeds at the main LR + one more LR
  for r in doc["runs"]:
    for k in ("block", "sublayers", "seed", "lr", "steps", "final_train_loss", "best_eval_loss"):
      assert k in r, k
    assert math.isfinite(r["final_train_loss"]) and r["halted"] is None
  d = doc["deepest"]
  for k in ("block", "sublayers", "steps", "final_train_loss", "unigram_entropy", "step_s", "peak_rss_gib", "compile_s"):
    assert k in d, k
  assert d["block"] == "keel" and d["sublayers"] == 16 and d["steps_run"] == 8
  assert 2.0 < d["unigram_entropy"] < math.log(257) and d["peak_rss_gib"] > 0.1 and d["compile_s"] > 0
  for stem in ("loss_vs_depth", "curves", "grad_ratio", "loss_vs_lr", "deepest", "telemetry_keel_16"):
    assert (pub / f"depth_frontier_{stem}.png").stat().st_size > 1000, stem
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  again = json.load(open(pub / "depth_frontier.json"))
  assert [r["seconds"] for r in again["runs"]] == [r["seconds"] for r in doc["runs"]]
  assert again["deepest"]["seconds"] == d["seconds"]
  # the gain analysis of the same directory: every trained Keel run, at init perturbed gains
  proc = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "gain_spread.py"), "--out", str(out),
                         "--size", "mini"], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  gains = json.load(open(out / "gain_spread.json"))["runs"]
  assert sorted(gains) == ["init_L8", "trained_deepest_keel", "trained_keel_L4_s0_lr0.003"]
  assert gains["trained_deepest_keel"]["sublayers"] == 16 and len(gains["trained_deepest_keel"]["compounded_spread"]) == 16
  assert (out / "gain_spread_trained.png").stat().st_size > 1000
