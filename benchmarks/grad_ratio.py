"""Lowest / highest sub-layer gradient-norm ratio, at init and after training; prints JSON.

  python benchmarks/grad_ratio.py            # post_ln, pre_ln, keel at 64 sub-layers, 100 steps (~5 min)
  python benchmarks/grad_ratio.py --small    # seconds-long smoke run

g = keel_jax.diagnostics.sublayer_grad_norms(model, params, batch): the L2 norm of the LM-loss
gradient w.r.t. each sub-layer's parameters, in depth order attn_0, ffn_0, attn_1, ..., ffn_{B-1}
(L = 2B entries), on one fixed validation batch of the embedded default corpus (stdlib, bytes).
Ratios reported (all "low over high", 1 = flat, << 1 = vanishing at the bottom; the block ratios are
keel_jax.diagnostics.gradient_ratio):
  low_high   = sqrt(g[0] g[1]) / sqrt(g[L-2] g[L-1])   lowest block's two sub-layers over the highest's
               (geometric means); the headline number.
  first_last = g[0] / g[L-1]                             first attention over last FFN.
  block1_high = sqrt(g[2] g[3]) / sqrt(g[L-2] g[L-1])    as low_high but from block 1: Keel's block 0
               follows its own rule (alpha 1, no outer norm on attn_0), so this isolates the stack.
Training: keel_jax's AdamW (b 0.9/0.95, wd 0.01, clip 1.0) with `schedule=linear_warmup_only`: linear
warm-up over `--warmup` steps to `--lr`, then flat, so the steps after warm-up run at exactly lr.
`trajectory` holds low_high from the train step's own per-step sub-layer norms (on the training batch).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

import bench_util as bu
from keel_jax import data
from keel_jax.diagnostics import gradient_ratio, sublayer_grad_norms


def ratios(g) -> dict[str, float]:
  g = np.asarray(g, np.float64)
  return {"low_high": gradient_ratio(g, low_block=0), "first_last": g[0] / g[-1],
          "block1_high": gradient_ratio(g, low_block=1)}


def run_block(block: str, a, token_data) -> dict:
  cfg = bu.make_cfg(block=block, num_blocks=a.blocks, d_model=a.d_model, seq_len=a.seq_len,
                    batch_size=a.batch_size, lr=a.lr, remat_policy="none")
  cfg.train.update(schedule="linear_warmup_only", warmup_steps=a.warmup, num_steps=a.steps, seed=a.seed)
  model, init, step = bu.build(cfg)
  grad_norms = jax.jit(lambda p, t: sublayer_grad_norms(model, p, t))
  eval_batch = data.eval_batches(token_data.val, a.seq_len, a.batch_size, 1)[0]["tokens"]
  it = data.make_train_iterator(token_data.train, a.seq_len, a.batch_size, a.seed)
  state = init(jax.random.key(a.seed))
  g0 = np.asarray(grad_norms(state.params, eval_batch))
  start, traj, losses = time.perf_counter(), [], []
  for i in range(a.steps):
    state, m = step(state, {"tokens": next(it)["tokens"]})
    if (i + 1) % a.record_every == 0 or i + 1 == a.steps:
      m = jax.device_get(m)
      traj.append({"step": i + 1, "loss": float(m["loss"]), "lr": float(m["lr"]),
                   "low_high": ratios(m["sublayer_grad_norm"])["low_high"]})
  train_s = time.perf_counter() - start
  g1 = np.asarray(grad_norms(state.params, eval_batch))
  return {"block": block, "sub_layers": 2 * a.blocks, "init": ratios(g0), "trained": ratios(g1),
          "final_loss": traj[-1]["loss"], "train_s": train_s, "trajectory": traj,
          "g_init": np.round(g0, 6).tolist(), "g_trained": np.round(g1, 6).tolist()}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--small", action="store_true", help="seconds-long smoke run")
  p.add_argument("--blocks_types", nargs="*", default=["post_ln", "pre_ln", "keel"])
  p.add_argument("--blocks", type=int, default=32, help="Transformer blocks (sub-layers = 2x)")
  p.add_argument("--d_model", type=int, default=64)
  p.add_argument("--seq_len", type=int, default=64)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--warmup", type=int, default=10)
  p.add_argument("--record_every", type=int, default=10)
  p.add_argument("--max_files", type=int, default=300, help="stdlib files read (tokenising all takes a while)")
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args()
  if a.small:
    a.blocks_types, a.blocks, a.d_model, a.seq_len, a.batch_size = ["post_ln", "keel"], 2, 32, 16, 4
    a.steps, a.warmup, a.record_every, a.max_files = 3, 1, 1, 20
  env = bu.env_info()
  cfg = bu.make_cfg(seq_len=a.seq_len, batch_size=a.batch_size)
  cfg.data.update(source="stdlib", tokenizer="byte", max_files=a.max_files, eval_batches=1)
  token_data, _ = data.load_token_data(cfg.data)
  rows = [run_block(b, a, token_data) for b in a.blocks_types]
  out = {"benchmark": "grad_ratio", "env": env, "loadavg_end": list(os.getloadavg()),
         "setup": {"blocks": a.blocks, "sub_layers": 2 * a.blocks, "d_model": a.d_model, "d_ff": 3 * a.d_model,
                   "seq_len": a.seq_len, "batch_size": a.batch_size, "steps": a.steps, "lr": a.lr,
                   "warmup_steps": a.warmup, "schedule": "linear_warmup_only", "data": "stdlib bytes",
                   "max_files": a.max_files, "seed": a.seed},
         "summary": {r["block"]: {"init_low_high": r["init"]["low_high"],
                                  "trained_low_high": r["trained"]["low_high"]} for r in rows},
         "rows": rows}
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
