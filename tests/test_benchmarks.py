"""The benchmark scripts run end to end (`--small`, in a subprocess, as a user runs them) and print
JSON of the documented shape, with the load average recorded."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cli_utils import REPO, cli_env

# Fast XLA compiles: --small runs are dominated by compile time, and their numbers are not results.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def run_script(name: str, *args: str) -> dict:
  env = cli_env(XLA_FLAGS=FAST_COMPILE)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", name), "--small", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stderr[-4000:]}"
  out = json.loads(proc.stdout)
  loadavg = out["env"]["loadavg"]
  assert len(loadavg) == 3 and len(out["loadavg_end"]) == 3
  return out


@pytest.mark.slow
def test_depth_compile_reports_compile_and_step_times_per_depth():
  out = run_script("depth_compile.py")
  rows = out["rows"]
  assert [(r["scan_layers"], r["blocks"]) for r in rows] == [(True, 2), (True, 8), (False, 2)]
  for r in rows:
    assert r["lower_compile_s"] > 0 and r["lower_compile_cpu_s"] > 0 and r["step"]["median_s"] > 0
  assert set(out["criterion"]) >= {"ratio_wall", "ratio_cpu", "met", "target"}


@pytest.mark.slow
def test_grad_ratio_reports_init_and_trained_ratios_per_block():
  out = run_script("grad_ratio.py")
  assert set(out["summary"]) == {"post_ln", "keel"}
  for r in out["rows"]:
    assert len(r["g_init"]) == len(r["g_trained"]) == r["sub_layers"] == 4
    assert set(r["init"]) == set(r["trained"]) == {"low_high", "first_last", "block1_high"}
    assert r["init"]["low_high"] > 0 and r["trajectory"][-1]["step"] == 3


@pytest.mark.slow
def test_step_time_reports_mfu_overhead_and_habits():
  out = run_script("step_time.py")
  assert out["peak"]["float32"]["flops_per_s"] > 0
  o = out["overhead"]
  assert 0 < o["keel"]["mfu"] < 1 and 0 < o["pre_ln"]["mfu"] < 1 and "keel_overhead_pct" in o
  assert out["donate"]["donated"]["memory"]["alias_size_in_bytes"] > 0
  assert out["donate"]["not_donated"]["memory"]["alias_size_in_bytes"] == 0
  assert out["late_metrics"]["late_step_s"] > 0 and out["bf16"]["time_ratio_bf16_over_f32"] > 0


@pytest.mark.slow
def test_memory_depth_measures_each_config_in_its_own_process():
  out = run_script("memory_depth.py")
  rows = out["sweep"] + out["headline"]
  assert [r["mode"] for r in rows] == ["flat/full", "nested", "nested"]
  for r in rows:
    assert "error" not in r, r.get("error")
    assert r["peak_rss_bytes"] > r["baseline_rss_bytes"] > 0 and r["finite"]
  assert rows[1]["groups"] == 2 and rows[2]["groups"] == 2  # divisors nearest sqrt(4), sqrt(8) (tie: fewer)
  assert [r["mode"] for r in out["analysis"]] == ["flat/full", "nested"]
  assert all(r["xla_peak_bytes"] > 0 and r["steps"] == 0 for r in out["analysis"])


@pytest.mark.slow
def test_accelerator_mfu_runs_on_cpu_with_a_measured_peak():
  out = run_script("accelerator_mfu.py")
  assert out["peak_source"].startswith("measured")  # no table entry for a CPU
  done = [v for v in out["variants"] if "tokens_per_s" in v]
  assert len(done) == 2 and all(0 < v["mfu"] for v in done) and out["best"]["tokens_per_s"] > 0


@pytest.mark.slow
def test_train_compilation_cache_dir_fills_the_persistent_cache(tmp_path):
  """train.compilation_cache_dir (keel_jax.train.setup_compilation_cache) turns JAX's persistent cache on."""
  from cli_utils import run_train
  cache = tmp_path / "xla_cache"
  env = cli_env(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # cache even fast compiles: no flakiness
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  run_train(tmp_path / "run", "--config.train.num_steps=2", "--config.train.eval_every=2",
            "--config.train.checkpoint_every=2", f"--config.train.compilation_cache_dir={cache}", env=env)
  assert cache.is_dir() and len(list(cache.iterdir())) > 0


def test_tpu_fit_tries_variants_by_mfu_ceiling_and_tabulates_the_json(tmp_path):
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import tpu_fit
  names = [n for n, _ in tpu_fit.variants(64, 512)]
  assert names[:4] == ["shipped", "fsdp_all", "fsdp_all+full", "fsdp_all+full+nested"]
  assert names[4:] == ["fsdp_all+full+nested+batch128", "fsdp_all+full+nested+batch64"]  # >= 1 row per chip
  assert "fsdp_all" not in [n for n, _ in tpu_fit.variants(8, 512)]  # the shipped mesh on 8 chips
  fit = {"fits": True, "per_chip_bytes": 70 * 2 ** 30, "batch_size": 256, "mesh": {"data": 16, "fsdp": 8},
         "remat": "save_dots_no_batch", "scan_groups": 0, "compile_s": 100.0, "mfu_ceiling": 0.7,
         "overrides": {}, "commit": "abc1234"}
  oom = {"fits": False, "per_chip_bytes": 200 * 2 ** 30, "overrides": {}, "commit": "abc1234"}
  path = tmp_path / "fit.json"
  path.write_text(json.dumps({"entries": {
      "keel/512 v5p-256": {"tried": {"shipped": fit}, "best": "shipped", "done": True},
      "keel/512 v5p-16": {"tried": {"shipped": oom}, "done": True}}}))
  table = tpu_fit.table(str(path))
  assert "| keel | 512 | v5p-256 | 128 | yes | shipped | 16 x 8 | save_dots_no_batch | 70.0 / 95 | 100 | 70% |" in table
  assert "| keel | 512 | v5p-16 | 8 | no | none of 1 tried | | | 200.0 (least tried) / 95 | | |" in table
  assert "keel 512: v5p-256 (128 chips), `--config configs/paper_keel_512.py`" in table


@pytest.mark.slow
def test_attention_impls_reports_speed_and_memory_per_impl_and_seq_len():
  out = run_script("attention_impls.py")
  assert sorted((r["impl"], r["seq_len"]) for r in out["rows"]) == [
      ("dot_product", 32), ("dot_product", 64), ("xla", 32), ("xla", 64)]
  for r in out["rows"]:
    assert r["tokens_per_s"] > 0 and r["xla_peak_bytes"] >= r["xla_temp_bytes"] > 0 and len(r["rounds"]) == 2
  assert set(out["ratio_dot_product_over_xla"]) == {"32", "64"}
