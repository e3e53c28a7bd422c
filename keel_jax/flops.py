"""Analytic FLOPs of a training step: what MFU counts (the model's FLOPs), and what the hardware
does on top of that under a remat policy (recomputed forward work).

XLA's `compiled.cost_analysis()` counts a scanned loop body once, not once per layer, so for a
model scanned over depth it undercounts by about the number of layers: these counts are the ones
to use for MFU and rooflines.
"""
from __future__ import annotations

from keel_jax.model_config import ModelConfig


def matmul_flops_per_token(mc: ModelConfig, seq_len: int | None = None) -> dict[str, float]:
  """Analytic training FLOPs per token (forward + backward = 3x forward), PaLM-appendix style.

  Matmuls: 2 FLOPs per weight per token (q, k, v, o, gate, up, down, and the LM head; the embedding
  lookup is a gather, no FLOPs). Attention: QK^T and PV, 2 * 2 * T * d_model per token per layer, halved
  for the causal mask (the masked half is computed here, so `attention_full` is what the hardware does).
  Remat recomputation is not counted: MFU counts the model's FLOPs, not the implementation's.
  `seq_len` defaults to the model's context (mc.max_seq_len, the training data.seq_len).
  """
  D, F, Hd = mc.d_model, mc.d_ff, mc.head_dim
  attn_w = D * mc.num_heads * Hd * 2 + D * mc.num_kv_heads * Hd * 2  # q, o and k, v
  ffn_w = 3 * D * F
  per_layer_fwd = 2 * (attn_w + ffn_w)
  T = seq_len or mc.max_seq_len
  attn_full_fwd = 2 * 2 * T * mc.num_heads * Hd  # scores + weighted sum, every (t, s) pair
  head_fwd = 2 * D * mc.vocab_size
  L = mc.num_blocks
  causal = 3 * (L * (per_layer_fwd + attn_full_fwd / 2) + head_fwd)
  return {"weights_fwd": L * per_layer_fwd + head_fwd, "train_flops_per_token": causal,
          "train_flops_per_token_attention_full": 3 * (L * (per_layer_fwd + attn_full_fwd) + head_fwd),
          "attention_fwd": L * attn_full_fwd}


def hardware_flops_per_token(mc: ModelConfig, seq_len: int | None = None) -> float:
  """FLOPs per token the step executes: the model's (attention over every (t, s) pair, as the XLA
  attention computes it) plus the forward work the remat policy recomputes in the backward pass:
  all of it under 'full', the attention matmuls (they have batch dims) under 'save_dots_no_batch',
  none under 'save_dots' / 'none'. The nested scan (scan_groups) recomputes each group's forward once
  more."""
  f = matmul_flops_per_token(mc, seq_len)
  layers_fwd = f["weights_fwd"] - 2 * mc.d_model * mc.vocab_size + f["attention_fwd"]
  recompute = {"full": layers_fwd, "save_dots_no_batch": f["attention_fwd"]}.get(mc.remat_policy, 0.0)
  if mc.scan_groups:
    recompute += layers_fwd
  return f["train_flops_per_token_attention_full"] + recompute
