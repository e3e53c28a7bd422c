"""Cost of the per-sub-layer telemetry step (train.telemetry_every) over the plain train step. JSON.

  python benchmarks/telemetry_overhead.py            # configs/tiny.py's model (2 blocks, width 32), 8 x 32 tokens
  python benchmarks/telemetry_overhead.py --blocks 512   # a deep narrow stack

The telemetry step adds per-sub-layer update/param norms and one extra forward pass for the
branch/shortcut RMS ratios. Both steps are timed interleaved (plain, telemetry, plain, ...) so that
load drifting on the shared host hits both alike; `overhead` is the median over rounds of the per-round
ratio telemetry / plain - 1, `amortized_overhead_every_N` that cost spread over N steps (the trainer runs
the telemetry step once every N), and `telemetry_compile_s` the telemetry step's own compile (paid once
per run, at its first use).
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax

import bench_util as bu
from keel_jax.train_step import make_train_step


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--blocks", type=int, default=2)
  p.add_argument("--d_model", type=int, default=32)
  p.add_argument("--seq_len", type=int, default=32)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--rounds", type=int, default=30)
  p.add_argument("--every", type=int, default=50, help="telemetry interval for the amortized number")
  a = p.parse_args()
  cfg = bu.make_cfg(block="keel", num_blocks=a.blocks, d_model=a.d_model, seq_len=a.seq_len, batch_size=a.batch_size,
                    num_heads=max(a.d_model // 16, 2), num_kv_heads=max(a.d_model // 32, 1), d_ff=2 * a.d_model)
  env = bu.env_info()
  model, init, plain = bu.build(cfg)
  _, _, tele = bu.build(cfg, make_step=functools.partial(make_train_step, telemetry=True))
  batch = bu.random_batch(cfg)
  state = init(jax.random.key(0))
  compile_s = {}
  for name, fn in (("plain", plain), ("telemetry", tele)):
    t = time.perf_counter()
    state, _ = jax.block_until_ready(fn(state, batch))  # compile + first run
    compile_s[name] = time.perf_counter() - t
  times = {"plain": [], "telemetry": []}
  for _ in range(a.rounds):
    for name, fn in (("plain", plain), ("telemetry", tele)):
      (state, _), dt = bu.timed(fn, state, batch)
      times[name].append(dt)
  ratios = [t / p for p, t in zip(times["plain"], times["telemetry"])]
  overhead = statistics.median(ratios) - 1
  print(json.dumps({"benchmark": "telemetry_overhead", "args": vars(a), "sublayers": 2 * a.blocks,
                    "plain": bu.summary(times["plain"]), "telemetry": bu.summary(times["telemetry"]),
                    "overhead": overhead, f"amortized_overhead_every_{a.every}": overhead / a.every,
                    "first_call_s": compile_s, "env": env | {"loadavg_after": list(__import__("os").getloadavg())}},
                   indent=1))


if __name__ == "__main__":
  main()
