"""Why Keel's gradient vanishes at 10,000 sub-layers: the outer norms' gains compound along the stream.

A Keel sub-layer is x' = g * normalize(alpha * x + F(N_in(x))) with alpha = L. With the shortcut that
large, x' ~ g * x / rms(x): every outer norm's gain g (one per channel) multiplies the stream, and L of
them compound. At initialisation g = 1 and the gradient is flat, as the paper argues. Once the gains
differ across channels, the product over the sub-layers above sub-layer k reweights the stream's
channels by exp(sum_j log g_j), and the backward pass through each norm (whose Jacobian removes the
component along the stream it normalises) loses gradient where that reweighting is uneven.

Two parts:
  init     Keel at initialisation, each outer (norm_out) or inner (norm_in) gain multiplied by
           1 + sigma * N(0, 1), independently per sub-layer and channel or coherently (one draw per
           channel for every sub-layer): the gradient ratio block 1 / last block
           (keel_jax.diagnostics.gradient_ratio) per depth, sigma and perturbation. Only the outer
           gains should matter, the coherent ones most.
  trained  the Keel runs the depth frontier trained in the same --out directory (its grid and its
           10,000-sub-layer run): per sub-layer, the spread over channels of the compounded log-gain
           from that sub-layer to the top, next to the gradient norm the trainer logged last; and how
           coherent the sub-layers' gain profiles are (`gain_coherence`): small per-sub-layer spreads
           that all favour the same channels compound linearly in L, independent ones as sqrt(L).

  python experiments/gain_spread.py --out out/depth_frontier --size cpu
"""
from __future__ import annotations

import functools
import glob
import os

import common
import numpy as np

SETUPS = {
    "mini": dict(depths=[8], sigmas=[0.0, 0.3], d_model=16, seq_len=16, batch_size=2),
    "cpu": dict(depths=[256, 1024, 10000], sigmas=[0.0, 0.01, 0.03, 0.1], d_model=32, seq_len=32, batch_size=8),
}
SETUPS["paper"] = SETUPS["cpu"]  # an analysis of CPU-sized models: the same at every size
PERTURBATIONS = (("norm_out", "coherent"), ("norm_out", "independent"), ("norm_in", "independent"))


def perturb_gains(params, norm: str, sigma: float, key, coherent: bool = False):
  """`params` with every layer's `norm` gain multiplied by 1 + sigma * N(0, 1): independent draws per
  sub-layer and channel, or (`coherent`) one draw per channel shared by every sub-layer, as training moves them."""
  import jax
  from flax.traverse_util import flatten_dict, unflatten_dict
  flat = flatten_dict(params)
  keys = jax.random.split(key, len(flat))
  def noise(v, r):
    return jax.random.normal(key, v.shape[-1:]) if coherent else jax.random.normal(r, v.shape)
  return unflatten_dict({k: v * (1 + sigma * noise(v, r)) if k[-2:] == (norm, "scale") else v
                         for (k, v), r in zip(flat.items(), keys)})


def run_init(s: dict, depth: int) -> dict:
  import jax
  from keel_jax import diagnostics
  from keel_jax.model import init_params, strip_boxes
  cfg = common.small_config(block="keel", sub_layers=depth, d_model=s["d_model"], seq_len=s["seq_len"],
                            batch_size=s["batch_size"], num_steps=1, lr=3e-3, warmup_steps=0)
  model = common.model_for(cfg, 257)
  tokens = jax.random.randint(jax.random.key(1), (s["batch_size"], s["seq_len"] + 1), 0, 256)
  params = strip_boxes(init_params(model, jax.random.key(0)))
  grad_norms = jax.jit(lambda p: diagnostics.sublayer_grad_norms(model, p, tokens))
  out = {"depth": depth}
  for norm, mode in PERTURBATIONS:
    for sigma in s["sigmas"]:
      p = perturb_gains(params, norm, sigma, jax.random.key(2), coherent=mode == "coherent")
      g = np.asarray(grad_norms(p))
      out[f"{norm}_{mode}_sigma{sigma:g}"] = {"ratio": diagnostics.gradient_ratio(g), "grad_norm": g[::max(depth // 200, 1)]}
  return out


def compounded_log_gain_spread(gains_LxD: np.ndarray) -> np.ndarray:
  """[L]: std over channels of sum_{j >= k} log g_j, the reweighting of the stream from sub-layer k to the top."""
  above = np.cumsum(np.log(np.abs(gains_LxD))[::-1], axis=0)[::-1]
  return above.std(axis=1)


def gain_coherence(gains_LxD: np.ndarray) -> float:
  """How alike the sub-layers' channel profiles of log g are: the spread of the sum over sub-layers over L
  times the mean per-sub-layer spread. 1: every sub-layer reweights the same channels (the spreads add
  up, L x); about 1/sqrt(L): independent profiles (they add up as a random walk)."""
  log_g = np.log(np.abs(gains_LxD))
  return float(log_g.sum(axis=0).std() / (len(log_g) * log_g.std(axis=1).mean()))


def run_trained(workdir: str) -> dict:
  from keel_jax import metrics
  from keel_jax.load import load_run
  from keel_jax.model import layer_stack
  run = load_run(workdir)
  stack = layer_stack(run.params, run.model_cfg)
  # [blocks, 2, D] -> [L, D] in depth order (attn, ffn per block)
  gains = np.stack([np.asarray(stack[k]["norm_out"]["scale"]) for k in ("attn", "ffn")], axis=1)
  gains = gains.reshape(-1, gains.shape[-1])
  last = [r for r in common.train_records(metrics.read_records(workdir)) if "sublayer_grad_norm" in r][-1]
  L = len(gains)
  every = max(L // 500, 1)
  return {"workdir": os.path.relpath(workdir), "block": run.model_cfg.block, "sublayers": L, "step": run.step,
          "gain_std": gains.std(axis=1)[::every], "coherence": gain_coherence(gains),
          "mean_log_gain_std": float(np.log(np.abs(gains)).std(axis=1).mean()),
          "compounded_spread": compounded_log_gain_spread(gains)[::every],
          "grad_norm": common.nanify(last["sublayer_grad_norm"])[::every], "grad_step": last["step"], "every": every}


def trained_workdirs(out: str) -> list[str]:
  """The depth frontier's trained Keel runs in `out` with a checkpoint: per grid depth the run at LR
  3e-3 with the lowest seed found, then the deepest run."""
  finished = lambda w: glob.glob(os.path.join(w, "checkpoints", "*"))
  by_depth = {}
  for w in glob.glob(os.path.join(out, "runs", "depth_frontier_grid*", "keel_L*_s*_lr0.003")):
    depth, seed = (int(x[1:]) for x in os.path.basename(w).split("_")[1:3])
    if finished(w) and seed < by_depth.get(depth, (None, 1 << 30))[1]:
      by_depth[depth] = (w, seed)
  deepest = [w for w in glob.glob(os.path.join(out, "runs", "depth_frontier_deepest", "keel")) if finished(w)]
  return [by_depth[d][0] for d in sorted(by_depth)] + deepest


def grid(study, size, s):
  for depth in s["depths"]:
    yield f"init_L{depth}", functools.partial(run_init, s, depth)
  for workdir in trained_workdirs(study.out):
    deepest = os.path.basename(os.path.dirname(workdir)) == "depth_frontier_deepest"
    yield "trained_" + ("deepest_keel" if deepest else os.path.basename(workdir)), functools.partial(run_trained, workdir)


def report(study, s) -> str:
  runs = study.result["runs"]
  init = [runs[f"init_L{d}"] for d in s["depths"] if f"init_L{d}" in runs]
  md = "Gradient ratio block 1 / last block at initialisation, gains multiplied by 1 + sigma * N(0, 1) (coherent: the same draw for every sub-layer):\n\n"
  md += "| sub-layers | gains | " + " | ".join(f"sigma {x:g}" for x in s["sigmas"]) + " |\n"
  md += "|" + "---|" * (len(s["sigmas"]) + 2) + "\n"
  for r in init:
    for norm, mode in PERTURBATIONS:
      md += f"| {r['depth']} | {norm}, {mode} | " + " | ".join(
          f"{float(r[f'{norm}_{mode}_sigma{x:g}']['ratio']):.3g}" for x in s["sigmas"]) + " |\n"
  fig, axes = common.figure(2, 1, w=4.4)
  for i, r in enumerate(init):  # colour: depth; line style: perturbation
    for (norm, mode), ls in zip(PERTURBATIONS, ("-", "--", ":")):
      axes[0][0].plot(s["sigmas"], np.maximum(common.nanify([r[f"{norm}_{mode}_sigma{x:g}"]["ratio"] for x in s["sigmas"]]),
                                              1e-30), "o" + ls, color=f"C{i}", label=f"L={r['depth']} {norm} {mode}")
  axes[0][0].set(yscale="log", xlabel="gain spread sigma", ylabel="grad ratio block 1 / last (floored at 1e-30)",
                 title="Keel at init, perturbed gains")
  axes[0][0].legend(fontsize=6)
  for r in init:
    g = common.nanify(r[f"norm_out_coherent_sigma{s['sigmas'][1]:g}"]["grad_norm"])
    axes[0][1].semilogy(np.linspace(0, 1, len(g)), np.maximum(g, 1e-30), label=f"L={r['depth']}")
  axes[0][1].set(xlabel="sub-layer / L (floored at 1e-30)", ylabel="grad norm",
                 title=f"norm_out gains, coherent, sigma {s['sigmas'][1]:g}")
  axes[0][1].legend(fontsize=6)
  common.savefig(fig, study.png("init"))
  trained = sorted((r for k, r in runs.items() if k.startswith("trained_")), key=lambda r: r["sublayers"])
  if trained:
    md += "\nTrained Keel runs: outer gains and gradient (sub-layer k = 0 at the bottom):\n\n"
    md += ("| run | step | log-gain std over channels (mean over sub-layers) | coherence | compounded log-gain spread "
           "at k = 0 / L/2 | grad norm k = 0 / L/2 / top |\n|---|---|---|---|---|---|\n")
    fig, axes = common.figure(2, 1, w=4.4)
    for r in trained:
      spread, g = common.nanify(r["compounded_spread"]), common.nanify(r["grad_norm"])
      x = 1 + np.arange(len(spread)) * r["every"]
      md += (f"| {r['workdir']} | {r['step']} | {float(r['mean_log_gain_std']):.3g} | {float(r['coherence']):.2f} "
             f"| {spread[0]:.3g} / {spread[len(spread) // 2]:.3g} "
             f"| {g[0]:.2g} / {g[len(g) // 2]:.2g} / {g[-1]:.2g} |\n")
      axes[0][0].plot(x, spread, label=f"L={r['sublayers']}")
      axes[0][1].semilogy(x, np.maximum(g, 1e-30), label=f"L={r['sublayers']} (step {r['grad_step']})")
    axes[0][0].set(xlabel="sub-layer k (1 = bottom)", ylabel="std over channels of sum_{j>=k} log g_j", xscale="log",
                   title="trained Keel: compounded outer gains")
    axes[0][1].set(xlabel="sub-layer k (1 = bottom)", ylabel="grad norm (floored at 1e-30)", xscale="log",
                   title="trained Keel: gradient per sub-layer")
    for ax in axes[0]:
      ax.legend(fontsize=6)
    common.savefig(fig, study.png("trained"))
  study.save(table_markdown=md)
  return md


if __name__ == "__main__":
  common.run_study("gain_spread", __doc__, SETUPS, grid, report)
