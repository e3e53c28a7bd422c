"""Study 2 (paper Table 1): the largest learning rate each block type survives, at two depths.

Every run warms the LR up linearly from 0 to 5e-2 over the whole run (schedule 'linear_warmup_only',
the paper's stress test) with non-finite updates skipped (a run that skips 20 in a row is ended: it
has diverged). The loss curve is then read by `find_divergence`, our operationalisation of the paper's
rule "loss spike not recovered, stagnation, or non-finite":

  s_t     = median of the raw training loss over steps t-SMOOTH+1..t (at CPU size one batch holds 256
            tokens and the loss moves +-0.4 nats from batch to batch: a 5-step median let lucky batches
            set `best`, so the window is 20 steps; a median, not a mean, so that a spike shorter than
            SMOOTH/2 steps never enters s_t and one that recovers is not held up for SMOOTH steps)
  best_t  = min(s_1 .. s_t)
  non-finite   first step whose loss is non-finite or whose update was skipped (trainer 'nonfinite'
               event).
  spike        first step t with s_t > (1 + SPIKE_REL) * best_{t-1} after which s stays above
               (1 + RECOVER_REL) * best_{t-1} for RECOVER_WINDOW steps (or to the end of the run);
               its onset is the first step in t-SMOOTH+1..t whose raw loss crossed that threshold.
  stagnation   first step t at which best_t has improved by less than STAG_EPS nats over the previous
               STAG_WINDOW steps; its onset is t - STAG_WINDOW (when progress stopped).

Divergence = the earliest onset of the three; max LR = the LR of the step before it (the LR in force
at the last good step). A run that never diverges reports its final LR as a lower bound ('>=').
Because stagnation is the criterion most open to interpretation, the table also gives the max LR by
the non-finite and spike criteria alone (`max_lr_no_stagnation`). Verdicts are recomputed from the
stored loss curves on every invocation, so the rule can be inspected and changed without retraining.

  python experiments/max_lr.py --out out/max_lr --size cpu
"""
from __future__ import annotations

import functools

import common
import numpy as np

SPIKE_REL, RECOVER_REL, SMOOTH = 0.2, 0.05, 20
PEAK_LR = 5e-2

SETUPS = {
    "mini": dict(depths=[4], blocks=["post_ln", "keel"], d_model=16, seq_len=16, batch_size=4, steps=20,
                 max_files=40),
    # 300 steps: the LR grows 1.67e-4 per step, so that is the resolution of every max LR below.
    "cpu": dict(depths=[16, 64], blocks=list(common.BLOCKS), d_model=64, seq_len=32, batch_size=8,
                steps=300, max_files=200,
                # Added after the first results: is the gap to the paper's max LRs a width effect? Adam's
                # stable LR shrinks with width; the paper's model is 16x wider than this grid's.
                width_check=dict(depth=16, d_model=256, blocks=["pre_ln", "post_ln", "keel"])),
    # docs/DESIGN.md section 2.8: 0 -> 5e-2 over 5000 steps, 64 and 512 sub-layers (configs/paper_max_lr.py).
    "paper": dict(depths=[64, 512], blocks=list(common.BLOCKS), steps=5000),
}
# The divergence rule's windows per size (steps); kept apart from SETUPS because they do not change the
# runs, only how their stored curves are read.
RULES = {"mini": dict(recover_window=5, stag_window=10, stag_eps=0.02),
         "cpu": dict(recover_window=50, stag_window=100, stag_eps=0.02),
         "paper": dict(recover_window=250, stag_window=1000, stag_eps=0.02)}

PAPER_TABLE = {  # docs/DESIGN.md section 2.8: max LR at 64 / 512 sub-layers
    "post_ln": (3.0e-4, 2.8e-4), "deepnorm": (3.5e-4, 3.5e-4), "mix_ln": (8.6e-4, 3.5e-4),
    "pre_ln": (7.65e-3, 4.67e-3), "keel": (1.01e-2, 6.31e-3)}


def make_config(size: str, s: dict, block: str, depth: int, d_model: int | None = None):
  over = dict(num_steps=s["steps"], lr=PEAK_LR, warmup_steps=s["steps"], schedule="linear_warmup_only",
              nonfinite_policy="skip", max_consecutive_skips=20, log_every=1)
  if size == "paper":
    return common.paper_config("paper_max_lr", block=block, sub_layers=depth, **over,
                               checkpoint_every=s["steps"], eval_every=s["steps"])
  cfg = common.small_config(block=block, sub_layers=depth, d_model=d_model or s["d_model"], seq_len=s["seq_len"],
                            batch_size=s["batch_size"], num_steps=s["steps"], lr=PEAK_LR,
                            warmup_steps=s["steps"], max_files=s["max_files"], eval_batches=1)
  cfg.train.update(**over)
  return cfg


def find_divergence(steps, losses, lrs, nonfinite_steps, recover_window: int, stag_window: int,
                    stag_eps: float, criteria=("nonfinite", "spike", "stagnation")) -> dict:
  """Applies the rule in the module docstring to one run's per-step losses. Returns max_lr, the
  divergence step and reason (None if none), and the step of each criterion."""
  steps, lrs = np.asarray(steps), np.asarray(lrs, np.float64)
  raw = np.array([float(x) for x in losses], np.float64)
  n = len(raw)
  found: dict[str, int | None] = {"nonfinite": None, "spike": None, "stagnation": None}
  bad = ~np.isfinite(raw) | np.isin(steps, list(nonfinite_steps))
  if bad.any():
    found["nonfinite"] = int(np.argmax(bad))
  end = found["nonfinite"] if found["nonfinite"] is not None else n  # criteria below on finite steps only
  s = np.array([np.median(raw[max(0, i - SMOOTH + 1):i + 1]) for i in range(end)])
  best = np.minimum.accumulate(s) if end else s
  for i in range(1, end):
    threshold = (1 + SPIKE_REL) * best[i - 1]
    if s[i] > threshold and np.all(s[i:min(i + recover_window, end)] > (1 + RECOVER_REL) * best[i - 1]):
      onset = [j for j in range(max(0, i - SMOOTH + 1), i + 1) if raw[j] > threshold]
      found["spike"] = onset[0] if onset else i
      break
  for i in range(stag_window, end):
    if best[i - stag_window] - best[i] < stag_eps:
      found["stagnation"] = i - stag_window
      break
  hits = {k: v for k, v in found.items() if v is not None and k in criteria}
  out = {f"{k}_step": (int(steps[v]) if v is not None else None) for k, v in found.items()}
  if not hits:
    return {**out, "diverged": False, "reason": None, "divergence_step": None,
            "max_lr": float(lrs[-1]), "max_lr_is_lower_bound": True}
  reason = min(hits, key=hits.get)
  i = hits[reason]
  return {**out, "diverged": True, "reason": reason, "divergence_step": int(steps[i]),
          "max_lr": float(lrs[max(i - 1, 0)]), "max_lr_is_lower_bound": False}


def run_one(study, size, s, block, depth, d_model: int | None = None) -> dict:
  cfg = make_config(size, s, block, depth, d_model)
  key = f"{block}_L{depth}" + (f"_d{d_model}" if d_model else "")
  run = common.train_run(cfg, study.workdir(key), study.log_path)
  train = common.train_records(run["records"])
  nonfinite = sorted({r["step"] for r in run["records"] if r.get("kind") == "event" and r.get("event") == "nonfinite"})
  return {"block": block, "depth": depth, "d_model": cfg.model.d_model, "halted": run["halted"], "steps_run": len(train),
          "nonfinite_steps": nonfinite,
          "curve": {"step": [r["step"] for r in train], "lr": [r["lr"] for r in train],
                    "loss": [r["loss"] for r in train]}}


def verdict(r: dict, rule: dict, criteria=("nonfinite", "spike", "stagnation")) -> dict:
  c = r["curve"]
  nonfinite = r.get("nonfinite_steps")
  if nonfinite is None:  # results written before nonfinite_steps was stored
    nonfinite = [r["nonfinite_step"]] if r.get("nonfinite_step") is not None else []
  return find_divergence(c["step"], c["loss"], c["lr"], set(nonfinite), rule["recover_window"],
                         rule["stag_window"], rule["stag_eps"], criteria)


def plot(study, s) -> None:
  runs, verdicts = study.result["runs"], study.result["table"]
  w = s.get("width_check")
  panels = [(d, "", s["blocks"], s.get("d_model")) for d in s["depths"]]
  if w:
    panels.append((w["depth"], f"_d{w['d_model']}", w["blocks"], w["d_model"]))
  fig, axes = common.figure(len(panels), 1, w=4.4)
  for ax, (depth, suffix, blocks, width) in zip(axes[0], panels):
    for b in blocks:
      r = runs.get(f"{b}_L{depth}{suffix}")
      if not r:
        continue
      lr, loss = np.array(r["curve"]["lr"], float), common.nanify(r["curve"]["loss"])
      med = np.array([np.nanmedian(loss[max(0, i - SMOOTH + 1):i + 1]) for i in range(len(loss))])
      ax.plot(lr, med, color=common.block_color(b), lw=1, label=b)  # the smoothed s_t the rule reads
      v = verdicts[f"{b}_L{depth}{suffix}"]
      if v["diverged"]:
        ax.axvline(v["max_lr"], color=common.block_color(b), ls=":", lw=1)
    ax.set(title=f"{depth} sub-layers" + (f", d_model {width}" if width else ""), xlabel="learning rate (linear warmup)",
           ylabel=f"train loss, {SMOOTH}-step median",
           xscale="log", xlim=(1e-4, PEAK_LR), ylim=(0, 8))
  axes[0][0].legend(fontsize=7)
  common.savefig(fig, study.png("loss_vs_lr"))


def cell(v: dict) -> str:
  return (">= " if v["max_lr_is_lower_bound"] else "") + f"{v['max_lr']:.2e}" + (
      f" ({v['reason']} @ {v['divergence_step']})" if v["diverged"] else "")


def table_markdown(study, s) -> str:
  table = study.result["table"]
  head = ("| block | " + " | ".join(f"L={d}: max LR (rule, step) | L={d}: no stagnation" for d in s["depths"])
          + " | paper 64 / 512 |")
  lines = [head, "|" + "---|" * (2 * len(s["depths"]) + 2)]
  for b in s["blocks"]:
    cells = []
    for d in s["depths"]:
      v = table.get(f"{b}_L{d}")
      cells += ["-", "-"] if v is None else [cell(v), cell(v["no_stagnation"])]
    paper = PAPER_TABLE.get(b)
    lines.append(f"| {b} | " + " | ".join(cells) + f" | {paper[0]:.2e} / {paper[1]:.2e} |")
  return "\n".join(lines)


def grid(study, size, s):
  for depth in s["depths"]:
    for block in s["blocks"]:
      yield f"{block}_L{depth}", functools.partial(run_one, study, size, s, block, depth)
  w = s.get("width_check")
  for block in w["blocks"] if w else ():
    yield (f"{block}_L{w['depth']}_d{w['d_model']}",
           functools.partial(run_one, study, size, s, block, w["depth"], w["d_model"]))


def report(study, s) -> str:
  w = s.get("width_check")
  rule = RULES[study.size]
  table = {k: {**verdict(r, rule), "no_stagnation": verdict(r, rule, ("nonfinite", "spike"))}
           for k, r in study.result["runs"].items()}
  study.save(table=table, rule=dict(spike_rel=SPIKE_REL, recover_rel=RECOVER_REL, smooth=SMOOTH, peak_lr=PEAK_LR,
                                    **rule))
  md = table_markdown(study, s)
  if w:
    md += f"\n\nWidth check, {w['depth']} sub-layers: d_model {s['d_model']} vs {w['d_model']}\n\n"
    md += f"| block | d={s['d_model']} | d={s['d_model']} no stagnation | d={w['d_model']} | d={w['d_model']} no stagnation |\n|---|---|---|---|---|\n"
    for b in w["blocks"]:
      a, c = table[f"{b}_L{w['depth']}"], table[f"{b}_L{w['depth']}_d{w['d_model']}"]
      md += f"| {b} | {cell(a)} | {cell(a['no_stagnation'])} | {cell(c)} | {cell(c['no_stagnation'])} |\n"
  study.save(table_markdown=md)
  plot(study, s)
  return md


if __name__ == "__main__":
  common.run_study("max_lr", __doc__, SETUPS, grid, report)
