"""RMSNorm with a learnable gain, and the fused outer path of Post-LN-style sub-layers.

`N(x) = x / sqrt(mean(x^2) + eps) * g` (docs/DESIGN.md section 2.1), always computed in float32:
Keel's outer norm sees `alpha * x + F` with alpha ~ L, where bfloat16 would round F away.
`impl` selects the plain XLA expression or the Pallas kernels in `keel_jax.kernels`.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def rms_norm_xla(x_BxTxD: jax.Array, g_D: jax.Array, eps: float) -> jax.Array:
  """float32 RMSNorm over the last axis."""
  x = x_BxTxD.astype(jnp.float32)
  g = g_D.reshape((1,) * (x.ndim - 1) + g_D.shape)  # explicit rank: no silent broadcasting
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * g


def resolve_impl(impl: str) -> str:
  """'auto' picks per target platform (see kernels.rmsnorm.resolve_norm_impl); 'xla'/'pallas' are explicit."""
  if impl == "xla":
    return "xla"
  from keel_jax.kernels import rmsnorm  # imported lazily: Pallas is only needed when asked for
  return rmsnorm.resolve_norm_impl(impl, rmsnorm.target_platform())


class RMSNorm(nn.Module):
  """N(x) with gain g (init 1, no bias). Called as `norm(x)` or, fused, `norm(x, branch, alpha)`.

  The fused form returns N(alpha * x + branch): the shortcut sum of Keel / Post-LN / DeepNorm.
  Output is float32 whatever the input dtype.
  """
  eps: float = 1e-5
  impl: str = "xla"

  @nn.compact
  def __call__(self, x_BxTxD, branch_BxTxD=None, alpha=1.0):
    g_D = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                     (x_BxTxD.shape[-1],), jnp.float32)
    impl = resolve_impl(self.impl)
    if impl == "pallas":
      from keel_jax.kernels import rmsnorm
      x = x_BxTxD.astype(jnp.float32)
      # On a mesh the kernels run per device over the activations' rows (sharding.LOGICAL_RULES in
      # context: batch over data and fsdp); see kernels.rmsnorm.
      spec = nn.logical_to_mesh_axes(("batch", "length", "embed")[-x.ndim:])
      if branch_BxTxD is None:
        return rmsnorm.rms_norm(x, g_D, self.eps, x_spec=spec)
      return rmsnorm.add_rms_norm(x, branch_BxTxD, jnp.asarray(alpha, jnp.float32), g_D, self.eps,
                                  x_spec=spec)
    if branch_BxTxD is None:
      return rms_norm_xla(x_BxTxD, g_D, self.eps)
    z = alpha * x_BxTxD.astype(jnp.float32) + branch_BxTxD.astype(jnp.float32)
    return rms_norm_xla(z, g_D, self.eps)
