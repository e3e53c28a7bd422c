"""Study 3 (paper section 5.2): final validation loss per block type over a grid of peak LRs, one depth.

Each run: linear warmup then cosine decay to 1e-7 (the library's default schedule), AdamW as in the
paper; the number is the trainer's final eval loss (nats per token on held-out files). A run that
halts on non-finite values is reported as diverged (plotted at the top of the axis).

  python experiments/lr_sweep.py --out out/lr_sweep --size cpu
"""
from __future__ import annotations

import functools

import common

SETUPS = {
    "mini": dict(depth=4, lrs=[1e-3, 1e-2], blocks=["keel"], d_model=16, seq_len=16,
                 batch_size=4, steps=6, warmup=2, max_files=40),
    "cpu": dict(depth=16, lrs=[1e-3, 3e-3, 1e-2, 3e-2], blocks=list(common.BLOCKS), d_model=64,
                seq_len=64, batch_size=8, steps=150, warmup=15, max_files=200),
    # The paper's model (docs/DESIGN.md section 2.8) at 64 sub-layers, a short run (10k steps, 2500 warmup) per LR.
    "paper": dict(depth=64, lrs=[3e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2], blocks=list(common.BLOCKS),
                  steps=10_000, warmup=2500),
}


def make_config(size: str, s: dict, block: str, lr: float):
  if size == "paper":
    return common.paper_config("paper_keel_512", block=block, sub_layers=s["depth"], num_steps=s["steps"],
                               lr=lr, warmup_steps=s["warmup"], eval_every=s["steps"],
                               checkpoint_every=s["steps"])
  return common.small_config(block=block, sub_layers=s["depth"], d_model=s["d_model"], seq_len=s["seq_len"],
                             batch_size=s["batch_size"], num_steps=s["steps"], lr=lr,
                             warmup_steps=s["warmup"], max_files=s["max_files"], log_every=10)


def run_one(study, size, s, block, lr) -> dict:
  run = common.train_run(make_config(size, s, block, lr), study.workdir(f"{block}_lr{lr:g}"), study.log_path)
  train = common.train_records(run["records"])
  return {"block": block, "lr": lr, "eval_loss": run["eval"].get("eval_loss"),
          "final_train_loss": train[-1]["loss"] if train else None, "halted": run["halted"],
          "nonfinite_events": sum(r.get("event") == "nonfinite" for r in run["records"]),
          "loss_spike_events": sum(r.get("event") == "loss_spike" for r in run["records"])}


def grid(study, size, s):
  for block in s["blocks"]:
    for lr in s["lrs"]:
      yield f"{block}_lr{lr:g}", functools.partial(run_one, study, size, s, block, lr)


def report(study, s) -> str:
  runs = study.result["runs"]
  loss = lambda b, lr: runs[f"{b}_lr{lr:g}"]["eval_loss"]
  best = {}
  for b in s["blocks"]:
    ok = [(loss(b, lr), lr) for lr in s["lrs"] if common.finite(loss(b, lr))]
    best[b] = {"best_lr": min(ok)[1], "best_eval_loss": min(ok)[0]} if ok else None
  lines = ["| block | " + " | ".join(f"lr {lr:g}" for lr in s["lrs"]) + " | best |",
           "|" + "---|" * (len(s["lrs"]) + 2)]
  for b in s["blocks"]:
    cells = [f"{loss(b, lr):.3f}" if common.finite(loss(b, lr)) else "diverged" for lr in s["lrs"]]
    lines.append(f"| {b} | " + " | ".join(cells) + (f" | {best[b]['best_eval_loss']:.3f} @ {best[b]['best_lr']:g} |"
                                                      if best[b] else " | - |"))
  md = "\n".join(lines)
  study.save(best=best, table_markdown=md)
  fig, axes = common.figure()
  ax = axes[0][0]
  for b in s["blocks"]:
    ax.plot(s["lrs"], common.nanify([loss(b, lr) for lr in s["lrs"]]), "o-", color=common.block_color(b), label=b)
  ax.set(xscale="log", xlabel="peak learning rate", ylabel="final eval loss (nats/token)",
         title=f"{s['depth']} sub-layers")
  ax.legend(fontsize=7)
  common.savefig(fig, study.png("loss_vs_lr"))
  return md


if __name__ == "__main__":
  common.run_study("lr_sweep", __doc__, SETUPS, grid, report)
