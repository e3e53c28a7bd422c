"""Depth x step heatmaps of a run's per-sub-layer telemetry (the "telemetry" records of metrics.jsonl).

  python -m keel_jax.plot_telemetry --workdir W [--out W/telemetry.png]

One panel per quantity (gradient norm, update/param ratio, branch/shortcut RMS ratio), log10 colour
scale, sub-layer index (attn_0, ffn_0, attn_1, ...) up the y axis, training step along x.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from keel_jax.metrics import read_records

TITLES = {"sublayer_grad_norm": "gradient norm", "update_param_ratio": "||update|| / ||params||",
          "branch_ratio": "RMS(F) / RMS(alpha x)"}


def telemetry_arrays(records: list[dict]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Steps [S] and, per quantity, a [L, S] array (non-finite entries as NaN) from metrics.jsonl records."""
  tele = [r for r in records if r.get("kind") == "telemetry"]
  steps = np.array([r["step"] for r in tele], np.int64)
  arrays = {k: np.array([[float(x) for x in r[k]] for r in tele], np.float64).T
            for k in TITLES if tele and k in tele[0]}
  return steps, arrays


def plot(workdir: str, out: str | None = None) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  steps, arrays = telemetry_arrays(read_records(workdir))
  if not len(steps):
    raise SystemExit(f"no telemetry records in {os.path.join(workdir, 'metrics.jsonl')} "
                     "(train with train.telemetry_every > 0)")
  fig, axes = plt.subplots(1, len(arrays), figsize=(4.2 * len(arrays), 3.4), squeeze=False)
  # Cell edges: step s's column spans from the previous telemetry step to s.
  x = np.concatenate([[max(2 * steps[0] - steps[1], 0) if len(steps) > 1 else steps[0] - 1], steps])
  for ax, (k, a) in zip(axes[0], arrays.items()):
    with np.errstate(divide="ignore", invalid="ignore"):
      z = np.log10(np.where(a > 0, a, np.nan))
    mesh = ax.pcolormesh(x, np.arange(a.shape[0] + 1), z, shading="flat", cmap="viridis")
    fig.colorbar(mesh, ax=ax, label="log10")
    ax.set(title=TITLES[k], xlabel="step", ylabel="sub-layer")
  fig.suptitle(os.path.basename(os.path.normpath(workdir)), fontsize=9)
  fig.tight_layout()
  out = out or os.path.join(workdir, "telemetry.png")
  fig.savefig(out, dpi=72)
  plt.close(fig)
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="a training run's directory (holds metrics.jsonl)")
  p.add_argument("--out", default=None, help="PNG path (default: WORKDIR/telemetry.png)")
  args = p.parse_args()
  print(plot(args.workdir, args.out))


if __name__ == "__main__":
  main()
