"""Tokens/s and MFU of a width-2048, 64-block bfloat16 Keel model at sequence 2048 (GPU/TPU); JSON.

  # on a lent GPU / TPU (~6-9 min of the 15; one command, JSON rewritten after every variant):
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONPATH=. python benchmarks/accelerator_mfu.py \
      --out $OUT/mfu.json --profile_dir $OUT/trace
  python benchmarks/accelerator_mfu.py --small    # CPU smoke run (tiny model)

The accelerator images have jax/flax/optax but not grain or ml-collections, so this builds
`ModelConfig` directly (no config_lib) and imports only modules that need neither: the step is
keel_jax.train_step's, the one training runs.
For each variant (remat policy x per-device batch) in order, while `--budget_s` lasts: compile
(ahead of time, with XLA's memory estimate; a variant that cannot fit is skipped, an OOM is recorded),
2 warm-up steps, `--steps` timed steps; then tokens/s, model TFLOP/s and MFU = analytic model FLOPs
(6 x weights + causal attention per token, remat recompute not counted) x tokens/s / peak, where peak
is the device's dense bfloat16 peak (keel_jax.tpu_slices for TPUs, else PEAKS). Then, if time
remains, a breakdown of the best variant: forward only, forward + backward, full step (the
optimiser's share is the difference).
The JSON is also written to --out after every variant, so a run cut short still leaves numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from keel_jax import tpu_slices
from keel_jax.flops import matmul_flops_per_token
from keel_jax.model import Decoder, init_params, lm_loss, strip_boxes
from keel_jax.model_config import ModelConfig
from keel_jax.optimizer import lr_schedule, make_optimizer
from keel_jax.train_step import init_state, make_train_step

# Dense (no sparsity) bfloat16 peak FLOP/s per GPU (and TPU v3), from the vendors' data sheets. Matched against
# jax's device_kind by substring, first match wins (so the specific names come first). TPU chips
# come from keel_jax.tpu_slices, matched by their exact device_kind.
PEAKS = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("GB200", 2500e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12),
    ("A10", 125e12), ("TPU v3", 123e12),
)


def device_peak(kind: str) -> float | None:
  tpu = tpu_slices.generation_of(kind)
  if tpu is not None:
    return tpu.peak_bf16_flops
  for name, peak in PEAKS:
    if name.lower() in kind.lower():
      return peak
  return None


def model_flops_per_token(mc: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token: 3 x (2 per weight in the matmuls + causal QK^T and PV)."""
  return matmul_flops_per_token(mc, seq_len)["train_flops_per_token"]


def model_config(a, remat: str) -> ModelConfig:
  return ModelConfig(vocab_size=a.vocab, block=a.block, num_blocks=a.blocks, d_model=a.d_model,
                     num_heads=a.heads, num_kv_heads=a.kv_heads, d_ff=a.d_ff, max_seq_len=a.seq_len,
                     remat_policy=remat, dtype=a.dtype, norm_impl=a.norm_impl, scan_groups=a.scan_groups)


def memory_stats() -> dict:
  try:
    s = jax.devices()[0].memory_stats() or {}
  except Exception:  # CPU and some plugins have none
    s = {}
  return {k: s[k] for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit") if k in s}


def run_variant(a, remat: str, batch: int, peak: float | None, deadline: float) -> dict:
  mc = model_config(a, remat)
  train_cfg = types.SimpleNamespace(lr=3e-4, warmup_steps=100, num_steps=10_000, lr_floor=1e-7, schedule="cosine",
                                    b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01, clip_norm=1.0)
  model, tx, schedule = Decoder(mc), make_optimizer(train_cfg), lr_schedule(train_cfg)
  step_fn = make_train_step(model, tx, schedule)
  rec = {"remat_policy": remat, "batch_per_device": batch, "tokens_per_step": batch * a.seq_len}
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, a.vocab, (batch, a.seq_len + 1)), jnp.int32)
  state = jax.jit(lambda r: init_state(model, tx, r))(jax.random.key(0))
  rec["params"] = int(sum(x.size for x in jax.tree.leaves(state.params)))
  step = jax.jit(step_fn, donate_argnums=0)
  w = time.perf_counter()
  compiled = step.lower(state, {"tokens": tokens}).compile()
  rec["compile_s"] = time.perf_counter() - w
  ma = compiled.memory_analysis()
  if ma is not None:
    rec["xla_peak_bytes"] = (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
                             + ma.temp_size_in_bytes)
    rec["xla_temp_bytes"] = ma.temp_size_in_bytes
  limit = memory_stats().get("bytes_limit")
  if limit and rec.get("xla_peak_bytes", 0) > limit:
    return rec | {"skipped": f"XLA estimate {rec['xla_peak_bytes'] / 2**30:.1f} GiB > limit {limit / 2**30:.1f} GiB"}
  times = []
  for i in range(2 + a.steps):
    if time.time() > deadline and i >= 3:
      break
    w = time.perf_counter()
    state, m = compiled(state, {"tokens": tokens})
    loss = float(m["loss"])
    if i >= 2:
      times.append(time.perf_counter() - w)
  if a.profile_dir and not os.path.exists(a.profile_dir):  # a trace of 2 steps of the first variant run
    jax.profiler.start_trace(a.profile_dir)
    for _ in range(2):
      state, m = compiled(state, {"tokens": tokens})
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    rec["profile_dir"] = a.profile_dir
  med = statistics.median(times)
  fpt = model_flops_per_token(mc, a.seq_len)
  tps = batch * a.seq_len / med
  rec.update(step_s=med, step_times_s=times, tokens_per_s=tps, model_flops_per_token=fpt,
             model_tflops_per_s=fpt * tps / 1e12, mfu=(fpt * tps / peak) if peak else None, last_loss=loss,
             memory_stats=memory_stats())
  return rec


def breakdown(a, rec: dict) -> dict:
  """Forward / forward+backward times of the variant in `rec` (the optimiser = step - fwd_bwd).
  Fresh params only: the variant's train state is gone, so the device holds no second copy."""
  model = Decoder(model_config(a, rec["remat_policy"]))
  params = jax.jit(lambda r: strip_boxes(init_params(model, r)))(jax.random.key(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, a.vocab, (rec["batch_per_device"], a.seq_len + 1)),
                       jnp.int32)
  fwd = jax.jit(lambda p, t: lm_loss(model, p, t))
  fwd_bwd = jax.jit(jax.grad(lambda p, t: lm_loss(model, p, t)))
  out = {}
  for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
    jax.block_until_ready(fn(params, tokens))
    ts = []
    for _ in range(max(a.steps // 2, 2)):
      w = time.perf_counter()
      jax.block_until_ready(fn(params, tokens))
      ts.append(time.perf_counter() - w)
    out[f"{name}_s"] = statistics.median(ts)
  out["optimizer_and_rest_s"] = rec["step_s"] - out["fwd_bwd_s"]
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--small", action="store_true", help="CPU smoke run with a tiny model")
  p.add_argument("--out", default="", help="also write the JSON here (after every variant)")
  p.add_argument("--block", default="keel")
  p.add_argument("--blocks", type=int, default=64)
  p.add_argument("--d_model", type=int, default=2048)
  p.add_argument("--d_ff", type=int, default=6144, help="3 x d_model, the paper's 2048/6144 shape")
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--kv_heads", type=int, default=8)
  p.add_argument("--seq_len", type=int, default=2048)
  p.add_argument("--vocab", type=int, default=32768)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--norm_impl", default="xla", help="xla | pallas | auto")
  p.add_argument("--scan_groups", type=int, default=0)
  p.add_argument("--variants", nargs="*", default=["full:0", "save_dots_no_batch:0", "full:2x"],
                 help="remat:batch; batch 0 = auto from device memory (8 at >= 96 GiB, else 4); 2x = twice auto")
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--profile_dir", default="", help="write a profiler trace of 2 steps of the first variant here")
  p.add_argument("--budget_s", type=float, default=480, help="start no new work after this many seconds")
  a = p.parse_args()
  if a.small:
    a.blocks, a.d_model, a.d_ff, a.heads, a.kv_heads, a.seq_len, a.vocab = 2, 32, 96, 2, 1, 16, 64
    a.dtype, a.variants, a.steps, a.budget_s = "float32", ["full:2", "save_dots_no_batch:2"], 2, 120
  start = time.time()
  dev = jax.devices()[0]
  kind = dev.device_kind
  peak = device_peak(kind)
  peak_source = "PEAKS table (dense bf16)"
  if peak is None:  # CPU or an unlisted chip: measure a large matmul instead, as the CPU benchmarks do
    n = 512 if a.small else 8192
    x = jnp.ones((n, n), jnp.bfloat16 if a.dtype == "bfloat16" else jnp.float32)
    mm = jax.jit(lambda u: u @ u)
    jax.block_until_ready(mm(x))
    w = time.perf_counter()
    jax.block_until_ready(mm(x))
    peak, peak_source = 2 * n ** 3 / (time.perf_counter() - w), f"measured {n}^3 matmul"
  limit = memory_stats().get("bytes_limit", 0)
  auto_batch = 8 if limit >= 96 * 2**30 else 4  # H200 / 141 GB at 0.75 mem fraction: 98 GiB
  out = {"benchmark": "accelerator_mfu", "env": {"loadavg": list(os.getloadavg()), "backend": jax.default_backend(),
         "device_kind": kind, "device_count": jax.device_count(), "jax": jax.__version__,
         "time": time.strftime("%Y-%m-%d %H:%M:%S")},
         "peak_flops_per_s": peak, "peak_source": peak_source,
         "shape": {"block": a.block, "blocks": a.blocks, "d_model": a.d_model, "d_ff": a.d_ff, "heads": a.heads,
                   "kv_heads": a.kv_heads, "seq_len": a.seq_len, "vocab": a.vocab, "dtype": a.dtype,
                   "norm_impl": a.norm_impl, "scan_groups": a.scan_groups},
         "variants": [], "target_mfu": 0.45}

  def dump():
    text = json.dumps(out, indent=1, default=str)
    if a.out:
      with open(a.out, "w") as f:
        f.write(text)
    return text

  deadline, best = start + a.budget_s, None
  for v in a.variants:
    if time.time() > deadline:
      out["variants"].append({"variant": v, "skipped": "time budget"})
      continue
    remat, b = v.split(":")
    batch = {"0": auto_batch, "2x": 2 * auto_batch}.get(b) or int(b)
    try:
      rec = run_variant(a, remat, batch, peak, deadline)
    except Exception as e:  # an OOM (RESOURCE_EXHAUSTED) on one variant must not lose the others
      rec = {"remat_policy": remat, "batch_per_device": batch, "error": f"{type(e).__name__}: {str(e)[:600]}"}
    out["variants"].append(rec | {"variant": v})
    if "tokens_per_s" in rec and (best is None or rec["tokens_per_s"] > best["tokens_per_s"]):
      best = rec
    jax.clear_caches()  # drop the variant's executables before compiling the next
    dump()
  if best is not None:
    out["best"] = {k: best[k] for k in ("remat_policy", "batch_per_device", "tokens_per_s", "mfu",
                                        "model_tflops_per_s")}
    if time.time() < deadline:
      try:
        out["breakdown"] = breakdown(a, best)
      except Exception as e:
        out["breakdown"] = {"error": f"{type(e).__name__}: {str(e)[:600]}"}
  out["elapsed_s"] = time.time() - start
  out["loadavg_end"] = list(os.getloadavg())
  print(dump())


if __name__ == "__main__":
  main()
