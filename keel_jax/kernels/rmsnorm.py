"""Pallas RMSNorm kernels: plain `N(x) = x / sqrt(mean(x^2) + eps) * g` and Keel's fused outer path
`N(alpha * x + f)`, forward and backward, behind `jax.custom_vjp`.

Why fuse: every Keel sub-layer ends in `N_out(alpha * x + F)` and begins with `N_in(x)`. Both are
memory-bound, and the float32 shortcut sum (docs/DESIGN.md section 2.4) makes them heavier. The fused kernel
reads x and f once, sums and normalises in float32, and saves for the backward only the per-row inverse
RMS (float32 [rows, 1]; the GPU kernels recompute it instead), never the normalised output: the
backward re-reads x and f, which it needs anyway.

Lowerings, checked against the jax 0.10.2 source and the Pallas changelog (0.10 / 0.11):
- TPU: `pl.pallas_call` with `pltpu.CompilerParams(dimension_semantics=("parallel",))` -> Mosaic TPU.
  Row blocks are `(block_rows, D)`: a block dim equal to the full array dim is legal on TPU for any D,
  so widths such as 1000 need no padding; a ragged last row block is masked where rows are summed (g).
- GPU: `plgpu.kernel` -> Mosaic GPU (Hopper and newer), in `rmsnorm_mgpu.py`. Not `pl.pallas_call`:
  on GPU that now lowers to Mosaic GPU but warns "Using pl.pallas_call for Mosaic GPU kernels is
  deprecated ... migrate to plgpu.kernel", and the Triton lowering is deprecated from jax 0.11.
- CPU: the TPU-style `pl.pallas_call` kernels with `interpret=True` (tests; slow, small shapes only).

`resolve_norm_impl` holds the one decision of where 'auto' uses these kernels (today: nowhere).

Which lowering: the platform of the devices the computation is compiled for, read from the mesh in
context (`jax.set_mesh`; its abstract device), else `jax.default_backend()`. Compiling for a TPU
slice from a CPU host therefore gets Mosaic TPU, not the interpreter; the interpreter runs only when
the target is a CPU (or when asked for explicitly).

Sharding: a compiled kernel is an opaque custom call that XLA's SPMD partitioner cannot split. On a
mesh of more than one device, `rms_norm` / `add_rms_norm` therefore run the kernels inside
`jax.shard_map` (same wrapper for every lowering, Mosaic TPU and Mosaic GPU alike): rows split as
`x_spec` says (the model passes its activations' batch axes), each device normalising its own rows;
g and alpha enter replicated, and shard_map's transpose sums their gradients over the devices. The
hidden (last) axis is always whole inside the kernel: a `x_spec` that splits it (e.g. over `tensor`)
is gathered at the shard_map boundary rather than reducing partial sums of squares with a psum,
since keel_jax's rules never split the residual stream's hidden axis (fsdp goes to the batch
first), so the gather costs nothing in practice. Row axes that do not divide the row count (a decode
batch of 3 on 8 devices) are replicated instead: every device then normalises those rows itself.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

from keel_jax.errors import ConfigError

LOWERINGS = ("tpu", "interpret", "mosaic_gpu", "mosaic_gpu_interpret")

# Backends where a benchmark (benchmarks/norm_kernels.py plus the whole train step) has
# shown the Pallas kernels faster than XLA's own fusion of the same expression. Empty: no GPU or TPU
# has been measured yet, so 'auto' stays on XLA everywhere. Add a backend here only with the numbers.
_PALLAS_FASTER_ON: frozenset[str] = frozenset()

# TPU row-block sizing: VMEM the pipelined blocks and the float32 temporaries of one grid step may
# use. 12 MiB stays under the default scoped-VMEM limit of every TPU generation (16 MiB the least).
_VMEM_BUDGET_BYTES = 12 * 1024 * 1024
_F32_TEMPORARIES = 6  # (block_rows, D) float32 values live at once in the backward kernel
_MAX_BLOCK_ROWS = 1024


def resolve_norm_impl(impl: str, backend: str) -> str:
  """'xla' | 'pallas' | 'auto' -> 'xla' | 'pallas' for `backend` (jax.default_backend()).

  'auto' is XLA on CPU (the kernels only run interpreted there) and stays XLA on a backend until a
  benchmark shows Pallas faster there; none has been measured yet (see _PALLAS_FASTER_ON).
  """
  if impl in ("xla", "pallas"):
    return impl
  if impl != "auto":
    raise ConfigError("model.norm_impl", impl, "one of ('xla', 'pallas', 'auto')")
  return "pallas" if backend in _PALLAS_FASTER_ON and pallas_available(backend) else "xla"


def pallas_available(backend: str) -> bool:
  """Whether compiled (not interpreted) kernels exist for `backend`: TPU, or an NVIDIA GPU that
  Mosaic GPU supports (compute capability 9.0+, Hopper and newer). CPU only interprets."""
  if backend == "tpu":
    return True
  if backend not in ("gpu", "cuda"):
    return False
  try:
    device = jax.devices(backend)[0]
  except RuntimeError:
    return False
  capability = getattr(device, "compute_capability", None)  # "9.0" on H100/H200; absent on ROCm
  return capability is not None and float(capability) >= 9.0


# ------------------------------------------------------------------------------------------------
# Plain-jnp references (tests, benchmark, and the XLA side of every comparison).


def rms_norm_reference(x_NxD: jax.Array, g_D: jax.Array, eps: float = 1e-5) -> jax.Array:
  """float32 RMSNorm over the last axis, returned in x.dtype."""
  x = x_NxD.astype(jnp.float32)
  y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * g_D
  return y.astype(x_NxD.dtype)


def add_rms_norm_reference(x_NxD: jax.Array, f_NxD: jax.Array, alpha: jax.Array, g_D: jax.Array,
                           eps: float = 1e-5) -> jax.Array:
  """RMSNorm(alpha * x + f) * g with the sum in float32, returned in x.dtype."""
  z = jnp.asarray(alpha, jnp.float32) * x_NxD.astype(jnp.float32) + f_NxD.astype(jnp.float32)
  return rms_norm_reference(z, g_D, eps).astype(x_NxD.dtype)


# ------------------------------------------------------------------------------------------------
# TPU / interpret kernels: one grid step normalises a (block_rows, D) block of rows.


def _fwd_kernel(*refs, fused: bool, eps: float, d: int):
  if fused:
    alpha_ref, x_ref, f_ref, g_ref, y_ref, inv_ref = refs
    z_BxD = alpha_ref[...] * x_ref[...].astype(jnp.float32) + f_ref[...].astype(jnp.float32)
  else:
    x_ref, g_ref, y_ref, inv_ref = refs
    z_BxD = x_ref[...].astype(jnp.float32)
  inv_Bx1 = jax.lax.rsqrt(jnp.sum(z_BxD * z_BxD, axis=-1, keepdims=True) * (1.0 / d) + eps)
  y_ref[...] = (z_BxD * inv_Bx1 * g_ref[...]).astype(y_ref.dtype)
  inv_ref[...] = inv_Bx1


def _bwd_kernel(*refs, fused: bool, d: int, rows: int, block_rows: int):
  if fused:
    alpha_ref, x_ref, f_ref, g_ref, inv_ref, dy_ref, dx_ref, df_ref, dg_ref, da_ref = refs
    alpha = alpha_ref[...]
    x_BxD = x_ref[...].astype(jnp.float32)
    z_BxD = alpha * x_BxD + f_ref[...].astype(jnp.float32)
  else:
    x_ref, g_ref, inv_ref, dy_ref, dx_ref, dg_ref = refs
    z_BxD = x_ref[...].astype(jnp.float32)
  inv_Bx1 = inv_ref[...]
  dy_BxD = dy_ref[...].astype(jnp.float32)
  n_BxD = z_BxD * inv_Bx1
  dn_BxD = dy_BxD * g_ref[...]
  # d/dz of z * rsqrt(mean(z^2) + eps): inv * (dn - n * mean(dn * n)).
  dz_BxD = inv_Bx1 * (dn_BxD - n_BxD * (jnp.sum(dn_BxD * n_BxD, axis=-1, keepdims=True) * (1.0 / d)))
  dgn_BxD = dy_BxD * n_BxD
  if rows % block_rows:
    # The last block reads past the array (undefined values, NaN when interpreted): rows are
    # independent everywhere except in this sum over rows, so mask here; its row outputs are dropped.
    row_BxD = pl.program_id(0) * block_rows + jax.lax.broadcasted_iota(jnp.int32, dgn_BxD.shape, 0)
    dgn_BxD = jnp.where(row_BxD < rows, dgn_BxD, 0.0)
  dg_ref[...] = jnp.sum(dgn_BxD, axis=0, keepdims=True)
  if fused:
    dx_ref[...] = (alpha * dz_BxD).astype(dx_ref.dtype)
    df_ref[...] = dz_BxD.astype(df_ref.dtype)
    da_ref[...] = jnp.sum(dz_BxD * x_BxD, axis=-1, keepdims=True)
  else:
    dx_ref[...] = dz_BxD.astype(dx_ref.dtype)


def _pick_block_rows(rows: int, d: int, row_bytes: int, block_rows: int | None) -> int:
  """Rows per grid step: as many as the VMEM budget allows (double-buffered I/O + f32 temporaries)."""
  if block_rows is None:
    per_row = 2 * row_bytes + _F32_TEMPORARIES * 4 * d
    block_rows = min(_MAX_BLOCK_ROWS, max(8, _VMEM_BUDGET_BYTES // per_row))
    block_rows = block_rows // 32 * 32 if block_rows >= 32 else block_rows // 8 * 8  # bf16/int8 packing
  elif block_rows < rows and block_rows % 8:
    raise ValueError(f"block_rows={block_rows} must be a multiple of 8 (TPU sublane tiling)")
  return rows if block_rows >= rows else block_rows  # one full-array block is legal at any row count


def _row_spec(block_rows: int, d: int) -> pl.BlockSpec:
  return pl.BlockSpec((block_rows, d), lambda i: (i, 0))


def _whole_spec(shape: tuple[int, ...]) -> pl.BlockSpec:
  return pl.BlockSpec(shape, lambda i: (0,) * len(shape))  # same block every step: fetched once


def _pallas_call(kernel, grid: int, in_specs, out_specs, out_shape, interpret: bool, cost):
  compiler_params = None
  if not interpret:
    from jax.experimental.pallas import tpu as pltpu  # only needed (and only meaningful) on TPU
    # Grid steps are independent (each writes its own rows and its own partial-sum row), so a
    # megacore TPU may split them between its cores.
    compiler_params = pltpu.CompilerParams(dimension_semantics=("parallel",))
  return pl.pallas_call(kernel, grid=(grid,), in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, compiler_params=compiler_params, interpret=interpret,
                        cost_estimate=cost)


def _tpu_fwd(x_NxD, f_NxD, alpha, g_D, eps: float, interpret: bool, block_rows: int | None):
  rows, d = x_NxD.shape
  fused = f_NxD is not None
  row_bytes = d * (2 * x_NxD.dtype.itemsize + (f_NxD.dtype.itemsize if fused else 0))
  br = _pick_block_rows(rows, d, row_bytes, block_rows)
  operands = [x_NxD, g_D.reshape(1, d)]
  in_specs = [_row_spec(br, d), _whole_spec((1, d))]
  if fused:
    operands = [alpha.reshape(1, 1), x_NxD, f_NxD, g_D.reshape(1, d)]
    in_specs = [_whole_spec((1, 1)), _row_spec(br, d), _row_spec(br, d), _whole_spec((1, d))]
  cost = pl.CostEstimate(flops=6 * rows * d, transcendentals=rows, bytes_accessed=rows * (row_bytes + 4))
  y_NxD, inv_Nx1 = _pallas_call(
      functools.partial(_fwd_kernel, fused=fused, eps=eps, d=d), pl.cdiv(rows, br), in_specs,
      [_row_spec(br, d), _row_spec(br, 1)],
      [jax.ShapeDtypeStruct((rows, d), x_NxD.dtype), jax.ShapeDtypeStruct((rows, 1), jnp.float32)],
      interpret, cost)(*operands)
  return y_NxD, inv_Nx1


def _tpu_bwd(x_NxD, f_NxD, alpha, g_D, inv_Nx1, dy_NxD, interpret: bool, block_rows: int | None):
  rows, d = x_NxD.shape
  fused = f_NxD is not None
  io = (2 * x_NxD.dtype.itemsize + dy_NxD.dtype.itemsize + (2 * f_NxD.dtype.itemsize if fused else 0))
  br = _pick_block_rows(rows, d, d * io, block_rows)
  nb = pl.cdiv(rows, br)
  g_1xD = g_D.reshape(1, d)
  # Partial sums of dg, one (1, D) row per grid step, summed outside: a leading squeezed dim keeps
  # the block's last two dims equal to the array's, as TPU tiling requires.
  dg_spec = pl.BlockSpec((None, 1, d), lambda i: (i, 0, 0))
  dg_shape = jax.ShapeDtypeStruct((nb, 1, d), jnp.float32)
  dx_shape = jax.ShapeDtypeStruct((rows, d), x_NxD.dtype)
  if fused:
    operands = [alpha.reshape(1, 1), x_NxD, f_NxD, g_1xD, inv_Nx1, dy_NxD]
    in_specs = [_whole_spec((1, 1)), _row_spec(br, d), _row_spec(br, d), _whole_spec((1, d)),
                _row_spec(br, 1), _row_spec(br, d)]
    out_specs = [_row_spec(br, d), _row_spec(br, d), dg_spec, _row_spec(br, 1)]
    out_shape = [dx_shape, jax.ShapeDtypeStruct((rows, d), f_NxD.dtype), dg_shape,
                 jax.ShapeDtypeStruct((rows, 1), jnp.float32)]
  else:
    operands = [x_NxD, g_1xD, inv_Nx1, dy_NxD]
    in_specs = [_row_spec(br, d), _whole_spec((1, d)), _row_spec(br, 1), _row_spec(br, d)]
    out_specs = [_row_spec(br, d), dg_spec]
    out_shape = [dx_shape, dg_shape]
  cost = pl.CostEstimate(flops=14 * rows * d, transcendentals=0, bytes_accessed=rows * (d * io + 8))
  kernel = functools.partial(_bwd_kernel, fused=fused, d=d, rows=rows, block_rows=br)
  outs = _pallas_call(kernel, nb, in_specs, out_specs, out_shape, interpret, cost)(*operands)
  if fused:
    dx, df, dg_part, da_rows = outs
    return dx, df, dg_part.sum(axis=(0, 1)), jnp.sum(da_rows)
  dx, dg_part = outs
  return dx, None, dg_part.sum(axis=(0, 1)), None


# ------------------------------------------------------------------------------------------------
# Dispatch and custom_vjp over 2-D [rows, D] operands. f and alpha are None for the plain norm.


def _forward(x, f, alpha, g, eps: float, lowering: str, block_rows: int | None):
  """-> (y, residual inverse RMS [rows, 1] or None where the lowering recomputes it)."""
  if lowering.startswith("mosaic_gpu"):
    from keel_jax.kernels import rmsnorm_mgpu
    y = rmsnorm_mgpu.forward(x, f, alpha, g, eps=eps, interpret=lowering == "mosaic_gpu_interpret",
                             block_rows=block_rows)
    return y, None
  return _tpu_fwd(x, f, alpha, g, eps, lowering == "interpret", block_rows)


def _backward(x, f, alpha, g, inv, dy, eps: float, lowering: str, block_rows: int | None):
  """-> (dx, df | None, dg, dalpha | None)."""
  if lowering.startswith("mosaic_gpu"):
    from keel_jax.kernels import rmsnorm_mgpu
    return rmsnorm_mgpu.backward(x, f, alpha, g, dy, eps=eps,
                                 interpret=lowering == "mosaic_gpu_interpret", block_rows=block_rows)
  return _tpu_bwd(x, f, alpha, g, inv, dy, lowering == "interpret", block_rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _norm_2d(x_NxD, f_NxD, alpha, g_D, eps: float, lowering: str, block_rows: int | None):
  return _forward(x_NxD, f_NxD, alpha, g_D, eps, lowering, block_rows)[0]


def _norm_2d_fwd(x_NxD, f_NxD, alpha, g_D, eps, lowering, block_rows):
  y_NxD, inv_Nx1 = _forward(x_NxD, f_NxD, alpha, g_D, eps, lowering, block_rows)
  return y_NxD, (x_NxD, f_NxD, alpha, g_D, inv_Nx1)


def _norm_2d_bwd(eps, lowering, block_rows, residuals, dy_NxD):
  x_NxD, f_NxD, alpha, g_D, inv_Nx1 = residuals
  dx, df, dg, dalpha = _backward(x_NxD, f_NxD, alpha, g_D, inv_Nx1, dy_NxD, eps, lowering, block_rows)
  return dx, df, dalpha, dg.astype(g_D.dtype)


_norm_2d.defvjp(_norm_2d_fwd, _norm_2d_bwd)


def target_platform(mesh=None) -> str:
  """The platform the surrounding computation is compiled for: that of the mesh's devices (`mesh`, or
  the one in context through `jax.set_mesh`), else `jax.default_backend()`. 'tpu', 'gpu' or 'cpu'."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if isinstance(mesh, jax.sharding.Mesh):
    mesh = mesh.abstract_mesh
  device = getattr(mesh, "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def _resolve_lowering(interpret: bool | None, lowering: str | None, platform: str) -> str:
  if lowering is not None:
    if lowering not in LOWERINGS:
      raise ValueError(f"lowering={lowering!r}: expected one of {LOWERINGS}")
    return lowering
  if interpret is None:
    interpret = platform == "cpu"
  if interpret:
    return "interpret"
  if platform == "tpu":
    return "tpu"
  if platform in ("gpu", "cuda"):
    return "mosaic_gpu"
  raise ValueError(f"no compiled Pallas lowering for platform {platform!r}: pass interpret=True")


def _shard_spec(x_spec, shape: tuple[int, ...], mesh) -> P:
  """`x_spec` with the last (hidden) axis whole and every axis that does not divide its dim dropped."""
  entries = list(x_spec or ())[:len(shape) - 1]
  entries += [None] * (len(shape) - len(entries))
  out = []
  for size, axes in zip(shape[:-1], entries):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    out.append(axes if names and size % math.prod(mesh.shape[a] for a in names) == 0 else None)
  return P(*out, None)


def _on_mesh(kernel, x, f, alpha, g, x_spec):
  """kernel(x, f, alpha, g) on each device's rows of x (and f) inside `jax.shard_map` when a mesh of
  more than one device is in context; directly otherwise. f and alpha may be None (plain norm)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return kernel(x, f, alpha, g)
  spec = _shard_spec(x_spec, x.shape, mesh)
  fused = f is not None
  operands = (x, f, alpha, g) if fused else (x, g)
  specs = (spec, spec, P(), P()) if fused else (spec, P())

  def per_device(*ops):
    return kernel(*ops) if fused else kernel(ops[0], None, None, ops[1])

  # check_vma=False: pallas_call's outputs carry no varying-axes types unless each out_shape names
  # them; the specs above say what varies.
  return jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=spec, check_vma=False)(*operands)


def _check(x, g_D) -> None:
  if x.ndim < 1 or g_D.shape != (x.shape[-1],):
    raise ValueError(f"expected x [..., D] and g [D], got x {x.shape} and g {g_D.shape}")


# ------------------------------------------------------------------------------------------------
# Public API (called by keel_jax.norms with exactly these names).


def rms_norm(x: jax.Array, g: jax.Array, eps: float = 1e-5, *, interpret: bool | None = None,
             block_rows: int | None = None, lowering: str | None = None,
             x_spec: P | None = None) -> jax.Array:
  """x [..., D] (any float dtype), g [D] float32 -> x / sqrt(mean(x^2) + eps) * g in x.dtype.

  Computed in float32; differentiable in x and g. `interpret=None` interprets when the target
  (`target_platform`) is a CPU and compiles for TPU / GPU. `block_rows` overrides the rows per
  kernel step (tuning, tests); `lowering` forces one of LOWERINGS (tests and benchmarks). On a mesh
  of several devices (`jax.set_mesh`) the kernels run inside `jax.shard_map`, rows split as `x_spec`
  (a PartitionSpec of x; None: every device normalises all rows).
  """
  _check(x, g)
  kernel = _kernel_on_rows(float(eps), _resolve_lowering(interpret, lowering, target_platform()), block_rows)
  return _on_mesh(kernel, x, None, None, g, x_spec)


def add_rms_norm(x: jax.Array, f: jax.Array, alpha: jax.Array | float, g: jax.Array,
                 eps: float = 1e-5, *, interpret: bool | None = None, block_rows: int | None = None,
                 lowering: str | None = None, x_spec: P | None = None) -> jax.Array:
  """Keel's outer path RMSNorm(alpha * x + f) * g, fused: x [..., D] (the residual stream), f [..., D]
  (the branch output, any float dtype), alpha a float32 scalar (may be traced), g [D] float32.

  Sum and normalisation in float32 (with alpha ~ L a bfloat16 sum would round f away); output in
  x.dtype. Differentiable in x, f, alpha and g. Other arguments as for `rms_norm`.
  """
  _check(x, g)
  if f.shape != x.shape:
    raise ValueError(f"x {x.shape} and f {f.shape} must have the same shape")
  # alpha enters the kernel as a (1, 1) array, never as a Python constant: inside an nn.scan over
  # layers it is a traced per-layer value.
  alpha = jnp.asarray(alpha, jnp.float32).reshape(())
  kernel = _kernel_on_rows(float(eps), _resolve_lowering(interpret, lowering, target_platform()), block_rows)
  return _on_mesh(kernel, x, f, alpha, g, x_spec)


def _kernel_on_rows(eps: float, lowering: str, block_rows: int | None):
  """(x [..., D], f | None, alpha | None, g [D]) -> y [..., D]: the kernels over the rows of x."""

  def kernel(x, f, alpha, g):
    d = x.shape[-1]
    y = _norm_2d(x.reshape(-1, d), None if f is None else f.reshape(-1, d), alpha, g, eps, lowering,
                 block_rows)
    return y.reshape(x.shape)

  return kernel
