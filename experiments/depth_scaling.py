"""Study 4 (paper section 5.3): validation loss versus depth at fixed width and token budget.

Pre-LN and Keel at every depth, the other blocks at a subset (CPU time); one fixed peak LR for all
(chosen before any result, not tuned per block: the paper's comparison is at a shared recipe).

  python experiments/depth_scaling.py --out out/depth_scaling --size cpu
"""
from __future__ import annotations

import functools

import common

SETUPS = {
    "mini": dict(depths={"pre_ln": [2, 4], "keel": [2]}, d_model=16, seq_len=16, batch_size=4, steps=6,
                 warmup=2, lr=3e-3, max_files=40),
    "cpu": dict(depths={"pre_ln": [4, 8, 16, 32, 64], "keel": [4, 8, 16, 32, 64], "post_ln": [8, 32, 64],
                        "deepnorm": [8, 32, 64], "mix_ln": [8, 32, 64]},
                d_model=64, seq_len=64, batch_size=8, steps=150, warmup=15, lr=3e-3, max_files=200,
                # Added after the first results (Keel flat in depth, Post-LN improving): is alpha = L too
                # large a shortcut weight for a 150-step budget? Same run with other keel_alpha rules.
                alpha_check=dict(depth=64, alphas=["sqrt_L", "1"])),
    # The paper's model and recipe (docs/DESIGN.md section 2.8), 20k steps per depth.
    "paper": dict(depths={b: [16, 64, 128, 256, 512, 1024] for b in ("pre_ln", "keel")} |
                  {b: [16, 64, 256] for b in ("post_ln", "deepnorm", "mix_ln")}, steps=20_000, lr=1e-3),
}


def make_config(size: str, s: dict, block: str, depth: int):
  if size == "paper":
    return common.paper_config("paper_keel_512", block=block, sub_layers=depth, num_steps=s["steps"],
                               lr=s["lr"], eval_every=s["steps"], checkpoint_every=s["steps"])
  return common.small_config(block=block, sub_layers=depth, d_model=s["d_model"], seq_len=s["seq_len"],
                             batch_size=s["batch_size"], num_steps=s["steps"], lr=s["lr"],
                             warmup_steps=s["warmup"], max_files=s["max_files"], log_every=10)


def run_one(study, size, s, block, depth, alpha: str | None = None) -> dict:
  cfg = make_config(size, s, block, depth)
  if alpha is not None:
    cfg.model.keel_alpha = alpha
  key = f"{block}_L{depth}" + (f"_alpha{alpha}" if alpha is not None else "")
  run = common.train_run(cfg, study.workdir(key), study.log_path)
  train = common.train_records(run["records"])
  return {"block": block, "depth": depth, "keel_alpha": cfg.model.keel_alpha, "eval_loss": run["eval"].get("eval_loss"),
          "final_train_loss": train[-1]["loss"] if train else None, "halted": run["halted"],
          "loss_spike_events": sum(r.get("event") == "loss_spike" for r in run["records"])}


def grid(study, size, s):
  # Shallow first across blocks: an interrupted grid still has a comparable table.
  for depth in sorted({d for ds in s["depths"].values() for d in ds}):
    for block, ds in s["depths"].items():
      if depth in ds:
        yield f"{block}_L{depth}", functools.partial(run_one, study, size, s, block, depth)
  a = s.get("alpha_check")
  for alpha in a["alphas"] if a else ():
    yield f"keel_L{a['depth']}_alpha{alpha}", functools.partial(run_one, study, size, s, "keel", a["depth"], alpha)


def report(study, s) -> str:
  a = s.get("alpha_check")
  runs = study.result["runs"]
  all_depths = sorted({d for ds in s["depths"].values() for d in ds})
  lines = ["| block | " + " | ".join(f"L={d}" for d in all_depths) + " |", "|" + "---|" * (len(all_depths) + 1)]
  for b, ds in s["depths"].items():
    cells = []
    for d in all_depths:
      r = runs.get(f"{b}_L{d}")
      cells.append("-" if r is None else (f"{r['eval_loss']:.3f}" if common.finite(r["eval_loss"]) else "diverged"))
    lines.append(f"| {b} | " + " | ".join(cells) + " |")
  md = "\n".join(lines)
  if a:
    md += f"\n\nKeel's shortcut weight at {a['depth']} sub-layers:\n\n| keel_alpha | eval loss |\n|---|---|\n"
    for alpha in ["L"] + a["alphas"]:
      r = runs[f"keel_L{a['depth']}" + ("" if alpha == "L" else f"_alpha{alpha}")]
      md += f"| {alpha} | {r['eval_loss']:.3f} |\n"
  study.save(table_markdown=md)
  fig, axes = common.figure()
  ax = axes[0][0]
  for b, ds in s["depths"].items():
    ax.plot(ds, common.nanify([runs[f"{b}_L{d}"]["eval_loss"] for d in ds]), "o-", color=common.block_color(b), label=b)
  ax.set(xscale="log", xlabel="sub-layers L", ylabel="final eval loss (nats/token)",
         title=f"d_model {s.get('d_model', 1024)}, {s['steps']} steps")
  ax.set_xticks(all_depths, [str(d) for d in all_depths])
  ax.minorticks_off()  # log-axis minor labels ('3x10^0') clutter a handful of depths
  ax.legend(fontsize=7)
  common.savefig(fig, study.png("loss_vs_depth"))
  return md


if __name__ == "__main__":
  common.run_study("depth_scaling", __doc__, SETUPS, grid, report)
