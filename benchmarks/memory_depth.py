"""Peak memory versus depth: flat scan (remat per block) vs nested scan (model.scan_groups); JSON.

  python benchmarks/memory_depth.py            # sweep + the 1024-sub-layer width-256 Keel run (~10 min)
  python benchmarks/memory_depth.py --small    # seconds-long smoke run
  python benchmarks/memory_depth.py --skip_sweep   # only the headline run

Every config runs in a fresh subprocess (peak RSS is per process and never goes down), which inits a
Keel train state, compiles the train step (the one keel_jax.train jits, state donated) and trains
`--steps` steps on random tokens. Per config:
  peak_rss_bytes     getrusage(RUSAGE_SELF).ru_maxrss of that process: everything, Python and XLA included;
  baseline_rss_bytes the same right after importing JAX and building nothing, for reference;
  xla_peak_bytes     XLA's memory analysis of the compiled step: arguments + outputs - donated + temporaries,
                     the step's own peak, free of allocator slack; xla_temp_bytes: its temporaries, where
                     the activations the backward pass keeps live;
  state_bytes        params + AdamW state; step_s the median step time.
`analysis`: the headline width and depth at more tokens (--analysis_tokens), compiled only (abstract
state, nothing allocated or run): XLA's peak for flat vs nested where a run would take too long here.
Modes: flat/full = one nn.scan over blocks, each block rematerialised (keeps one residual-stream copy
per block); flat/none = no remat (keeps every intermediate); nested = model.scan_groups G (G groups of
B/G blocks, remat per group and per block: keeps about G + B/G copies, at the cost of one more forward).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time


def sqrt_groups(blocks: int) -> int:
  """The divisor of `blocks` nearest sqrt(blocks): G + B/G copies is smallest there."""
  divisors = [g for g in range(1, blocks + 1) if blocks % g == 0]
  return min(divisors, key=lambda g: (round(abs(math.log(g / math.sqrt(blocks))), 9), g))  # ties: fewer groups


def child(spec: dict) -> dict:
  """Runs one config in this (fresh) process."""
  import jax
  import bench_util as bu
  base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  model_kw = {"remat_policy": spec["remat"], "scan_groups": spec["groups"]}
  cfg = bu.make_cfg(block="keel", num_blocks=spec["blocks"], d_model=spec["d_model"], seq_len=spec["seq_len"],
                    batch_size=spec["batch_size"], num_heads=spec["heads"], num_kv_heads=spec["kv_heads"],
                    **model_kw)
  cfg.train.warmup_steps = 1  # full lr from the second step: the few steps visibly train
  _, init, step = bu.build(cfg)
  batch = bu.random_batch(cfg)
  # steps == 0: compile only, from abstract shapes (XLA's memory analysis of a shape too slow to run here)
  state = init(jax.random.key(0)) if spec["steps"] else jax.eval_shape(init, jax.random.key(0))
  w = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - w
  ma = compiled.memory_analysis()
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  losses, times = [], []
  for _ in range(spec["steps"]):
    w = time.perf_counter()
    state, m = compiled(state, batch)
    losses.append(float(m["loss"]))  # syncs
    times.append(time.perf_counter() - w)
  xla = None
  if ma is not None:
    xla = (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes)
  return {**spec, "sub_layers": 2 * spec["blocks"], "params": sum(x.size for x in jax.tree.leaves(state.params)),
          "state_bytes": state_bytes, "baseline_rss_bytes": base,
          "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
          "xla_peak_bytes": xla, "xla_temp_bytes": None if ma is None else ma.temp_size_in_bytes,
          "compile_s": compile_s, "step_s": statistics.median(times) if times else None, "step_times_s": times,
          "losses": losses, "finite": all(math.isfinite(x) for x in losses),
          "loadavg": list(os.getloadavg())}


def run_child(spec: dict, timeout: float) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--_child", json.dumps(spec)]
  w = time.perf_counter()
  try:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {**spec, "error": f"timeout after {timeout} s"}
  if res.returncode != 0:  # an OOM kill shows as -9: report it, the other configs still run
    return {**spec, "error": f"exit {res.returncode}: {res.stderr[-2000:]}"}
  return {**json.loads(res.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - w}


def spec(blocks, mode, d_model, seq_len, batch_size, heads, kv_heads, steps) -> dict:
  remat, groups = {"flat/full": ("full", 0), "flat/none": ("none", 0),
                   "nested": ("full", sqrt_groups(blocks))}[mode]
  return {"mode": mode, "blocks": blocks, "groups": groups, "remat": remat, "d_model": d_model,
          "d_ff": 3 * d_model, "seq_len": seq_len, "batch_size": batch_size, "heads": heads,
          "kv_heads": kv_heads, "steps": steps}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--small", action="store_true", help="seconds-long smoke run")
  p.add_argument("--sweep_depths", type=int, nargs="*", default=[64, 256, 1024])
  p.add_argument("--none_depths", type=int, nargs="*", default=[64, 256], help="depths also run without remat")
  # Sweep shape: narrow and many tokens, so that the activations kept for the backward pass (not the
  # optimiser update, which is the same for both scans) set the step's peak.
  p.add_argument("--d_model", type=int, default=32)
  p.add_argument("--heads", type=int, default=2)
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--steps", type=int, default=1)
  p.add_argument("--headline_blocks", type=int, default=512, help="512 blocks = 1024 sub-layers")
  p.add_argument("--headline_d_model", type=int, default=256)
  p.add_argument("--headline_seq_len", type=int, default=64)
  p.add_argument("--headline_batch_size", type=int, default=2)
  p.add_argument("--headline_steps", type=int, default=3)
  p.add_argument("--headline_flat", action="store_true", help="also run the headline shape with the flat scan")
  p.add_argument("--analysis_tokens", type=int, nargs=2, default=[256, 8], metavar=("SEQ", "BATCH"),
                 help="headline width/depth at this seq/batch, compile-only (XLA memory analysis), flat vs nested")
  p.add_argument("--skip_sweep", action="store_true")
  p.add_argument("--limit_gib", type=float, default=24.0)
  p.add_argument("--timeout", type=float, default=1800)
  p.add_argument("--_child", help=argparse.SUPPRESS)
  a = p.parse_args()
  if a._child:
    print(json.dumps(child(json.loads(a._child))))
    return
  if a.small:
    a.sweep_depths, a.none_depths, a.d_model, a.seq_len, a.batch_size, a.steps = [4], [], 32, 16, 2, 1
    a.headline_blocks, a.headline_d_model, a.headline_seq_len, a.headline_batch_size = 8, 32, 16, 2
    a.headline_steps, a.heads, a.analysis_tokens = 1, 2, [16, 4]
  env = {"loadavg": list(os.getloadavg()), "cpu_count": os.cpu_count(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
         "host_mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}
  sweep = []
  if not a.skip_sweep:
    for d in a.sweep_depths:
      modes = ["flat/full", "nested"] + (["flat/none"] if d in a.none_depths else [])
      for mode in modes:
        sweep.append(run_child(spec(d, mode, a.d_model, a.seq_len, a.batch_size, a.heads, max(a.heads // 2, 1),
                                    a.steps), a.timeout))
        print(json.dumps({k: sweep[-1].get(k) for k in ("mode", "blocks", "peak_rss_bytes", "xla_temp_bytes",
                                                          "step_s", "error")}), file=sys.stderr, flush=True)
  heads = max(a.headline_d_model // 64, 2)
  modes = ["nested"] + (["flat/full"] if a.headline_flat else [])
  headline = [run_child(spec(a.headline_blocks, m, a.headline_d_model, a.headline_seq_len, a.headline_batch_size,
                             heads, heads // 2, a.headline_steps), a.timeout) for m in modes]
  seq, bs = a.analysis_tokens
  analysis = [run_child(spec(a.headline_blocks, m, a.headline_d_model, seq, bs, heads, heads // 2, 0), a.timeout)
              for m in ("flat/full", "nested")]
  h = headline[0]
  verdict = {"sub_layers": 2 * a.headline_blocks, "d_model": a.headline_d_model, "limit_gib": a.limit_gib,
             "peak_rss_gib": h.get("peak_rss_bytes", float("nan")) / 2**30, "trained_finite": h.get("finite", False)}
  verdict["met"] = ("error" not in h and verdict["trained_finite"] and verdict["peak_rss_gib"] <= a.limit_gib
                    and verdict["sub_layers"] >= 1024)
  print(json.dumps({"benchmark": "memory_depth", "env": env, "loadavg_end": list(os.getloadavg()),
                    "sweep": sweep, "headline": headline, "analysis": analysis, "criterion": verdict}, indent=1))


if __name__ == "__main__":
  main()
