"""Study 1 (paper section 3): per-sub-layer gradient norms versus depth, at init and after N steps.

For every block type and depth: the gradient norm of the LM loss w.r.t. each sub-layer's parameters
on one fixed validation batch, at initialisation and after N training steps (run through
keel_jax.train, params loaded from its checkpoint), the branch/shortcut RMS ratio of every sub-layer
at both points, and the low/high ratio along training from the trainer's per-step records. The table
also gives min/max: the smallest over the largest sub-layer norm above block 0.

Low/high ratio (keel_jax.diagnostics.gradient_ratio): geometric mean of block 1's two sub-layer norms
over that of the last block's. Block 0 is left out because Keel's first sub-layers follow their own rule (alpha 1, v2: no outer norm on the
first attention). Predictions drawn beside it: the paper's `2^(-L/2)` (Post-LN) and
`(1 + 1/alpha^2)^(-L/2)` (Keel, alpha = L), which assume branch and shortcut of equal size, and a
"ratio-corrected" one, prod over the post-norm sub-layers above block 1 of (1 + r_l^2)^(-1/2) with the
*measured* branch/shortcut ratio r_l: the same shortcut-only argument without the equal-size assumption.

  python experiments/gradient_flow.py --out out/gradient_flow --size cpu
"""
from __future__ import annotations

import functools
import math

import common
import numpy as np

SETUPS = {
    "mini": dict(depths=[4, 8], d_model=16, seq_len=16, batch_size=2, steps=2, lr=3e-3, warmup=1,
                 blocks=["post_ln", "keel"], max_files=40, train_max_depth=4, deep_blocks=["keel"]),
    # Trained runs at 1024 sub-layers only for the three blocks the paper's argument is about (CPU time).
    "cpu": dict(depths=[16, 64, 256, 1024], d_model=32, seq_len=32, batch_size=8, steps=50, lr=3e-3,
                warmup=10, blocks=list(common.BLOCKS), max_files=200, train_max_depth=256,
                deep_blocks=["pre_ln", "post_ln", "keel"]),
    # The paper's model (docs/DESIGN.md section 2.8: d_model 1024, seq 4096, bf16) at each depth, measured at the end of warmup.
    "paper": dict(depths=[16, 64, 256, 1024], steps=2500, blocks=list(common.BLOCKS)),
}


def make_config(size: str, s: dict, block: str, depth: int):
  if size == "paper":
    return common.paper_config("paper_keel_512", block=block, sub_layers=depth, num_steps=s["steps"],
                               checkpoint_every=s["steps"], eval_every=s["steps"], log_every=10)
  return common.small_config(block=block, sub_layers=depth, d_model=s["d_model"], seq_len=s["seq_len"],
                             batch_size=s["batch_size"], num_steps=s["steps"], lr=s["lr"],
                             warmup_steps=s["warmup"], max_files=s["max_files"], eval_batches=1,
                             log_every=max(s["steps"] // 50, 1))


def min_max(g) -> float:
  """Smallest over largest sub-layer gradient norm above block 0: catches a dip inside the stack that
  block 1 / last block misses (attention and FFN sub-layers mixed, so Pre-LN's banding counts too)."""
  g = np.asarray(g, np.float64)[2:]
  return float(g.min() / g.max()) if len(g) and g.max() > 0 else float("nan")


def corrected_prediction(ratios, post) -> float:
  """prod over post-norm sub-layers l >= 4 (above block 1) of (1 + r_l^2)^(-1/2), in log space."""
  r, p = np.asarray(ratios, np.float64), np.asarray(post) > 0
  return float(math.exp(-0.5 * np.sum(np.log1p(np.square(r[4:][p[4:]])))))


def paper_prediction(block: str, depth: int) -> float | None:
  if block == "post_ln":
    return 2.0 ** (-depth / 2)
  if block == "keel":
    return (1 + 1 / depth ** 2) ** (-depth / 2)  # alpha = L
  return None


def make_measure(model):
  """One jitted function for both diagnostics, compiled once per run and used at init and after training."""
  import jax
  from keel_jax import block_rules, diagnostics
  both = jax.jit(lambda p, b: (diagnostics.sublayer_grad_norms(model, p, b),
                               diagnostics.sublayer_branch_ratios(model, p, b[:, :-1])))
  post = block_rules.sublayer_schedule(model.cfg)["post"].reshape(-1)

  def measure(params, batch) -> dict:
    grads, ratios = both(params, batch)
    g, r = np.asarray(grads, np.float64), np.asarray(ratios, np.float64)
    return {"grad_norm": g, "branch_ratio": r, "low_high": diagnostics.gradient_ratio(g),
            "predicted_from_ratios": corrected_prediction(r, post)}

  return measure


def run_one(study, size, s, block, depth) -> dict:
  import jax
  from keel_jax import data
  from keel_jax.diagnostics import gradient_ratio
  from keel_jax.load import load_run
  from keel_jax.model import init_params, strip_boxes
  cfg = make_config(size, s, block, depth)
  token_data, tok = data.load_token_data(cfg.data, None)
  batch = jax.numpy.asarray(data.eval_batches(token_data.val, cfg.data.seq_len, cfg.data.batch_size, 1)[0]["tokens"])
  model = common.model_for(cfg, tok.vocab_size)
  measure = make_measure(model)
  # The trainer's init: same seed, so these are the params its step 1 starts from.
  params0 = jax.jit(lambda r: strip_boxes(init_params(model, r)))(jax.random.key(cfg.train.seed))
  init = measure(params0, batch)
  if depth > s.get("train_max_depth", depth) and block not in s.get("deep_blocks", (block,)):
    return {"block": block, "depth": depth, "init": init, "halted": None, "trained_skipped": "CPU budget"}
  workdir = study.workdir(f"{block}_L{depth}")
  run = common.train_run(cfg, workdir, study.log_path)
  out = {"block": block, "depth": depth, "init": init, "halted": run["halted"],
         "final_eval_loss": run["eval"].get("eval_loss")}
  trace = [(r["step"], gradient_ratio(r["sublayer_grad_norm"]), r["loss"]) for r in common.train_records(run["records"])
           if "sublayer_grad_norm" in r and common.finite(r["loss"])]
  out["train_trace"] = {"step": [t[0] for t in trace], "low_high": [t[1] for t in trace],
                        "loss": [t[2] for t in trace]}
  if run["halted"] is None:
    trained = load_run(workdir)
    out["trained"] = {"step": trained.step, **measure(trained.params, batch)}
  return out


def plot(study, s) -> None:
  runs = study.result["runs"]
  depths, blocks = s["depths"], s["blocks"]
  plot_per_sublayer(study, s, "grad_norm", "grad norm", "profile")
  # low/high ratio versus depth, with predictions
  fig, axes = common.figure(2, 1, w=4.6)
  grid = np.array(depths, float)
  for ax, when in zip(axes[0], ("init", "trained")):
    for b in blocks:
      ys = [runs.get(f"{b}_L{d}", {}).get(when, {}).get("low_high", np.nan) for d in depths]
      ax.loglog(grid, common.nanify(ys), "o-", color=common.block_color(b), label=f"{b} measured")
      corr = [runs.get(f"{b}_L{d}", {}).get(when, {}).get("predicted_from_ratios", np.nan) for d in depths]
      if b in ("post_ln", "keel"):
        ax.loglog(grid, common.nanify(corr), "x:", color=common.block_color(b), label=f"{b} ratio-corrected")
        ax.loglog(grid, [paper_prediction(b, d) for d in depths], "--", color=common.block_color(b),
                  label=f"{b} paper", alpha=0.6)
    ax.set(title=when, xlabel="sub-layers L", ylabel="grad norm block 1 / last block", ylim=(1e-12, 1e4))
  axes[0][1].legend(fontsize=6)
  common.savefig(fig, study.png("ratio_vs_depth"))
  # low/high ratio along training (the trainer's per-step records: the training batch, not the fixed one)
  fig, axes = common.figure(len(depths), 1, w=3.0)
  for ax, d in zip(axes[0], depths):
    for b in blocks:
      tr = runs.get(f"{b}_L{d}", {}).get("train_trace")
      if tr and tr["step"]:
        ax.semilogy(tr["step"], common.nanify(tr["low_high"]), color=common.block_color(b), lw=0.8, label=b)
    ax.set(title=f"L={d}", xlabel="step", ylabel="block 1 / last block", ylim=(1e-6, 1e2))
  axes[0][0].legend(fontsize=6)
  common.savefig(fig, study.png("ratio_vs_step"))
  plot_per_sublayer(study, s, "branch_ratio", "RMS(F) / RMS(alpha x)", "branch_ratio")


def plot_per_sublayer(study, s, key: str, ylabel: str, stem: str) -> None:
  """A run's [L] quantity `key` versus sub-layer index at the largest depth, at init and trained."""
  runs, deepest = study.result["runs"], s["depths"][-1]
  fig, axes = common.figure(2, 1, w=4.6)
  for ax, when in zip(axes[0], ("init", "trained")):
    for b in s["blocks"]:
      r = runs.get(f"{b}_L{deepest}", {}).get(when)
      if r:
        ax.semilogy(common.nanify(r[key]), label=b, color=common.block_color(b), lw=0.8)
    ax.set(title=f"{when}: L={deepest}", xlabel="sub-layer index", ylabel=ylabel)
  axes[0][0].legend(fontsize=7)
  common.savefig(fig, study.png(stem))


def grid(study, size, s):
  for depth in s["depths"]:
    for block in s["blocks"]:
      yield f"{block}_L{depth}", functools.partial(run_one, study, size, s, block, depth)


def report(study, s) -> None:
  table = {k: {"init_low_high": r["init"]["low_high"], "trained_low_high": r.get("trained", {}).get("low_high"),
               "init_min_max": min_max(r["init"]["grad_norm"]),
               "trained_min_max": min_max(r["trained"]["grad_norm"]) if "trained" in r else None,
               "init_pred_from_ratios": r["init"]["predicted_from_ratios"],
               "trained_pred_from_ratios": r.get("trained", {}).get("predicted_from_ratios"),
               "paper_prediction": paper_prediction(r["block"], r["depth"]),
               "trained_median_branch_ratio": float(np.median(common.nanify(r["trained"]["branch_ratio"])))
               if "trained" in r else None}
           for k, r in study.result["runs"].items()}
  study.save(table=table)
  plot(study, s)


if __name__ == "__main__":
  common.run_study("gradient_flow", __doc__, SETUPS, grid, report)
