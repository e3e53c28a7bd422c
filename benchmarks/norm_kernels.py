"""Time the Pallas RMSNorm kernels against the plain XLA expression; print one JSON object.

  python benchmarks/norm_kernels.py            # full-size shapes (FULL_SHAPES), on the default backend
  python benchmarks/norm_kernels.py --small    # CPU smoke run: interpret mode, tiny shapes

For each (tokens, width), dtype and op (`add_rms_norm`: Keel's fused `N(alpha * x + f)`, and
`rms_norm`), it times forward and forward + backward (all gradients) of the Pallas kernel and of the
jitted reference (which XLA fuses on its own), and reports `speedup` = xla_ms / pallas_ms: above 1 the
kernel is faster. `dtype` is that of every activation (x, f, the cotangent); g and alpha are float32.
A kernel that fails to compile is reported with its error, and the XLA times still come out.
On CPU the kernels only run interpreted: those timings say nothing about any accelerator.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp

from keel_jax.kernels import rmsnorm as K

FULL_SHAPES = ((16384, 1024), (16384, 4096), (65536, 2048))
SMALL_SHAPES = ((256, 128), (130, 1000))


def _time_ms(fn: Callable, args, iters: int, repeats: int = 5) -> float:
  """Median over `repeats` of the mean time of `iters` back-to-back calls (compiled beforehand)."""
  jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - start) * 1e3 / iters)
  return statistics.median(samples)


def _programs(op: str, impl: str, kernel_kw: dict):
  """-> (forward, forward_and_backward), both jitted, over (x, f, alpha, g, dy)."""
  if op == "add_rms_norm":
    fn = K.add_rms_norm_reference if impl == "xla" else (
        lambda x, f, a, g: K.add_rms_norm(x, f, a, g, **kernel_kw))
    fwd = lambda x, f, a, g, dy: fn(x, f, a, g)
    fwd_bwd = lambda x, f, a, g, dy: jax.vjp(fn, x, f, a, g)[1](dy)
  else:
    fn = K.rms_norm_reference if impl == "xla" else (lambda x, g: K.rms_norm(x, g, **kernel_kw))
    fwd = lambda x, f, a, g, dy: fn(x, g)
    fwd_bwd = lambda x, f, a, g, dy: jax.vjp(fn, x, g)[1](dy)
  return jax.jit(fwd), jax.jit(fwd_bwd)


def _bytes_moved(op: str, mode: str, tokens: int, width: int, itemsize: int) -> int:
  """HBM bytes an ideal kernel moves (reads + writes of [tokens, width] arrays), for GB/s."""
  arrays = {("add_rms_norm", "fwd"): 3, ("add_rms_norm", "fwd_bwd"): 3 + 5,
            ("rms_norm", "fwd"): 2, ("rms_norm", "fwd_bwd"): 2 + 3}[(op, mode)]
  return arrays * tokens * width * itemsize


def run(shapes, dtypes, ops, iters: int, kernel_kw: dict) -> list[dict]:
  results = []
  for tokens, width in shapes:
    for dtype_name in dtypes:
      dtype = jnp.dtype(dtype_name)
      kx, kf, kg, kd = jax.random.split(jax.random.key(0), 4)
      x = jax.random.normal(kx, (tokens, width), dtype)
      f = jax.random.normal(kf, (tokens, width), dtype)
      dy = jax.random.normal(kd, (tokens, width), dtype)
      g = 1.0 + 0.1 * jax.random.normal(kg, (width,), jnp.float32)
      args = (x, f, jnp.float32(16.0), g, dy)
      for op in ops:
        xla_fwd, xla_fwd_bwd = _programs(op, "xla", kernel_kw)
        pallas_fwd, pallas_fwd_bwd = _programs(op, "pallas", kernel_kw)
        for mode, xla_fn, pallas_fn in (("fwd", xla_fwd, pallas_fwd),
                                        ("fwd_bwd", xla_fwd_bwd, pallas_fwd_bwd)):
          row = dict(op=op, mode=mode, tokens=tokens, width=width, dtype=dtype_name)
          row["xla_ms"] = round(_time_ms(xla_fn, args, iters), 4)
          try:
            row["pallas_ms"] = round(_time_ms(pallas_fn, args, iters), 4)
            diffs = [jnp.max(jnp.abs(p.astype(jnp.float32) - r.astype(jnp.float32)))
                     for p, r in zip(jax.tree.leaves(pallas_fn(*args)), jax.tree.leaves(xla_fn(*args)))]
            row["max_abs_diff"] = float(max(diffs))
            row["speedup"] = round(row["xla_ms"] / row["pallas_ms"], 3)
            moved = _bytes_moved(op, mode, tokens, width, dtype.itemsize)
            row["pallas_gb_s"] = round(moved / row["pallas_ms"] / 1e6, 1)
            row["xla_gb_s"] = round(moved / row["xla_ms"] / 1e6, 1)
          except Exception as e:  # noqa: BLE001 -- report a kernel that fails, keep the XLA numbers
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
          results.append(row)
          print(json.dumps(row), file=sys.stderr, flush=True)  # progress, while the JSON is built
  return results


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--small", action="store_true", help="tiny shapes, interpret mode (CPU smoke)")
  parser.add_argument("--iters", type=int, default=None, help="calls per timing sample")
  parser.add_argument("--dtypes", default="bfloat16,float32")
  parser.add_argument("--ops", default="add_rms_norm,rms_norm")
  parser.add_argument("--block-rows", type=int, default=None, help="rows per kernel step")
  parser.add_argument("--lowering", default=None, choices=K.LOWERINGS)
  args = parser.parse_args(argv)

  backend = jax.default_backend()
  interpret = args.small or backend == "cpu"
  kernel_kw = dict(block_rows=args.block_rows, interpret=interpret, lowering=args.lowering)
  shapes = SMALL_SHAPES if args.small else FULL_SHAPES
  iters = args.iters or (2 if interpret else 20)
  results = run(shapes, args.dtypes.split(","), args.ops.split(","), iters, kernel_kw)
  report = dict(
      backend=backend, device=str(jax.devices()[0].device_kind), jax=jax.__version__,
      pallas_lowering=K._resolve_lowering(interpret, args.lowering, K.target_platform()),
      auto_impl=K.resolve_norm_impl("auto", backend),
      note=("interpret mode: the kernels run as a CPU emulation, so these timings are meaningless "
            "for any accelerator; this run only checks that the benchmark works") if interpret else
      "speedup = xla_ms / pallas_ms; above 1 the Pallas kernel is faster",
      results=results)
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
