"""Study 5: accuracy versus depth on depth-sensitive synthetic tasks, Pre-LN and Keel.

Each run trains on `data.source='synthetic'` (keel_jax/data/synthetic.py) through keel_jax.train, then the
final params (from the checkpoint) are scored on held-out windows: greedy accuracy on answer positions
only (the training loss covers every position; inputs are random, so only answers are learnable).

  python experiments/synthetic_depth.py --out out/synthetic_depth --size cpu
"""
from __future__ import annotations

import functools

import common

SETUPS = {
    "mini": dict(tasks=["s5", "khop", "addition"], blocks=["keel"], depths=[2], d_model=16,
                 seq_len=16, batch_size=4, steps=4, warmup=1, lr=3e-3, eval_windows=16),
    "cpu": dict(tasks=["s5", "khop", "addition"], blocks=["pre_ln", "keel"], depths=[2, 4, 8, 16],
                d_model=64, seq_len=32, batch_size=16, steps=200, warmup=20, lr=3e-3, eval_windows=256),
    # Width 1024 at the paper's recipe, shorter windows (the tasks need no 4096-token context).
    "paper": dict(tasks=["s5", "khop", "addition"], blocks=["pre_ln", "keel"], depths=[4, 8, 16, 32, 64, 128],
                  seq_len=256, batch_size=256, steps=20_000, warmup=2500, lr=1e-3, eval_windows=4096),
}


def make_config(size: str, s: dict, task: str, block: str, depth: int):
  if size == "paper":
    cfg = common.paper_config("paper_keel_512", block=block, sub_layers=depth, num_steps=s["steps"],
                              lr=s["lr"], warmup_steps=s["warmup"], eval_every=s["steps"],
                              checkpoint_every=s["steps"])
  else:
    cfg = common.small_config(block=block, sub_layers=depth, d_model=s["d_model"], seq_len=s["seq_len"],
                              batch_size=s["batch_size"], num_steps=s["steps"], lr=s["lr"],
                              warmup_steps=s["warmup"], log_every=10, eval_batches=2)
  cfg.data.update(source="synthetic", synthetic_task=task, seq_len=s["seq_len"], batch_size=s["batch_size"])
  return cfg


def run_one(study, size, s, task, block, depth) -> dict:
  from keel_jax.data import synthetic
  from keel_jax.load import load_run
  cfg = make_config(size, s, task, block, depth)
  workdir = study.workdir(f"{task}_{block}_L{depth}")
  run = common.train_run(cfg, workdir, study.log_path)
  out = {"task": task, "block": block, "depth": depth, "eval_loss": run["eval"].get("eval_loss"),
         "halted": run["halted"], "chance": synthetic.chance_accuracy(task)}
  if run["halted"] is None:
    trained = load_run(workdir)
    tokens, answer = synthetic.eval_rows(task, cfg.data.seq_len, s["eval_windows"])
    out.update(synthetic.answer_accuracy(trained.model, trained.params, tokens, answer))
  return out


def grid(study, size, s):
  for task in s["tasks"]:
    for depth in s["depths"]:
      for block in s["blocks"]:
        yield f"{task}_{block}_L{depth}", functools.partial(run_one, study, size, s, task, block, depth)


def report(study, s) -> str:
  runs = study.result["runs"]
  acc = lambda t, b, d: runs[f"{t}_{b}_L{d}"].get("answer_accuracy", float("nan"))
  lines = ["| task | block | " + " | ".join(f"L={d}" for d in s["depths"]) + " | chance |",
           "|" + "---|" * (len(s["depths"]) + 3)]
  for t in s["tasks"]:
    for b in s["blocks"]:
      chance = runs[f"{t}_{b}_L{s['depths'][0]}"]["chance"]
      lines.append(f"| {t} | {b} | " + " | ".join(f"{acc(t, b, d):.3f}" for d in s["depths"]) + f" | {chance:.3f} |")
  md = "\n".join(lines)
  study.save(table_markdown=md)
  fig, axes = common.figure(len(s["tasks"]), 1, w=3.4)
  for ax, t in zip(axes[0], s["tasks"]):
    for b in s["blocks"]:
      ax.plot(s["depths"], [acc(t, b, d) for d in s["depths"]], "o-", color=common.block_color(b), label=b)
    ax.axhline(runs[f"{t}_{s['blocks'][0]}_L{s['depths'][0]}"]["chance"], color="gray", ls=":", lw=0.8)
    ax.set(xscale="log", title=t, xlabel="sub-layers L", ylabel="answer accuracy", ylim=(0, 1))
    ax.set_xticks(s["depths"], [str(d) for d in s["depths"]])
    ax.minorticks_off()  # log-axis minor labels ('3x10^0') clutter a handful of depths
  axes[0][0].legend(fontsize=7)
  common.savefig(fig, study.png("accuracy_vs_depth"))
  # S5-style tasks: accuracy by answer index (prefix length) at the deepest setting
  fig, axes = common.figure(len(s["tasks"]), 1, w=3.4)
  for ax, t in zip(axes[0], s["tasks"]):
    for b in s["blocks"]:
      for d in s["depths"]:
        r = runs[f"{t}_{b}_L{d}"]
        if "by_answer_index" in r:
          ax.plot(r["by_answer_index"], color=common.block_color(b), alpha=0.3 + 0.7 * d / max(s["depths"]),
                  lw=0.8, ls="-" if b == "keel" else "--", label=f"{b} L={d}")
    ax.set(title=t, xlabel="answer index in window", ylabel="accuracy", ylim=(0, 1))
  axes[0][0].legend(fontsize=5)
  common.savefig(fig, study.png("by_answer_index"))
  return md


if __name__ == "__main__":
  common.run_study("synthetic_depth", __doc__, SETUPS, grid, report)
