"""Train-step time, tokens/s and MFU; Keel's overhead over Pre-LN; the speed habits. JSON.

  python benchmarks/step_time.py            # width 512, 4 blocks, seq 256, batch 4 (~5-10 min on 2 cores)
  python benchmarks/step_time.py --small    # seconds-long smoke run
  python benchmarks/step_time.py --only overhead   # one part: peak, overhead, donate, late_metrics, bf16, cache

Parts (each a before/after on the same shape, timed interleaved, A B A B ..., so that load drifting on a
shared host hits both sides alike; ratios are medians over rounds of per-round ratios):
  peak          FLOP/s of one large float32 (and bfloat16) matmul: the CPU "peak" for MFU.
  overhead      Keel vs Pre-LN: step time, tokens/s, MFU, overhead % = keel / pre_ln - 1 (target <= 10%).
  donate        train state donated to the step (jit donate_argnums=0) or not: step time, and XLA's
                memory analysis (argument + output - aliased + temp bytes = the step's peak); for the
                trainer's step (non-finite guard by lax.cond) and for the previous one (jnp.where guard).
  late_metrics  a loop of steps with a host-side batch each step (keel_jax.data's Grain iterator) that
                fetches the step's metrics at once, or one step late (what keel_jax.train does).
  bf16          model.dtype bfloat16 vs float32 (params and the residual stream stay float32).
  cache         compile time of the train step in fresh processes: no cache, cold cache, warm cache
                (jax_compilation_cache_dir, i.e. train.compilation_cache_dir / JAX_COMPILATION_CACHE_DIR).
MFU = analytic model FLOPs per token (bench_util.matmul_flops_per_token: 6 x weights + causal
attention; remat recompute not counted) x tokens/s / peak.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

import bench_util as bu

PARTS = ("peak", "overhead", "donate", "late_metrics", "bf16", "cache")


def shape_cfg(a, **over):
  kw = dict(block="keel", num_blocks=a.blocks, d_model=a.d_model, seq_len=a.seq_len, batch_size=a.batch_size,
            num_heads=a.heads, num_kv_heads=a.kv_heads, remat_policy=a.remat)
  kw.update(over)
  return bu.make_cfg(**kw)


def where_guard_step(model, tx, schedule):
  """The train step with the non-finite guard as jnp.where(finite, new, old) over the whole state
  (metrics from the unselected update): the baseline of the donation measurement, against the
  trainer's lax.cond guard."""
  import optax
  import jax.numpy as jnp
  from keel_jax.diagnostics import sublayer_norms
  from keel_jax.model import lm_loss
  from keel_jax.train_step import TrainState

  def train_step(state, batch):
    loss, grads = jax.value_and_grad(lambda p: lm_loss(model, p, batch["tokens"]))(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    leaf_finite = jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
    finite = jnp.isfinite(loss) & jnp.all(leaf_finite)
    keep = lambda new, old: jnp.where(finite, new, old)
    new_state = TrainState(step=state.step + 1, params=jax.tree.map(keep, params, state.params),
                           opt_state=jax.tree.map(keep, opt_state, state.opt_state),
                           skipped=state.skipped + (~finite).astype(jnp.int32))
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step),
               "update_norm": optax.tree.norm(updates), "param_norm": optax.tree.norm(params),
               "finite": finite, "leaf_finite": leaf_finite, "skipped": new_state.skipped,
               "sublayer_grad_norm": sublayer_norms(grads, model.cfg)}
    return new_state, metrics
  return train_step


def interleaved(variants: dict, a) -> dict:
  """variants: name -> cfg or (cfg, donate[, make_step]). Compiles each, then `rounds` x (each variant,
  `steps` steps). With --rounds 0 only compiles, from abstract shapes: memory analysis of shapes whose
  train states would not fit in host memory side by side."""
  runs = {}
  for name, spec in variants.items():
    cfg, donate, *make = spec if isinstance(spec, tuple) else (spec, True)
    model, init, step = bu.build(cfg, donate=donate, **({"make_step": make[0]} if make else {}))
    batch = bu.random_batch(cfg)
    state = init(jax.random.key(0)) if a.rounds else jax.eval_shape(init, jax.random.key(0))
    w = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    ma = compiled.memory_analysis()
    if a.rounds:
      state, _ = bu.time_train_steps(compiled, state, batch, 0, warmup=1)
    runs[name] = {"cfg": cfg, "mc": model.cfg, "step": compiled, "state": state, "batch": batch, "times": [],
                  "compile_s": time.perf_counter() - w, "memory": memory_dict(ma)}
  for _ in range(a.rounds):
    for r in runs.values():
      r["state"], times = bu.time_train_steps(r["step"], r["state"], r["batch"], a.steps, warmup=0)
      r["times"].append(statistics.mean(times))
  out = {}
  for name, r in runs.items():
    tokens = r["cfg"].data.batch_size * r["cfg"].data.seq_len
    med = statistics.median(r["times"]) if r["times"] else float("nan")
    out[name] = {"step_s": med, "round_means_s": r["times"], "tokens_per_s": tokens / med,
                 "compile_s": r["compile_s"], "memory": r["memory"],
                 "flops_per_token": bu.matmul_flops_per_token(r["mc"])["train_flops_per_token"]}
  return out | {"_rounds": {n: r["times"] for n, r in runs.items()}}


def memory_dict(ma) -> dict | None:
  if ma is None:
    return None
  d = {k: getattr(ma, k) for k in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                                   "temp_size_in_bytes")}
  d["peak_bytes"] = (d["argument_size_in_bytes"] + d["output_size_in_bytes"] - d["alias_size_in_bytes"]
                     + d["temp_size_in_bytes"])
  return d


def ratio(res: dict, num: str, den: str) -> float:
  """Median over rounds of num/den step time (interleaved rounds share their load)."""
  r = res["_rounds"]
  return statistics.median(x / y for x, y in zip(r[num], r[den])) if r[num] else float("nan")


def clean(res: dict) -> dict:
  return {k: v for k, v in res.items() if not k.startswith("_")}


def part_overhead(a, peak: float) -> dict:
  res = interleaved({"pre_ln": shape_cfg(a, block="pre_ln"), "keel": shape_cfg(a, block="keel")}, a)
  for k in ("pre_ln", "keel"):
    res[k]["mfu"] = res[k]["flops_per_token"] * res[k]["tokens_per_s"] / peak
  over = ratio(res, "keel", "pre_ln") - 1
  return {**clean(res), "keel_overhead_pct": 100 * over, "target_pct": 10.0, "met": over <= 0.10}


def part_donate(a) -> dict:
  """The trainer's step donated / not donated, and the previous where-guard step donated / not."""
  cfg = shape_cfg(a)
  res = interleaved({"donated": (cfg, True), "not_donated": (cfg, False),
                     "where_guard_donated": (cfg, True, where_guard_step),
                     "where_guard_not_donated": (cfg, False, where_guard_step)}, a)
  peak = lambda k: res[k]["memory"]["peak_bytes"]
  return {**clean(res), "time_ratio_not_over_donated": ratio(res, "not_donated", "donated"),
          "time_ratio_where_guard_over_cond": ratio(res, "where_guard_donated", "donated"),
          "peak_bytes_saved_by_donation": peak("not_donated") - peak("donated"),
          "peak_bytes_saved_by_donation_where_guard": peak("where_guard_not_donated") - peak("where_guard_donated"),
          "state_bytes": res["donated"]["memory"]["argument_size_in_bytes"]}


def part_bf16(a) -> dict:
  res = interleaved({"float32": shape_cfg(a, dtype="float32"), "bfloat16": shape_cfg(a, dtype="bfloat16")}, a)
  return {**clean(res), "time_ratio_bf16_over_f32": ratio(res, "bfloat16", "float32")}


def part_late_metrics(a) -> dict:
  """The train loop's habit: fetch step n's metrics after dispatching step n+1, so the host's own work
  (next batch, logging) overlaps the device's. Same compiled step and iterator for both loops."""
  from keel_jax import data
  cfg = shape_cfg(a)
  _, init, step = bu.build(cfg)
  state = init(jax.random.key(0))
  tokens = np.random.default_rng(0).integers(0, 257, 200_000).astype(np.uint16)
  it = data.make_train_iterator(tokens, a.seq_len, a.batch_size, seed=0)
  state, _ = step(state, {"tokens": next(it)["tokens"]})  # compile
  jax.block_until_ready(state)

  def loop(late: bool, n: int) -> float:
    nonlocal state
    pending, start = None, time.perf_counter()
    for _ in range(n):
      state, metrics = step(state, {"tokens": next(it)["tokens"]})
      if not late:
        jax.device_get(metrics)
      elif pending is not None:
        jax.device_get(pending)
      pending = metrics
    jax.device_get(pending)
    return (time.perf_counter() - start) / n

  sync, late = [], []
  for _ in range(a.rounds):
    sync.append(loop(False, a.steps))
    late.append(loop(True, a.steps))
  return {"sync_step_s": statistics.median(sync), "late_step_s": statistics.median(late),
          "time_ratio_sync_over_late": statistics.median(s / l for s, l in zip(sync, late)),
          "rounds_sync_s": sync, "rounds_late_s": late}


def part_cache(a) -> dict:
  """Three fresh processes compiling the same step: without a cache, with an empty one, with it filled."""
  out = {}
  with tempfile.TemporaryDirectory() as d:
    for name, cache in (("no_cache", None), ("cold", d), ("warm", d)):
      env = dict(os.environ)
      env.pop("JAX_COMPILATION_CACHE_DIR", None)
      if cache:
        env["JAX_COMPILATION_CACHE_DIR"] = cache
      cmd = [sys.executable, os.path.abspath(__file__), "--_compile_probe"] + probe_args(a)
      res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
      out[name] = json.loads(res.stdout)
    out["cache_files"] = len(os.listdir(d))
  out["speedup_warm_over_no_cache"] = out["no_cache"]["total_s"] / out["warm"]["total_s"]
  return out


def probe_args(a) -> list[str]:
  return [f"--{k}={getattr(a, k)}" for k in ("blocks", "d_model", "seq_len", "batch_size", "heads", "kv_heads",
                                              "remat")]


def compile_probe(a) -> None:
  """Child of part_cache: init + step compile times in this fresh process, as JSON on stdout."""
  cfg = shape_cfg(a)
  _, init, step = bu.build(cfg)
  w = time.perf_counter()
  state = jax.block_until_ready(init(jax.random.key(0)))
  w2 = time.perf_counter()
  step.lower(state, bu.random_batch(cfg)).compile()
  w3 = time.perf_counter()
  print(json.dumps({"init_s": w2 - w, "step_compile_s": w3 - w2, "total_s": w3 - w,
                    "cache_dir": jax.config.jax_compilation_cache_dir}))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--small", action="store_true", help="seconds-long smoke run")
  p.add_argument("--only", nargs="*", default=list(PARTS), choices=PARTS)
  p.add_argument("--blocks", type=int, default=4)
  p.add_argument("--d_model", type=int, default=512)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv_heads", type=int, default=4)
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--batch_size", type=int, default=4)
  p.add_argument("--remat", default="none", help="model.remat_policy (none: fastest at this depth)")
  p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median over them); 0: memory only")
  p.add_argument("--steps", type=int, default=3, help="steps per variant per round")
  p.add_argument("--peak_n", type=int, default=4096, help="matmul size for the CPU peak")
  p.add_argument("--_compile_probe", action="store_true", help=argparse.SUPPRESS)
  a = p.parse_args()
  if a._compile_probe:
    return compile_probe(a)
  if a.small:
    a.blocks, a.d_model, a.heads, a.kv_heads, a.seq_len, a.batch_size = 1, 32, 2, 1, 16, 2
    a.rounds, a.steps, a.peak_n = 2, 1, 256
    a.only = [x for x in a.only if x != "cache"]  # three fresh processes: not seconds-long
  env = bu.env_info()
  out: dict = {"benchmark": "step_time", "env": env,
               "shape": {"block": "keel", "blocks": a.blocks, "d_model": a.d_model, "d_ff": 3 * a.d_model,
                         "heads": a.heads, "kv_heads": a.kv_heads, "seq_len": a.seq_len,
                         "batch_size": a.batch_size, "remat_policy": a.remat}}
  peak = bu.cpu_peak_flops(a.peak_n)
  out["peak"] = {"float32": peak}
  if "peak" in a.only:
    import jax.numpy as jnp
    out["peak"]["bfloat16"] = bu.cpu_peak_flops(a.peak_n, dtype=jnp.bfloat16)
  if "overhead" in a.only:
    out["overhead"] = part_overhead(a, peak["flops_per_s"])
  if "donate" in a.only:
    out["donate"] = part_donate(a)
  if "late_metrics" in a.only:
    out["late_metrics"] = part_late_metrics(a)
  if "bf16" in a.only:
    out["bf16"] = part_bf16(a)
  if "cache" in a.only:
    out["cache"] = part_cache(a)
  out["loadavg_end"] = list(os.getloadavg())
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
