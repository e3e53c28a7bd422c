"""Scoring a trained model: loss, perplexity and bits per byte on a split; the layer-removal study.

    run = load_run(workdir)
    batches = split_batches(token_data, 'val', seq_len, batch_size, num_batches)
    evaluate(run.model, run.params, batches, bytes_per_token)       # {'loss', 'ppl', 'bpb', ...}
    layer_removal(run.model, run.params, batches)                   # {'base', 'sublayers': [...]}

The loss is the mean next-token cross-entropy (nats) over the fixed windows of
`data.eval_batches` (every target position counts, eos included), exactly as training's eval
records compute it; PPL = exp(loss); bits per byte = loss / ln 2 / (UTF-8 bytes per token).

Layer removal (the paper's appendix A): dPPL_i = PPL(model without sub-layer i) - PPL(model), for
every sub-layer i = 0 .. L-1 in stream order (attn_0, ffn_0, attn_1, ...). "Without sub-layer i"
means its update is replaced by the identity: the sub-layer's output is its input x, unchanged.
Per block type (F the branch, N a norm, see docs/DESIGN.md section 2.2):

    block      sub-layer i kept                 sub-layer i removed
    pre_ln     x + F(N(x))                      x    (the final norm stays)
    post_ln    N(x + F(x))                      x    (branch and the norm after it go)
    keel       N_out(alpha*x + F(N_in(x)))      x    (branch, alpha and N_out go; the first
                                                      attention sub-layer, x + F(N_in(x)), too)
    deepnorm   N(alpha*x + F(x))                x
    mix_ln     Post-LN or Pre-LN rule as above  x

For the Post-LN family this removes a normalisation along with the branch, so the next sub-layer
sees an un-normalised x; the alternative "drop F, keep N(alpha*x)" is not what is measured here.
The study costs L + 1 passes over the batches through one compiled function: the keep mask
[L] (0 = removed) is a traced argument of `Decoder.apply(..., sublayer_keep=...)`, not a constant.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from keel_jax.block_rules import sublayer_schedule
from keel_jax.data import eval_batches
from keel_jax.model import Decoder, lm_loss

SPLITS = ("val", "train")


def make_loss_fn(model: Decoder):
  """jit((params, tokens_BxT1 int32, keep_L float32) -> mean loss). One compile per batch shape."""
  return jax.jit(lambda params, tokens_BxT1, keep_L: lm_loss(model, params, tokens_BxT1, sublayer_keep=keep_L))


def perplexity(loss: float) -> float:
  """exp(loss) of a mean loss in nats, clamped at 700 nats (float64 overflows past ~709)."""
  return math.exp(min(loss, 700.0))


def bits_per_byte(loss: float, bytes_per_token: float) -> float:
  """A mean loss in nats per token as bits per UTF-8 byte of the text."""
  return loss / math.log(2) / bytes_per_token


def split_batches(token_data, split: str, seq_len: int, batch_size: int, num_batches: int) -> list[dict]:
  """Fixed, evenly spread windows of `split` ('val' or 'train'): {'tokens': int32 [B, seq_len + 1]}."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  stream = token_data.val if split == "val" else token_data.train
  return eval_batches(stream, seq_len, batch_size, num_batches)


def split_bytes_per_token(token_data, tokenizer, split: str, batches: Sequence[dict]) -> float | None:
  """UTF-8 bytes per token, to turn nats into bits per byte; None where bytes mean nothing.

  val: the corpus ratio recorded with the data (what training's eval_bpb uses). train: the
  tokenizer's fixed ratio (byte level: 1), else (BPE) measured on the evaluated target tokens.
  """
  if split == "val":
    return float(token_data.bytes_per_token_val)
  fixed = getattr(tokenizer, "bytes_per_token", None)
  if fixed:
    return float(fixed)
  if not hasattr(tokenizer, "encode"):
    return None
  targets = [row[1:] for b in batches for row in np.asarray(b["tokens"])]
  num_bytes = sum(len(tokenizer.decode(t).encode("utf-8")) for t in targets)
  num_tokens = sum(int(np.sum(t != tokenizer.eos_id)) for t in targets)
  return num_bytes / num_tokens if num_tokens else None


def _mean_loss(loss_fn, params, batches: Sequence[dict], keep_L: np.ndarray) -> float:
  losses = [loss_fn(params, b["tokens"], keep_L) for b in batches]  # dispatched async, fetched once
  return float(np.mean(jax.device_get(losses)))


def evaluate(model: Decoder, params: Any, batches: Sequence[dict], bytes_per_token: float | None = None,
             loss_fn=None) -> dict:
  """{'loss', 'ppl', 'bpb' (None without bytes_per_token), 'num_batches', 'num_tokens'}."""
  loss_fn = loss_fn or make_loss_fn(model)
  loss = _mean_loss(loss_fn, params, batches, np.ones(model.cfg.num_sublayers, np.float32))
  return {"loss": loss, "ppl": perplexity(loss),
          "bpb": bits_per_byte(loss, bytes_per_token) if bytes_per_token else None,
          "num_batches": len(batches), "num_tokens": int(sum(b["tokens"][:, 1:].size for b in batches))}


def sublayer_names(model_cfg) -> list[dict]:
  """Per sub-layer, in stream order: index, block, kind ('attn'/'ffn') and its rule constants."""
  sched = sublayer_schedule(model_cfg)
  out = []
  for i in range(model_cfg.num_sublayers):
    b, j = divmod(i, 2)
    out.append({"index": i, "block": b, "kind": ("attn", "ffn")[j], "alpha": float(sched["alpha"][b, j]),
                "pre_norm": bool(sched["pre"][b, j]), "post_norm": bool(sched["post"][b, j])})
  return out


def layer_removal(model: Decoder, params: Any, batches: Sequence[dict], loss_fn=None,
                  progress=None) -> dict:
  """The appendix-A study. Returns {'base': {'loss', 'ppl'}, 'sublayers': [per sub-layer dict with
  'loss', 'ppl', 'dppl' = ppl - base ppl, plus `sublayer_names`]}. `progress(i, L)` is called
  before each removal (for a progress bar)."""
  loss_fn = loss_fn or make_loss_fn(model)
  L = model.cfg.num_sublayers
  base = _mean_loss(loss_fn, params, batches, np.ones(L, np.float32))
  base_ppl = perplexity(base)
  rows = []
  for entry in sublayer_names(model.cfg):
    i = entry["index"]
    if progress is not None:
      progress(i, L)
    keep_L = np.ones(L, np.float32)
    keep_L[i] = 0.0
    loss = _mean_loss(loss_fn, params, batches, keep_L)
    rows.append({**entry, "loss": loss, "ppl": perplexity(loss), "dppl": perplexity(loss) - base_ppl})
  return {"base": {"loss": base, "ppl": base_ppl}, "sublayers": rows}


def plot_layer_removal(result: dict, path: str | None = None, title: str = ""):
  """Bar chart of dPPL per sub-layer index (attention and FFN in two colours); saved as PNG if
  `path`. Uses a bare matplotlib Figure, so it never changes the caller's pyplot backend."""
  from matplotlib.figure import Figure
  from matplotlib.ticker import MaxNLocator

  rows = result["sublayers"]
  idx = np.array([r["index"] for r in rows])
  dppl = np.array([r["dppl"] for r in rows])
  is_attn = np.array([r["kind"] == "attn" for r in rows])
  fig = Figure(figsize=(max(6.0, min(0.12 * len(rows) + 3, 24.0)), 3.6), dpi=120)
  ax = fig.subplots()
  ax.bar(idx[is_attn], dppl[is_attn], width=0.9, color="tab:blue", label="attention")
  ax.bar(idx[~is_attn], dppl[~is_attn], width=0.9, color="tab:orange", label="FFN")
  ax.axhline(0.0, color="black", linewidth=0.6)
  if np.max(np.abs(dppl), initial=0.0) > 100 * max(np.median(np.abs(dppl)), 1e-9):
    ax.set_yscale("symlog", linthresh=max(np.median(np.abs(dppl)), 1e-3))  # one huge entry hides the rest
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_xlabel("sub-layer index (attn_0, ffn_0, attn_1, ...)")
  ax.set_ylabel("dPPL = PPL(without i) - PPL")
  ax.set_title(title or f"layer removal: base PPL {result['base']['ppl']:.3f}", fontsize=10)
  ax.legend(fontsize=8)
  fig.tight_layout()
  if path:
    fig.savefig(path)
  return fig


def keep_mask(num_sublayers: int, removed: Sequence[int] = ()) -> jax.Array:
  """float32 [L] with 0 at `removed`: for `Decoder.apply(..., sublayer_keep=...)` in notebooks."""
  keep = np.ones(num_sublayers, np.float32)
  keep[list(removed)] = 0.0
  return jnp.asarray(keep)
