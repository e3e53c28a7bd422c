"""Pallas RMSNorm kernels (keel_jax.kernels.rmsnorm) against their plain-jnp references, on CPU.

The TPU-style kernels run with `interpret=True`; the Mosaic GPU kernels run in Pallas' GPU interpret
mode (simulated SMEM and bulk copies) and are cross-lowered for CUDA and TPU with `jax.export`, which
runs the Pallas -> Mosaic lowering (layouts, copy rules, block shapes) without the hardware. Shapes are
small: interpret mode costs about a full-buffer copy per grid step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keel_jax.errors import ConfigError
from keel_jax.kernels import rmsnorm as K
from keel_jax.kernels import rmsnorm_mgpu

F32_TOL = 1e-5
BF16_TOL = 2e-2


def _inputs(shape, x_dtype=jnp.float32, f_dtype=jnp.float32, seed=0):
  kx, kf, kg, kw = jax.random.split(jax.random.key(seed), 4)
  d = shape[-1]
  x = jax.random.normal(kx, shape).astype(x_dtype)
  f = (2.0 * jax.random.normal(kf, shape)).astype(f_dtype)
  g = 1.0 + 0.1 * jax.random.normal(kg, (d,))
  w = jax.random.normal(kw, shape)  # cotangent weights: loss = sum(y * w)
  return x, f, jnp.float32(3.0), g, w


def _close(actual, expected, tol, scale=None, what=""):
  """max |actual - expected| <= tol * scale, with scale = max |expected| unless given."""
  a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert a.shape == e.shape, what
  scale = float(np.max(np.abs(e))) if scale is None else scale
  err = float(np.max(np.abs(a - e)))
  assert err <= tol * max(scale, 1e-30), f"{what}: max error {err:.3g} > {tol} * {scale:.3g}"


def _tol(tol: float, dtype) -> float:
  return max(tol, BF16_TOL) if dtype == jnp.bfloat16 else tol  # bf16 results: one rounding apart


def _check_fused(x, f, alpha, g, w, tol, **kw):
  loss = lambda fn: lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * w)
  y = K.add_rms_norm(x, f, alpha, g, **kw)
  assert y.dtype == x.dtype and y.shape == x.shape
  _close(y, K.add_rms_norm_reference(x, f, alpha, g), _tol(tol, y.dtype), what="y")
  grads = jax.grad(loss(lambda *a: K.add_rms_norm(*a, **kw)), argnums=(0, 1, 2, 3))(x, f, alpha, g)
  refs = jax.grad(loss(K.add_rms_norm_reference), argnums=(0, 1, 2, 3))(x, f, alpha, g)
  for name, gk, gr, primal in zip("x f alpha g".split(), grads, refs, (x, f, alpha, g)):
    assert gk.dtype == primal.dtype and gk.shape == primal.shape, name
  _close(grads[0], refs[0], _tol(tol, x.dtype), what="dx")
  _close(grads[1], refs[1], _tol(tol, f.dtype), what="df")
  _close(grads[3], refs[3], tol, what="dg")
  # dalpha = sum(dz * x) over every element: its rounding scales with sum |dz * x|, not with |dalpha|.
  dz_ref = refs[1].astype(jnp.float32)
  _close(grads[2], refs[2], tol, scale=float(jnp.sum(jnp.abs(dz_ref * x.astype(jnp.float32)))),
         what="dalpha")


def _check_plain(x, g, w, tol, **kw):
  loss = lambda fn: lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * w)
  y = K.rms_norm(x, g, **kw)
  assert y.dtype == x.dtype and y.shape == x.shape
  _close(y, K.rms_norm_reference(x, g), _tol(tol, x.dtype), what="y")
  grads = jax.grad(loss(lambda *a: K.rms_norm(*a, **kw)), argnums=(0, 1))(x, g)
  refs = jax.grad(loss(K.rms_norm_reference), argnums=(0, 1))(x, g)
  _close(grads[0], refs[0], _tol(tol, x.dtype), what="dx")
  _close(grads[1], refs[1], tol, what="dg")


# Rows 33 / 130 with 8 / 32 rows per block leave a ragged last block (interpret mode reads NaN past
# the array's end, so a missing mask in the sum over rows for dg shows); D 1000 is no multiple of 128.
SHAPES = [((7, 32), None), ((33, 1000), 8), ((130, 128), 32), ((2, 5, 1000), 8)]


@pytest.mark.parametrize("shape,block_rows", SHAPES)
def test_float32_matches_reference(shape, block_rows):
  x, f, alpha, g, w = _inputs(shape)
  _check_fused(x, f, alpha, g, w, F32_TOL, block_rows=block_rows, interpret=True)
  _check_plain(x, g, w, F32_TOL, block_rows=block_rows, interpret=True)


@pytest.mark.parametrize("x_dtype,f_dtype", [(jnp.float32, jnp.bfloat16), (jnp.bfloat16, jnp.bfloat16)])
def test_bfloat16_matches_reference(x_dtype, f_dtype):
  x, f, alpha, g, w = _inputs((33, 256), x_dtype, f_dtype, seed=1)
  _check_fused(x, f, alpha, g, w, BF16_TOL, block_rows=16, interpret=True)
  _check_plain(f, g, w, BF16_TOL, block_rows=16, interpret=True)


def test_large_alpha_keeps_the_branch():
  # alpha ~ L = 1000: in float32 the sum still carries f (docs/DESIGN.md section 2.4: a bfloat16 sum would lose it).
  x, f, _, g, w = _inputs((16, 128), f_dtype=jnp.bfloat16, seed=2)
  _check_fused(x, f, jnp.float32(1000.0), g, w, F32_TOL, interpret=True)


def test_traced_alpha_in_jit_and_scan():
  x, f, _, g, w = _inputs((2, 5, 128), seed=3)
  alphas = jnp.array([1.0, 4.0, 16.0], jnp.float32)

  def stack(fn, x, alphas):  # a per-layer alpha arrives as a scanned (traced) value, as in nn.scan
    def layer(h, alpha):
      return fn(h, f, alpha, g), None
    return jnp.sum(jax.lax.scan(layer, x, alphas)[0] * w)

  kernel = lambda *a: K.add_rms_norm(*a, block_rows=8, interpret=True)
  got = jax.jit(jax.value_and_grad(lambda *a: stack(kernel, *a), argnums=(0, 1)))(x, alphas)
  want = jax.value_and_grad(lambda *a: stack(K.add_rms_norm_reference, *a), argnums=(0, 1))(x, alphas)
  _close(got[0], want[0], F32_TOL, what="loss")
  _close(got[1][0], want[1][0], F32_TOL, what="dx")
  _close(got[1][1], want[1][1], 1e-4, what="dalphas")  # through three stacked norms

  y = jax.jit(kernel)(x, f, jnp.float32(2.5), g)
  _close(y, K.add_rms_norm_reference(x, f, 2.5, g), F32_TOL, what="jit y")


# ------------------------------------------------------------------------------------------------
# The Mosaic GPU kernels, without a GPU.


def _gpu_interpret_available() -> bool:
  try:
    rmsnorm_mgpu._interpret_params()
  except ImportError:
    return False
  return True


@pytest.mark.skipif(not _gpu_interpret_available(), reason="Pallas GPU interpret mode not in this jax")
@pytest.mark.parametrize("shape,block_rows", [((33, 1000), 4), ((7, 256), None)])
def test_mosaic_gpu_kernels_interpreted(shape, block_rows, monkeypatch):
  # Two CTAs in all: with 9 blocks of 4 rows (33 padded to 36) each CTA walks 5 steps, the second
  # redoing the last block in its fifth, which must add nothing to dg and dalpha.
  monkeypatch.setattr(rmsnorm_mgpu, "_sm_count", lambda: 1)
  monkeypatch.setattr(rmsnorm_mgpu, "_CTAS_PER_SM", 2)
  x, f, alpha, g, w = _inputs(shape, f_dtype=jnp.bfloat16, seed=4)
  kw = dict(block_rows=block_rows, lowering="mosaic_gpu_interpret")
  _check_fused(x, f, alpha, g, w, F32_TOL, **kw)
  _check_plain(x, g, w, F32_TOL, **kw)


def _export(lowering: str, platform: str, x_dtype, f_dtype):
  S = jax.ShapeDtypeStruct
  def fused_and_plain(x, f, alpha, g):
    y, vjp = jax.vjp(lambda *a: K.add_rms_norm(*a, lowering=lowering), x, f, alpha, g)
    y2, vjp2 = jax.vjp(lambda *a: K.rms_norm(*a, lowering=lowering), f, g)
    return vjp(y), vjp2(y2)
  shape = (4100, 1000)  # several blocks, ragged last one, unaligned width
  args = (S(shape, x_dtype), S(shape, f_dtype), S((), jnp.float32), S((1000,), jnp.float32))
  return jax.export.export(jax.jit(fused_and_plain), platforms=[platform])(*args).mlir_module()


@pytest.mark.parametrize("lowering,platform,call", [("mosaic_gpu", "cuda", "@mosaic_gpu"),
                                                    ("tpu", "tpu", "@tpu_custom_call")])
def test_kernels_lower_for_accelerators(lowering, platform, call):
  module = _export(lowering, platform, jnp.float32, jnp.bfloat16)
  assert module.count(f"custom_call {call}") == 4  # fused and plain, forward and backward


@pytest.mark.skipif(not K.pallas_available(jax.default_backend()),
                    reason="needs a TPU or a Hopper+ GPU (device check)")
@pytest.mark.parametrize("shape,dtype", [((4100, 1000), jnp.float32), ((16384, 4096), jnp.bfloat16),
                                         ((2, 5, 256), jnp.float32)])
def test_compiled_kernels_match_reference(shape, dtype):
  x, f, alpha, g, w = _inputs(shape, jnp.float32, dtype, seed=6)
  _check_fused(x, f, alpha, g, w, F32_TOL, interpret=False)
  _check_plain(f, g, w, _tol(F32_TOL, dtype), interpret=False)


# ------------------------------------------------------------------------------------------------
# The 'auto' decision.


def test_resolve_norm_impl():
  for backend in ("cpu", "gpu", "tpu"):
    assert K.resolve_norm_impl("auto", backend) == "xla"  # until a benchmark shows Pallas faster
    assert K.resolve_norm_impl("pallas", backend) == "pallas"
    assert K.resolve_norm_impl("xla", backend) == "xla"
  with pytest.raises(ConfigError):
    K.resolve_norm_impl("triton", "gpu")
  assert not K.pallas_available("cpu")
  assert K.pallas_available("tpu")


def test_lowering_follows_the_target_platform_and_interprets_only_for_cpu():
  assert K._resolve_lowering(None, None, "tpu") == "tpu"
  assert K._resolve_lowering(None, None, "gpu") == "mosaic_gpu"
  assert K._resolve_lowering(None, None, "cpu") == "interpret"
  assert K._resolve_lowering(True, None, "tpu") == "interpret"  # only when asked for
  assert K.target_platform() == jax.default_backend()  # no mesh in context
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  with jax.set_mesh(mesh):
    assert K.target_platform() == mesh.devices.flat[0].platform


def test_bad_shapes_are_rejected():
  x, f, alpha, g, _ = _inputs((4, 32))
  with pytest.raises(ValueError):
    K.rms_norm(x, g[:16], interpret=True)
  with pytest.raises(ValueError):
    K.add_rms_norm(x, f[:2], alpha, g, interpret=True)
  with pytest.raises(ValueError):
    K.rms_norm(jnp.zeros((40, 32)), g, block_rows=12, interpret=True)
