"""An independent numpy implementation of the decoder, written from docs/DESIGN.md section 2.

Used only by tests. Reads the loop-layout params (`layers_0`, `layers_1`, ...).
"""
import numpy as np


def rms(x, g, eps=1e-5):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g


def rope(x, pos, theta=10000.0):
  half = x.shape[-1] // 2
  freq = theta ** (-np.arange(half) / half)
  ang = pos[:, None] * freq[None, :]  # T x half
  s, c = np.sin(ang)[:, None, :], np.cos(ang)[:, None, :]
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def attention(p, x, num_heads, num_kv_heads):
  B, T, D = x.shape
  q = np.einsum("btd,dhk->bthk", x, p["q"]["kernel"])
  k = np.einsum("btd,dhk->bthk", x, p["k"]["kernel"])
  v = np.einsum("btd,dhk->bthk", x, p["v"]["kernel"])
  pos = np.arange(T, dtype=np.float64)
  q, k = rope(q, pos), rope(k, pos)
  rep = num_heads // num_kv_heads
  k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)  # query head h uses kv head h // rep
  s = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
  s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
  a = np.exp(s - s.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  o = np.einsum("bhqs,bshk->bqhk", a, v)
  return np.einsum("bqhk,hkd->bqd", o, p["o"]["kernel"])


def swiglu(p, x):
  g = x @ p["gate"]["kernel"]
  u = x @ p["up"]["kernel"]
  return (g / (1 + np.exp(-g)) * u) @ p["down"]["kernel"]


def forward(params, tokens, block, num_blocks, num_heads, num_kv_heads, alpha=None,
            first_layer="v2", mix_fraction=0.25):
  """logits for `tokens` [B, T] under the named block rule, straight from the equations."""
  P = params
  L = 2 * num_blocks
  x = np.asarray(P["embed"]["embedding"])[tokens].astype(np.float64)
  num_post = int(round(mix_fraction * num_blocks))
  for i in range(num_blocks):
    lp = P[f"layers_{i}"]
    for j, name in enumerate(["attn", "ffn"]):
      sp = lp[name]
      F = (lambda h: attention(sp["attn"], h, num_heads, num_kv_heads)) if name == "attn" else (
          lambda h: swiglu(sp["mlp"], h))
      if block == "pre_ln":
        x = x + F(rms(x, sp["norm_in"]["scale"]))
      elif block == "post_ln":
        x = rms(x + F(x), sp["norm_out"]["scale"])
      elif block == "deepnorm":
        a = (2 * num_blocks) ** 0.25
        x = rms(a * x + F(x), sp["norm_out"]["scale"])
      elif block == "mix_ln":
        g = sp["norm"]["scale"]
        x = rms(x + F(x), g) if i < num_post else x + F(rms(x, g))
      elif block == "keel":
        a = L if alpha is None else alpha
        f = F(rms(x, sp["norm_in"]["scale"]))
        if i == 0 and (j == 0 or first_layer == "v1"):
          x = x + f  # first attention (v1/v2) and first FFN (v1): no outer norm, alpha 1
        elif i == 0:
          x = rms(x + f, sp["norm_out"]["scale"])  # v2 first FFN: outer norm, alpha 1
        else:
          x = rms(a * x + f, sp["norm_out"]["scale"])
  if block in ("pre_ln", "mix_ln"):
    x = rms(x, P["final_norm"]["scale"])
  return x @ np.asarray(P["embed"]["embedding"]).T
