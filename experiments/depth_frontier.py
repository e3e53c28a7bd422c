"""The depth frontier: Keel and the baselines from 64 to 10,000 sub-layers, where the paper's claims live.

Two parts, each a grid of runs through the library's trainer:

  grid     every block x L sub-layers x seeds at one peak LR, plus more LRs (seed 0) at some depths
           for the max stable LR. Narrow and short (width 32, 8 x 32 bytes per step): depth is cheap
           with the scanned stack, width and tokens are not.
  deepest  configs/keel_10k.py (5,000 blocks = 10,000 sub-layers) for Keel, Pre-LN and Post-LN at the
           same budget, each in its own process: step time, peak RSS (of that process) and compile
           time (a separate ahead-of-time compile of the same train step) are recorded.

Per run: final training loss (mean of the last 10 steps), best and final validation loss, and flags:
  diverged     non-finite loss or skipped update, or a loss spike that does not recover (the max-LR
               study's rule, experiments/max_lr.py `find_divergence`, without its stagnation part);
  stagnated    the 20-step median training loss never fell below the unigram entropy of the training
               data (the model never used context);
  no_context   the best validation loss is not below that of the context-free (unigram) model on the
               same validation batches: the run ended at the unigram level.
Max stable LR (per block and depth with several LRs): the largest LR whose seed-0 run has none of the
three flags. The theory overlay: the gradient ratio block 1 / last block
(keel_jax.diagnostics.gradient_ratio, on the trainer's per-step sub-layer gradient norms, geometric mean over the last 10 steps)
beside the paper's prediction for the block and depth (`paper_prediction`: Post-LN 2^(-L/2), Keel
prod alpha / sqrt(alpha^2 + 1) with alpha = L).

  python experiments/depth_frontier.py --out out/depth_frontier --size cpu --part grid --publish docs/results
  python experiments/depth_frontier.py --out out/depth_frontier --size cpu --part deepest --publish docs/results
      (or one block per process: --part deepest --blocks keel, --blocks pre_ln, ...)
  python experiments/depth_frontier.py --out out/depth_frontier --size cpu --part publish --publish docs/results

Reruns reuse finished runs (a killed deepest run resumes from its checkpoint). `--publish DIR` writes
DIR/depth_frontier.json (a `runs` list and the `deepest` entry, merged from both parts) and the PNGs.
"""
from __future__ import annotations

import argparse
import functools
import glob
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time

import common
import ml_collections
import numpy as np
from gradient_flow import paper_prediction
from max_lr import find_divergence

from keel_jax import diagnostics

SETUPS = {
    "smoke": dict(blocks=["keel"], sublayers=[4], seeds=[0, 1], lr=3e-3,
                  extra_lrs={4: [1e-2]}, d_model=16, seq_len=16, batch_size=4, steps=12, warmup=2,
                  eval_every=6, max_files=40, telemetry_every=0,
                  deepest=dict(blocks=["keel"], arg="num_blocks=8,scan_groups=2,num_steps=8,warmup_steps=2,"
                               "log_every=2,eval_every=4,checkpoint_every=8,telemetry_every=4,max_files=40")),
    "cpu": dict(blocks=list(common.BLOCKS), sublayers=[64, 256, 1024, 2048], seeds=[0, 1, 2], lr=3e-3,
                seeds_deep=[0],  # 2048 sub-layers: one seed (CPU time)
                extra_lrs={256: [1e-3, 1e-2], 1024: [1e-3, 1e-2]}, d_model=32, seq_len=32, batch_size=8,
                steps=200, warmup=20, eval_every=50, max_files=200,
                telemetry_every=0,  # its own compile per run: kept for the deepest runs' heatmaps
                deepest=dict(blocks=["keel", "pre_ln", "post_ln"], arg="")),
}
SMOOTH, LAST = 20, 10
# What every grid run shares (a finished run is reused only if these match); blocks, depths, seeds and
# LRs are part of each run's key, so the grid can grow without rerunning it.
RUN_SETUP = ("d_model", "seq_len", "batch_size", "steps", "warmup", "eval_every", "max_files", "telemetry_every")


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="output directory: JSON per part, PNGs, runs/")
  p.add_argument("--size", default="cpu", choices=sorted(SETUPS), help="smoke: < 3 min (tests); cpu: this machine")
  p.add_argument("--part", default="all", choices=["grid", "deepest", "all", "publish"],
                 help="publish: no runs, only the tables, PNGs and JSON from the runs finished so far")
  p.add_argument("--publish", default=None, help="also write depth_frontier.json and the PNGs here (docs/results)")
  p.add_argument("--seeds", default=None,
                 help="grid: run only these seeds (comma-separated) in a study file of their own, so that "
                 "several processes can share the grid; the default (every seed) and any set with seed 0 use the main file")
  p.add_argument("--blocks", default=None,
                 help="deepest: run only these blocks (comma-separated); processes running different blocks share "
                 "one study file")
  p.add_argument("--fresh", action="store_true", help="ignore results already in --out and rerun every run")
  return p.parse_args()


def unigram_entropy(tokens: np.ndarray) -> float:
  """Entropy in nats of the token frequencies of `tokens`: the loss of the best context-free model."""
  return unigram_cross_entropy(tokens, tokens)


def data_entropy(data_cfg) -> float:
  from keel_jax import data
  token_data, _ = data.load_token_data(data_cfg, None)
  return unigram_entropy(token_data.train)


def unigram_cross_entropy(train_tokens: np.ndarray, eval_targets: np.ndarray) -> float:
  """Loss in nats of the context-free model (the training tokens' frequencies) on `eval_targets`."""
  counts = np.bincount(np.asarray(train_tokens).ravel())
  p = counts / counts.sum()
  eval_targets = np.asarray(eval_targets).ravel()
  q = np.zeros(eval_targets.max() + 1 if eval_targets.size else 0)
  q[:min(len(p), len(q))] = p[:len(q)]
  with np.errstate(divide="ignore"):  # a byte never seen in training: infinite loss, as it should be
    return float(-np.mean(np.log(q[eval_targets])))


@functools.lru_cache(maxsize=None)
def _unigram_eval_loss(data_json: str) -> float:
  from keel_jax import data
  data_cfg = ml_collections.ConfigDict(json.loads(data_json))
  token_data, _ = data.load_token_data(data_cfg, None)
  batches = data.eval_batches(token_data.val, data_cfg.seq_len, data_cfg.batch_size, data_cfg.eval_batches)
  return unigram_cross_entropy(token_data.train, np.concatenate([np.asarray(b["tokens"])[:, 1:] for b in batches]))


def unigram_eval_loss(data_cfg) -> float:
  """What a model that ignores context scores on the trainer's validation batches: a run whose best
  validation loss is not below it learned byte frequencies and nothing else. Computed once per data config
  (the grid and the deepest runs share theirs)."""
  return _unigram_eval_loss(data_cfg.to_json())


def grad_ratio(records: list[dict]) -> float:
  """Geometric mean of `diagnostics.gradient_ratio` over the last LAST training records' sub-layer gradient norms
  (0 when a ratio is 0: the bottom gradient underflowed float32)."""
  r = [diagnostics.gradient_ratio(x["sublayer_grad_norm"]) for x in records[-LAST:] if "sublayer_grad_norm" in x]
  r = [x for x in r if math.isfinite(x)]
  if not r:
    return float("nan")
  return 0.0 if min(r) == 0 else float(np.exp(np.mean(np.log(r))))  # 0: vanished to float32 zero


def step_seconds(records: list[dict], tokens_per_step: int) -> float:
  """Median seconds per step over the training records after the first (which holds the compile)."""
  tps = [float(r["tokens_per_sec"]) for r in records[1:] if common.finite(r.get("tokens_per_sec"))]
  return float(tokens_per_step / np.median(tps)) if tps else float("nan")


def summarize(records: list[dict], entropy: float, halted, tokens_per_step: int, steps: int) -> dict:
  """The per-run numbers every part reports, from a run's metrics.jsonl records."""
  train = common.train_records(records)
  evals = [(r["step"], float(r["eval_loss"])) for r in records if r.get("kind") == "eval"]
  loss = common.nanify([r["loss"] for r in train])
  med = np.array([np.nanmedian(loss[max(0, i - SMOOTH + 1):i + 1]) for i in range(len(loss))])
  nonfinite = {r["step"] for r in records if r.get("kind") == "event" and r.get("event") == "nonfinite"}
  div = find_divergence([r["step"] for r in train], [r["loss"] for r in train], [r["lr"] for r in train],
                        nonfinite, recover_window=max(steps // 8, 5), stag_window=steps, stag_eps=0.0,
                        criteria=("nonfinite", "spike")) if train else {"diverged": True, "reason": "no steps"}
  finite_evals = [e for _, e in evals if math.isfinite(e)]
  return {"final_train_loss": float(np.mean(loss[-LAST:])) if len(loss) else float("nan"),
          "best_eval_loss": min(finite_evals) if finite_evals else float("nan"),
          "final_eval_loss": evals[-1][1] if evals else float("nan"),
          "eval_curve": evals, "halted": halted,
          "diverged": bool(halted) or bool(div["diverged"]), "divergence": div.get("reason"),
          "stagnated": bool(not np.any(med < entropy)), "unigram_entropy": entropy,
          "grad_ratio": grad_ratio(train), "steps_run": train[-1]["step"] if train else 0,
          "step_s": step_seconds(train, tokens_per_step),
          "loss_curve": {"step": [r["step"] for r in train][::5], "median": med[::5].tolist()}}


# ---- grid ----------------------------------------------------------------------------------------

def grid_runs(s: dict) -> list[tuple[str, int, int, float]]:
  """(block, sub-layers, seed, lr) in the order they run: main LR seed by seed from shallow to deep
  (the done-bar cells), then the extra LRs, then the deepest grid depth."""
  deep = s["sublayers"][-1] if "seeds_deep" in s else None
  out = [(b, L, seed, s["lr"]) for seed in s["seeds"] for L in s["sublayers"] if L != deep for b in s["blocks"]]
  out += [(b, L, 0, lr) for L, lrs in s["extra_lrs"].items() for lr in lrs for b in s["blocks"]]
  if deep:
    out += [(b, deep, seed, s["lr"]) for seed in s["seeds_deep"] for b in s["blocks"]]
  return out


def grid_data_config(s: dict):
  """The data every grid run trains and evaluates on (the model fields do not change it)."""
  return common.small_config(block="keel", sub_layers=4, d_model=s["d_model"], seq_len=s["seq_len"],
                             batch_size=s["batch_size"], num_steps=1, lr=s["lr"], warmup_steps=0,
                             max_files=s["max_files"]).data


def deepest_config(s: dict, block: str):
  """(`arg`, config): configs/keel_10k.py for `block` with this size's overrides."""
  arg = ",".join(filter(None, [f"block={block}", s["deepest"]["arg"]]))
  return arg, common.load_config_file("keel_10k", arg)


def mark_context(runs: list[dict], data_cfg) -> None:
  """Adds `unigram_eval_loss` (the context-free model on the same validation batches) and `no_context`
  (the best validation loss is not below it) to each run."""
  if runs:
    ref = unigram_eval_loss(data_cfg)
    for r in runs:
      r["unigram_eval_loss"], r["no_context"] = ref, not float(r["best_eval_loss"]) < ref


def run_key(block: str, L: int, seed: int, lr: float) -> str:
  return f"{block}_L{L}_s{seed}_lr{lr:g}"


def run_grid_one(study, s: dict, entropy: float, block: str, L: int, seed: int, lr: float) -> dict:
  cfg = common.small_config(block=block, sub_layers=L, d_model=s["d_model"], seq_len=s["seq_len"],
                            batch_size=s["batch_size"], num_steps=s["steps"], lr=lr, warmup_steps=s["warmup"],
                            max_files=s["max_files"], seed=seed, eval_every=s["eval_every"],
                            nonfinite_policy="skip", max_consecutive_skips=10,
                            telemetry_every=s["telemetry_every"])
  run = common.train_run(cfg, study.workdir(run_key(block, L, seed, lr)), study.log_path)
  tokens = s["batch_size"] * s["seq_len"]
  return {"block": block, "sublayers": L, "seed": seed, "lr": lr, "steps": s["steps"],
          "predicted_grad_ratio": paper_prediction(block, L),
          **summarize(run["records"], entropy, run["halted"], tokens, s["steps"])}


# ---- deepest -------------------------------------------------------------------------------------

def compile_seconds(cfg) -> float:
  """Lower + compile of the trainer's train step for `cfg` (abstract state: nothing is allocated)."""
  import flax.linen as nn
  import jax
  from keel_jax import sharding
  from keel_jax.optimizer import lr_schedule, make_optimizer
  from keel_jax.train_step import create_state, make_train_step
  model = common.model_for(cfg, 257)
  tx, schedule = make_optimizer(cfg.train), lr_schedule(cfg.train)
  mesh = sharding.make_mesh(cfg.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    init_fn, shardings, _ = create_state(model, tx, mesh, jax.random.key(0))
    state = jax.eval_shape(init_fn, jax.random.key(0))
    batch = {"tokens": jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len + 1), jax.numpy.int32)}
    t = time.perf_counter()
    jax.jit(make_train_step(model, tx, schedule), donate_argnums=0).lower(state, batch).compile()
    return time.perf_counter() - t


def run_deepest_one(study, s: dict, block: str) -> dict:
  """configs/keel_10k.py for `block` in a child process (its own peak RSS); resumes a killed run."""
  arg, cfg = deepest_config(s, block)
  workdir = study.workdir(block)
  cmd = [sys.executable, "-m", "keel_jax.train", "--config", os.path.join(common.ROOT, "configs", f"keel_10k.py:{arg}"),
         "--workdir", workdir]
  study.log("deepest:", " ".join(cmd))
  env = {**os.environ, "PYTHONPATH": common.ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  t = time.perf_counter()
  with open(study.log_path, "a") as sink:
    child = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
    _, status, usage = os.wait4(child.pid, 0)
  wall = time.perf_counter() - t
  code = os.waitstatus_to_exitcode(status)
  if code not in (0, 3):  # 3: halted on non-finite values, a result
    raise RuntimeError(f"{' '.join(cmd)} exited with {code}; see {study.log_path}")
  from keel_jax import metrics
  records = metrics.read_records(workdir)
  entropy = data_entropy(cfg.data)
  tokens = cfg.data.batch_size * cfg.data.seq_len
  out = {"block": block, "sublayers": 2 * cfg.model.num_blocks, "blocks": cfg.model.num_blocks,
         "d_model": cfg.model.d_model, "steps": cfg.train.num_steps, "lr": cfg.train.lr,
         "command": " ".join(["python -m keel_jax.train --config", f"configs/keel_10k.py:{arg}", "--workdir W"]),
         "predicted_grad_ratio": paper_prediction(block, 2 * cfg.model.num_blocks),
         **summarize(records, entropy, "exit code 3" if code == 3 else None, tokens, cfg.train.num_steps),
         "wall_s": wall, "peak_rss_gib": usage.ru_maxrss / 2 ** 20, "compile_s": compile_seconds(cfg)}
  out["below_unigram"] = out["final_train_loss"] < entropy
  return out


# ---- tables, plots, the published JSON -----------------------------------------------------------

def load_part(out_dir: str, name: str) -> dict:
  path = os.path.join(out_dir, f"{name}.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f).get("runs", {})


def spread(xs) -> str:
  xs = [x for x in xs if common.finite(x)]
  if not xs:
    return "-"
  return f"{np.mean(xs):.3f} ({min(xs):.2f}-{max(xs):.2f})" if len(xs) > 1 else f"{xs[0]:.3f}"


def max_stable_lr(runs: list[dict], block: str, L: int) -> str | None:
  cell = sorted((r for r in runs if r["block"] == block and r["sublayers"] == L and r["seed"] == 0),
                key=lambda r: r["lr"])
  if len(cell) < 2:
    return None
  ok = [r["lr"] for r in cell if not (r["diverged"] or r["stagnated"] or r.get("no_context"))]
  if not ok:
    return f"< {cell[0]['lr']:g}"
  return (">= " if ok[-1] == cell[-1]["lr"] else "") + f"{ok[-1]:g}"


def tables(s: dict, runs: list[dict], deepest: list[dict]) -> str:
  main = [r for r in runs if r["lr"] == s["lr"]]
  Ls = sorted({r["sublayers"] for r in main})
  head = "| block | " + " | ".join(f"L={L}" for L in Ls) + " |\n|" + "---|" * (len(Ls) + 1) + "\n"
  def cell_rows(fn):
    rows = ""
    for b in s["blocks"]:
      cells = []
      for L in Ls:
        rs = [r for r in main if r["block"] == b and r["sublayers"] == L]
        cells.append(fn(rs) if rs else "-")
      rows += f"| {b} | " + " | ".join(cells) + " |\n"
    return rows
  flags = lambda rs: f"{len(rs)} seeds" + "".join(f", {sum(r[k] for r in rs)} {k}" for k in ("diverged", "stagnated", "no_context")
                                                   if any(r[k] for r in rs))
  ratio = lambda rs: (f"{np.exp(np.nanmean(np.log(common.nanify([r['grad_ratio'] for r in rs])))):.2g}"
                      + (f" / {rs[0]['predicted_grad_ratio']:.2g}" if rs[0]["predicted_grad_ratio"] is not None else ""))
  md = f"Best validation loss (nats/byte), LR {s['lr']:g}, mean (min-max) over seeds:\n\n" + head + cell_rows(
      lambda rs: spread([r["best_eval_loss"] for r in rs]))
  md += f"\nFinal training loss (mean of the last {LAST} steps), mean (min-max) over seeds:\n\n" + head + cell_rows(
      lambda rs: spread([r["final_train_loss"] for r in rs]))
  md += "\nRuns and flags:\n\n" + head + cell_rows(flags)
  md += "\nGradient ratio block 1 / last block at the end of training (geometric mean over seeds) / paper prediction:\n\n"
  md += head + cell_rows(ratio)
  lr_Ls = sorted(s["extra_lrs"])
  lrs = sorted({s["lr"], *sum(s["extra_lrs"].values(), [])})
  if lr_Ls:
    md += "\nMax stable LR (seed 0; largest LR of " + ", ".join(
        f"{lr:g}" for lr in lrs) + " that neither diverged, stagnated nor ended at the unigram level):\n\n"
    md += "| block | " + " | ".join(f"L={L}" for L in lr_Ls) + " |\n|" + "---|" * (len(lr_Ls) + 1) + "\n"
    for b in s["blocks"]:
      md += f"| {b} | " + " | ".join(max_stable_lr(runs, b, L) or "-" for L in lr_Ls) + " |\n"
    md += "\nBest validation loss per LR (seed 0; * = not below the unigram model's):\n\n| block | L | "
    md += " | ".join(f"LR {lr:g}" for lr in lrs) + " |\n|" + "---|" * (len(lrs) + 2) + "\n"
    for L in lr_Ls:
      for b in s["blocks"]:
        cell = {r["lr"]: r for r in runs if r["block"] == b and r["sublayers"] == L and r["seed"] == 0}
        md += f"| {b} | {L} | " + " | ".join(
            f"{float(cell[lr]['best_eval_loss']):.3f}" + ("*" if cell[lr].get("no_context") else "") if lr in cell else "-"
            for lr in lrs) + " |\n"
  if deepest:
    md += ("\nDeepest runs:\n\n| block | sub-layers | steps | final train loss | unigram entropy | best val loss / unigram "
           "| grad ratio / predicted | step s | peak RSS GiB | compile s | wall min |\n|" + "---|" * 11 + "\n")
    for r in deepest:
      pred = f"{r['predicted_grad_ratio']:.2g}" if r["predicted_grad_ratio"] is not None else "-"
      f = lambda k: float(r[k])  # non-finite numbers are stored as strings
      md += (f"| {r['block']} | {r['sublayers']} | {r['steps_run']} | {f('final_train_loss'):.3f} | "
             f"{f('unigram_entropy'):.3f} | {f('best_eval_loss'):.3f} / {f('unigram_eval_loss'):.3f} | {f('grad_ratio'):.2g} / {pred} | "
             f"{f('step_s'):.2f} | {f('peak_rss_gib'):.2f} | {f('compile_s'):.1f} | {f('wall_s') / 60:.1f} |\n")
  return md


def plots(s: dict, runs: list[dict], deepest: list[dict], png) -> list[str]:
  written = []
  main = [r for r in runs if r["lr"] == s["lr"]]
  Ls = sorted({r["sublayers"] for r in main})
  if not Ls:
    return written
  entropy = next((r["unigram_entropy"] for r in runs), None)  # references: training loss ...
  unigram_val = next((r["unigram_eval_loss"] for r in runs if "unigram_eval_loss" in r), None)  # ... validation loss
  reference = {"final_train_loss": (entropy, "unigram entropy"), "best_eval_loss": (unigram_val, "unigram model")}
  # best validation loss versus depth, spread over seeds
  fig, axes = common.figure(2, 1, w=4.6)
  for ax, key in zip(axes[0], ("best_eval_loss", "final_train_loss")):
    for b in s["blocks"]:
      xs, mean, lo, hi = [], [], [], []
      for L in Ls:
        v = [r[key] for r in main if r["block"] == b and r["sublayers"] == L and common.finite(r[key])]
        if v:
          xs.append(L), mean.append(np.mean(v)), lo.append(np.mean(v) - min(v)), hi.append(max(v) - np.mean(v))
      if xs:
        ax.errorbar(xs, mean, yerr=[lo, hi], fmt="o-", capsize=3, color=common.block_color(b), label=b)
    ref, label = reference[key]
    if ref:
      ax.axhline(ref, color="gray", ls=":", lw=1, label=label)
    ax.set(xscale="log", xlabel="sub-layers L", ylabel=key.replace("_", " ") + " (nats)",
           title=f"LR {s['lr']:g}, {s['steps']} steps, min-max over seeds")
    ax.set_xticks(Ls, [str(L) for L in Ls])
    ax.minorticks_off()
  for ax in axes[0]:
    ax.legend(fontsize=7)
  common.savefig(fig, png("loss_vs_depth")); written.append(png("loss_vs_depth"))
  # training curves per depth (20-step median; seeds as separate thin lines)
  fig, axes = common.figure(len(Ls), 1, w=3.4)
  for ax, L in zip(axes[0], Ls):
    for b in s["blocks"]:
      for i, r in enumerate(r for r in main if r["block"] == b and r["sublayers"] == L):
        c = r["loss_curve"]
        ax.plot(c["step"], common.nanify(c["median"]), color=common.block_color(b), lw=0.8, label=b if i == 0 else None)
    if entropy:
      ax.axhline(entropy, color="gray", ls=":", lw=1)
    ax.set(title=f"L={L}", xlabel="step", ylabel="train loss (20-step median)", ylim=(1.5, 6))
  axes[0][0].legend(fontsize=6)
  common.savefig(fig, png("curves")); written.append(png("curves"))
  # the theory overlay
  fig, axes = common.figure(w=6, h=4.2)
  ax = axes[0][0]
  for b in s["blocks"]:
    rs = [r for r in main if r["block"] == b]
    ax.loglog([r["sublayers"] for r in rs], np.maximum(common.nanify([r["grad_ratio"] for r in rs]), 1e-30), "o", ms=3,
              color=common.block_color(b), label=f"{b} measured")
    grid = Ls + sorted({r["sublayers"] for r in deepest})
    pred = [paper_prediction(b, L) for L in grid]
    if pred and pred[0] is not None:
      ax.loglog(grid, np.maximum(pred, 1e-30), "--", color=common.block_color(b), lw=1, label=f"{b} paper")
  for r in deepest:
    ax.loglog([r["sublayers"]], np.maximum(common.nanify([r["grad_ratio"]]), 1e-30), "*", ms=9,
              color=common.block_color(r["block"]))
  ax.set(xlabel="sub-layers L", ylabel="grad norm block 1 / last block", ylim=(1e-30, 1e3),
         title="end of training; stars: deepest runs; all floored at 1e-30")
  ax.legend(fontsize=6)
  common.savefig(fig, png("grad_ratio")); written.append(png("grad_ratio"))
  # loss versus LR at the depths with several LRs
  lr_Ls = [L for L in sorted(s["extra_lrs"]) if any(r["sublayers"] == L and r["lr"] != s["lr"] for r in runs)]
  if lr_Ls:
    fig, axes = common.figure(len(lr_Ls), 1, w=3.8)
    for ax, L in zip(axes[0], lr_Ls):
      for b in s["blocks"]:
        rs = sorted((r for r in runs if r["block"] == b and r["sublayers"] == L and r["seed"] == 0), key=lambda r: r["lr"])
        ax.plot([r["lr"] for r in rs], common.nanify([r["best_eval_loss"] for r in rs]), "o-",
                color=common.block_color(b), label=b)
      if unigram_val:
        ax.axhline(unigram_val, color="gray", ls=":", lw=1)
      ax.set(xscale="log", title=f"L={L}, seed 0; dotted: unigram model", xlabel="peak LR", ylabel="best val loss (nats)")
    axes[0][0].legend(fontsize=6)
    common.savefig(fig, png("loss_vs_lr")); written.append(png("loss_vs_lr"))
  return written


def plot_deepest(deepest: list[dict], png) -> list[str]:
  if not deepest:
    return []
  fig, axes = common.figure()
  ax = axes[0][0]
  for r in deepest:
    c = r["loss_curve"]
    ax.plot(c["step"], common.nanify(c["median"]), color=common.block_color(r["block"]), label=r["block"])
  ax.axhline(deepest[0]["unigram_entropy"], color="gray", ls=":", lw=1, label="unigram entropy")
  ax.set(title=f"{deepest[0]['sublayers']} sub-layers", xlabel="step", ylabel="train loss (20-step median)")
  ax.legend(fontsize=7)
  common.savefig(fig, png("deepest"))
  return [png("deepest")]


def publish(args, s: dict) -> None:
  """Merges both parts' results into the tables, the PNGs and (with --publish) the committed JSON."""
  from keel_jax import plot_telemetry
  grid = {}
  for path in sorted(glob.glob(os.path.join(args.out, "depth_frontier_grid*.json"))):  # the main file and --seeds files
    grid.update(load_part(args.out, os.path.basename(path)[:-len(".json")]))
  deep = load_part(args.out, "depth_frontier_deepest")
  runs = [grid[run_key(*k)] for k in grid_runs(s) if run_key(*k) in grid]
  deepest = [deep[b] for b in s["deepest"]["blocks"] if b in deep]
  mark_context(runs, grid_data_config(s))
  mark_context(deepest, deepest_config(s, "keel")[1].data)
  dirs = [args.out] + ([args.publish] if args.publish else [])
  for d in dirs:
    os.makedirs(d, exist_ok=True)
  png = lambda stem: os.path.join(args.out, f"depth_frontier_{stem}.png")
  written = plots(s, runs, deepest, png) + plot_deepest(deepest, png)
  for r in deepest:  # depth x step heatmaps of the deepest runs' telemetry
    wd = os.path.join(args.out, "runs", "depth_frontier_deepest", r["block"])
    if os.path.exists(os.path.join(wd, "metrics.jsonl")):
      written.append(plot_telemetry.plot(wd, png(f"telemetry_{r['block']}_{r['sublayers']}")))
  md = tables(s, runs, deepest)
  slim = lambda r: {k: v for k, v in r.items() if k not in ("loss_curve",)}
  doc = {"study": "depth_frontier", "size": args.size, "setup": common.jsonable(s), "tables_markdown": md,
         "runs": [slim(r) for r in runs], "deepest": slim(next((r for r in deepest if r["block"] == "keel"), {})) or None,
         "deepest_baselines": [slim(r) for r in deepest if r["block"] != "keel"],
         "grid_run_seconds": round(sum(r.get("seconds", 0) for r in runs), 1),
         "deepest_run_seconds": round(sum(r.get("seconds", 0) for r in deepest), 1)}
  for d in dirs:
    tmp = os.path.join(d, "depth_frontier.json.tmp")
    with open(tmp, "w") as f:
      json.dump(common.jsonable(doc), f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(d, "depth_frontier.json"))
    if d != args.out:
      for p in written:
        shutil.copy(p, os.path.join(d, os.path.basename(p)))
  print(md, flush=True)


def safe_publish(args, s: dict, study) -> None:
  """publish() between runs: a failure to draw or tabulate partial results is logged, never ends the grid."""
  try:
    publish(args, s)
  except Exception as e:  # noqa: BLE001 - the runs matter more than an intermediate table
    study.log(f"publish failed ({type(e).__name__}: {e}); the runs go on")


def main() -> None:
  args = parse_args()
  s = SETUPS[args.size]
  if args.part in ("grid", "all"):
    seeds = None if args.seeds is None else {int(x) for x in args.seeds.split(",")}
    name = "depth_frontier_grid" + ("" if seeds is None or 0 in seeds else "_seeds" + "_".join(map(str, sorted(seeds))))
    study = common.Study(name, argparse.Namespace(out=args.out, size=args.size, fresh=args.fresh),
                         {k: s[k] for k in RUN_SETUP})
    entropy = None
    for block, L, seed, lr in grid_runs(s):
      if seeds is not None and seed not in seeds:
        continue
      if run_key(block, L, seed, lr) not in study.result["runs"] and entropy is None:
        entropy = data_entropy(grid_data_config(s))
      study.run(run_key(block, L, seed, lr), lambda: run_grid_one(study, s, entropy, block, L, seed, lr))
      safe_publish(args, s, study)
  if args.part in ("deepest", "all"):
    study = common.Study("depth_frontier_deepest", argparse.Namespace(out=args.out, size=args.size, fresh=args.fresh),
                         {"arg": s["deepest"]["arg"]})
    blocks = s["deepest"]["blocks"] if args.blocks is None else args.blocks.split(",")
    unknown = sorted(set(blocks) - set(s["deepest"]["blocks"]))
    if unknown:
      raise SystemExit(f"--blocks: {unknown} not in this size's deepest blocks {s['deepest']['blocks']}")
    for block in blocks:
      study.run(block, lambda: run_deepest_one(study, s, block))
      safe_publish(args, s, study)
  publish(args, s)
  print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB")


if __name__ == "__main__":
  main()
