"""Compile time and step time versus depth, scanned and unrolled; prints JSON.

  python benchmarks/depth_compile.py            # scan: 8, 64, 256, 1024 blocks; loop: 8, 32, 64 (~10 min)
  python benchmarks/depth_compile.py --small    # seconds-long smoke run

For each (scan_layers, depth) it builds a fresh Keel train step (the one keel_jax.train jits: AdamW,
clipping, the non-finite guard and the per-sub-layer gradient norms) and records, over `--repeats`
fresh jits (a new closure each time, so nothing comes from JAX's in-memory caches):
  lower_s, compile_s: wall seconds of `jit(step).lower(state, batch)` and of `.compile()` (medians);
  lower_compile_s: median of their per-sample sum; lower_compile_cpu_s: the same in this process's CPU
  seconds (all threads), much less sensitive to other jobs on a shared host than wall time;
and the median seconds of `--steps` synchronised train steps. `criterion` checks the target:
with scanning, compile at the deepest depth within 1.5x of the shallowest (median wall and CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax

import bench_util as bu


def measure(scan: bool, depths: list[int], a) -> list[dict]:
  """Compiles every depth `repeats` times round-robin (8, 64, ..., 8, 64, ...): load that drifts on a
  shared host then hits every depth alike, and the medians compare like with like."""
  recs, cfgs, states, compiled = [], {}, {}, {}
  for depth in depths:
    cfg = bu.make_cfg(num_blocks=depth, d_model=a.d_model, seq_len=a.seq_len, batch_size=a.batch_size,
                      scan_layers=scan, remat_policy=a.remat)
    _, init, _ = bu.build(cfg)
    start = time.perf_counter()
    states[depth] = jax.block_until_ready(init(jax.random.key(0)))
    cfgs[depth] = cfg
    recs.append({"scan_layers": scan, "blocks": depth, "sub_layers": 2 * depth,
                 "init_s": time.perf_counter() - start,
                 "params": sum(x.size for x in jax.tree.leaves(states[depth].params)),
                 "_lower": [], "_compile": [], "_lower_cpu": [], "_compile_cpu": []})
  rounds = a.repeats if scan else a.loop_repeats
  for r in range(rounds):
    for depth, rec in zip(depths, recs):
      if r and not scan and depth > 8:
        continue  # unrolled deep stacks take minutes per compile: one sample each
      _, _, step = bu.build(cfgs[depth])  # a fresh closure: its lowering and executable are not cached
      batch = bu.random_batch(cfgs[depth])
      w, c = time.perf_counter(), time.process_time()
      lowered = step.lower(states[depth], batch)
      w2, c2 = time.perf_counter(), time.process_time()
      compiled[depth] = lowered.compile()
      rec["_lower"].append(w2 - w); rec["_lower_cpu"].append(c2 - c)
      rec["_compile"].append(time.perf_counter() - w2); rec["_compile_cpu"].append(time.process_time() - c2)
      print(f"scan={scan} blocks={depth} round {r}: lower+compile {rec['_lower'][-1] + rec['_compile'][-1]:.1f} s "
            f"load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
  med = statistics.median
  for depth, rec in zip(depths, recs):
    _, times = bu.time_train_steps(compiled[depth], states.pop(depth), bu.random_batch(cfgs[depth]), a.steps)
    rec.update(lower_s=med(rec["_lower"]), compile_s=med(rec["_compile"]),
               lower_compile_s=med(x + y for x, y in zip(rec["_lower"], rec["_compile"])),
               lower_compile_cpu_s=med(x + y for x, y in zip(rec["_lower_cpu"], rec["_compile_cpu"])),
               lower_compile_samples_s=[x + y for x, y in zip(rec["_lower"], rec["_compile"])],
               step=bu.summary(times), loadavg_after=list(os.getloadavg()))
    for k in ("_lower", "_compile", "_lower_cpu", "_compile_cpu"):
      del rec[k]
    del compiled[depth]
  return recs


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--small", action="store_true", help="seconds-long smoke run")
  p.add_argument("--scan_depths", type=int, nargs="*", default=[8, 64, 256, 1024])
  p.add_argument("--loop_depths", type=int, nargs="*", default=[8, 32, 64])
  p.add_argument("--d_model", type=int, default=64)
  p.add_argument("--seq_len", type=int, default=64)
  p.add_argument("--batch_size", type=int, default=4)
  p.add_argument("--remat", default="full")
  p.add_argument("--repeats", type=int, default=3, help="fresh compiles per scanned config (median)")
  p.add_argument("--loop_repeats", type=int, default=3, help="fresh compiles per unrolled config (above 8 blocks: 1)")
  p.add_argument("--steps", type=int, default=5)
  a = p.parse_args()
  if a.small:
    a.scan_depths, a.loop_depths, a.d_model, a.seq_len, a.batch_size = [2, 8], [2], 32, 16, 2
    a.repeats, a.loop_repeats, a.steps = 1, 1, 2
  env = bu.env_info()
  rows = measure(True, a.scan_depths, a) + measure(False, a.loop_depths, a)
  scan = [r for r in rows if r["scan_layers"]]
  crit = {}
  if len(scan) >= 2:
    lo, hi = scan[0], scan[-1]
    crit = {"blocks": [lo["blocks"], hi["blocks"]], "target": 1.5,
            "ratio_wall": hi["lower_compile_s"] / lo["lower_compile_s"],
            "ratio_cpu": hi["lower_compile_cpu_s"] / lo["lower_compile_cpu_s"]}
    crit["met"] = crit["ratio_wall"] <= 1.5 and crit["ratio_cpu"] <= 1.5
  out = {"benchmark": "depth_compile", "env": env, "loadavg_end": list(os.getloadavg()),
         "shape": {"d_model": a.d_model, "seq_len": a.seq_len, "batch_size": a.batch_size, "block": "keel",
                   "remat_policy": a.remat, "d_ff": 3 * a.d_model},
         "rows": rows, "criterion": crit}
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
