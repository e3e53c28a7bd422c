"""Mosaic GPU lowering of the RMSNorm kernels (Hopper and newer), through `plgpu.kernel`.

Used by `keel_jax.kernels.rmsnorm` on NVIDIA GPUs; same math and interface as its TPU kernels.
`plgpu.kernel` is the entry point the jax 0.10/0.11 sources recommend (`pl.pallas_call` on GPU warns
that Mosaic GPU through it is deprecated; the Triton lowering is deprecated from 0.11).

Shape of the kernels, and why:
- A persistent grid of CTAs (a few per SM), each walking row blocks `cta, cta + num_ctas, ...`: the
  backward then sums dg over many rows in registers and writes one partial row per CTA, instead of a
  [rows / block_rows, D] array as large as the input.
- Each row block moves GMEM <-> SMEM with whole-row bulk copies (contiguous, so no 256-element TMA
  box limit), and each row is processed by the warpgroup as one (D_pad,) vector in a strided layout,
  which Mosaic GPU can reduce to a scalar. Outputs overwrite their inputs in SMEM (dx over x, df over
  f: same dtypes), so a CTA holds only its inputs.
- The inverse RMS is recomputed in the backward rather than saved: the backward reads the whole row
  anyway, so this costs one register reduction and no memory traffic, and avoids per-row scalar
  stores.
- alpha comes in as an array (broadcast to f32[32], the smallest bulk copy) and is read as a scalar
  from SMEM, so a traced per-layer alpha works.
- D is zero-padded to a multiple of 128 (one strided vector per warpgroup) and rows to a multiple of
  the block only when needed (widths like 1000, odd token counts): zeros change no sum (the mean
  divides by the true D), get g = 0, and receive zero gradients. Model widths need no padding.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# SMEM sizing: a CTA holds one row block of inputs (<= 48 KiB) plus g (4 * D_pad bytes), so three
# CTAs fit in an SM's 227 KiB even at D = 4096; the persistent grid launches exactly that many per SM
# (a fourth wave would run alone, after the others). Untuned: no GPU has measured these yet.
_SMEM_IO_BUDGET_BYTES = 48 * 1024
_MAX_BLOCK_ROWS = 8  # rows are unrolled in the kernel body
_CTAS_PER_SM = 3
_SM_COUNT_FALLBACK = 132  # H100 / H200 SXM
# alpha travels as f32[32]: Mosaic GPU bulk copies must move a multiple of 128 bytes (one share per
# thread of the warpgroup).
_ALPHA_LEN = 32


def _sm_count() -> int:
  try:
    return int(getattr(jax.devices()[0], "core_count", 0)) or _SM_COUNT_FALLBACK
  except RuntimeError:
    return _SM_COUNT_FALLBACK


def _geometry(rows: int, d: int, io_bytes_per_col: int, block_rows: int | None):
  """-> (d_pad, vec, block_rows, num_blocks, num_ctas, steps)."""
  d_pad = pl.cdiv(d, 128) * 128
  vec = 4 if d_pad % 512 == 0 else 2 if d_pad % 256 == 0 else 1  # elements per thread per access
  if block_rows is None:
    block_rows = _SMEM_IO_BUDGET_BYTES // (d_pad * io_bytes_per_col)
  block_rows = max(1, min(_MAX_BLOCK_ROWS, block_rows, rows))
  num_blocks = pl.cdiv(rows, block_rows)
  num_ctas = min(num_blocks, _CTAS_PER_SM * _sm_count())
  return d_pad, vec, block_rows, num_blocks, num_ctas, pl.cdiv(num_blocks, num_ctas)


def _pad(a, rows: int, cols: int):
  pads = [(0, rows - a.shape[0]), (0, cols - a.shape[1])]
  return a if not any(p for _, p in pads) else jnp.pad(a, pads)


def _load_row(ref, i, *, layout):
  """ref[i] as float32 in `layout`. The cast right after the read is Mosaic GPU's layout hint for the
  load: one fixed layout for every operand, whatever its dtype, so elementwise ops line up."""
  from jax.experimental.pallas import mosaic_gpu as plgpu
  row = ref[i]
  # The GPU interpreter has no layouts (and no rule for layout_cast): it gets layout=None.
  return (row if layout is None else plgpu.layout_cast(row, layout)).astype(jnp.float32)


def _copy_in(src, dst, barrier) -> None:
  """GMEM -> SMEM bulk copy. Operands are padded, so every copy is in bounds: saying so lets Mosaic GPU
  use one plain contiguous bulk copy (any length) instead of a tiled TMA (<= 256 per dimension)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu
  plgpu.copy_gmem_to_smem(src, dst, barrier, oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS)


def _interpret_params():
  # GPU interpret mode (simulated SMEM, barriers and bulk copies on CPU) is not public API in
  # jax 0.10/0.11; the tests use it to run this kernel's logic without a GPU.
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  return InterpretGPUParams()


def _launch(body, operands, out_type, scratch, num_ctas: int, interpret: bool):
  from jax.experimental.pallas import mosaic_gpu as plgpu
  return plgpu.kernel(body, out_type=out_type, scratch_types=scratch, grid=(num_ctas,),
                      grid_names=("cta",),
                      interpret=_interpret_params() if interpret else None)(*operands)


def forward(x_NxD, f_NxD, alpha, g_D, *, eps: float, interpret: bool, block_rows: int | None = None):
  """y [rows, D] in x.dtype; f and alpha None for the plain norm."""
  from jax.experimental.pallas import mosaic_gpu as plgpu
  rows, d = x_NxD.shape
  fused = f_NxD is not None
  io = x_NxD.dtype.itemsize + (f_NxD.dtype.itemsize if fused else 0)
  d_pad, vec, br, nb, num_ctas, steps = _geometry(rows, d, io, block_rows)
  layout = None if interpret else plgpu.Layout.WG_STRIDED((d_pad,), vec_size=vec)
  load = functools.partial(_load_row, layout=layout)

  def body(*refs):
    if fused:
      a_g, g_g, x_g, f_g, y_g, a_s, g_s, x_s, f_s, bar_p, bar_io = refs
    else:
      g_g, x_g, y_g, g_s, x_s, bar_p, bar_io = refs
    cta = jax.lax.axis_index("cta")
    _copy_in(g_g, g_s, bar_p)
    if fused:
      _copy_in(a_g, a_s, bar_p)
    plgpu.barrier_wait(bar_p)

    @pl.loop(0, steps)
    def _(k):
      # Clamped: a CTA past the last block redoes it and rewrites identical values.
      blk = pl.ds(jnp.minimum(cta + k * num_ctas, nb - 1) * br, br)
      _copy_in(x_g.at[blk], x_s, bar_io)
      if fused:
        _copy_in(f_g.at[blk], f_s, bar_io)
      plgpu.barrier_wait(bar_io)
      g = load(g_s, slice(None))
      for r in range(br):
        z = a_s[0] * load(x_s, r) + load(f_s, r) if fused else load(x_s, r)
        inv = jax.lax.rsqrt(jnp.sum(z * z) * (1.0 / d) + eps)
        x_s[r] = (z * inv * g).astype(x_s.dtype)  # y over x in SMEM
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(x_s, y_g.at[blk])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # x_s is refilled by the next step

    plgpu.wait_smem_to_gmem(0)  # the last store has landed

  rows_pad = nb * br
  operands = [_pad(g_D.reshape(1, d), 1, d_pad).reshape(d_pad), _pad(x_NxD, rows_pad, d_pad)]
  scratch = [plgpu.SMEM((d_pad,), jnp.float32), plgpu.SMEM((br, d_pad), x_NxD.dtype)]
  if fused:
    operands = [jnp.broadcast_to(alpha, (_ALPHA_LEN,)), *operands, _pad(f_NxD, rows_pad, d_pad)]
    scratch = [plgpu.SMEM((_ALPHA_LEN,), jnp.float32), *scratch, plgpu.SMEM((br, d_pad), f_NxD.dtype)]
  scratch += [plgpu.Barrier(num_arrivals=1 + fused), plgpu.Barrier(num_arrivals=1 + fused)]
  y = _launch(body, operands, jax.ShapeDtypeStruct((rows_pad, d_pad), x_NxD.dtype), scratch,
              num_ctas, interpret)
  return y[:rows, :d]


def backward(x_NxD, f_NxD, alpha, g_D, dy_NxD, *, eps: float, interpret: bool,
             block_rows: int | None = None):
  """-> (dx, df | None, dg [D], dalpha | None); the inverse RMS is recomputed per row."""
  from jax.experimental.pallas import mosaic_gpu as plgpu
  rows, d = x_NxD.shape
  fused = f_NxD is not None
  io = x_NxD.dtype.itemsize + dy_NxD.dtype.itemsize + (f_NxD.dtype.itemsize if fused else 0)
  d_pad, vec, br, nb, num_ctas, steps = _geometry(rows, d, io, block_rows)
  layout = None if interpret else plgpu.Layout.WG_STRIDED((d_pad,), vec_size=vec)
  load = functools.partial(_load_row, layout=layout)
  num_acc = 2 if fused else 1  # dg and, when fused, the elementwise terms of dalpha

  def body(*refs):
    if fused:
      a_g, g_g, x_g, f_g, dy_g, dx_g, df_g, part_g, a_s, g_s, x_s, f_s, dy_s, bar_p, bar_io = refs
    else:
      g_g, x_g, dy_g, dx_g, part_g, g_s, x_s, dy_s, bar_p, bar_io = refs
    cta = jax.lax.axis_index("cta")
    _copy_in(g_g, g_s, bar_p)
    if fused:
      _copy_in(a_g, a_s, bar_p)
    plgpu.barrier_wait(bar_p)

    def step(k, accs):
      b = cta + k * num_ctas
      # A CTA past the last block redoes it (identical dx/df writes) but adds nothing to the sums.
      w = (b < nb).astype(jnp.float32)
      blk = pl.ds(jnp.minimum(b, nb - 1) * br, br)
      srcs = [(x_g, x_s), (dy_g, dy_s)] + ([(f_g, f_s)] if fused else [])
      for src, dst in srcs:
        _copy_in(src.at[blk], dst, bar_io)
      plgpu.barrier_wait(bar_io)
      g = load(g_s, slice(None))
      accs = list(accs)
      for r in range(br):
        x = load(x_s, r)
        z = a_s[0] * x + load(f_s, r) if fused else x
        dy = load(dy_s, r)
        inv = jax.lax.rsqrt(jnp.sum(z * z) * (1.0 / d) + eps)
        n = z * inv
        dn = dy * g
        dz = inv * (dn - n * (jnp.sum(dn * n) * (1.0 / d)))
        accs[0] = accs[0] + w * (dy * n)
        if fused:
          accs[1] = accs[1] + w * (dz * x)
          x_s[r] = (a_s[0] * dz).astype(x_s.dtype)  # dx over x, df over f in SMEM
          f_s[r] = dz.astype(f_s.dtype)
        else:
          x_s[r] = dz.astype(x_s.dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(x_s, dx_g.at[blk])
      if fused:
        plgpu.copy_smem_to_gmem(f_s, df_g.at[blk])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # x_s / f_s are refilled by the next step
      return tuple(accs)

    zeros = jnp.zeros((d_pad,), jnp.float32)
    if layout is not None:  # a splat constant; the loop carry needs the rows' strided layout
      zeros = plgpu.layout_cast(zeros, layout)
    accs = jax.lax.fori_loop(0, steps, step, (zeros,) * num_acc)
    for j, acc in enumerate(accs):  # g_s is free now: stage the partial sums through it
      g_s[...] = acc
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(g_s, part_g.at[cta, j])
      plgpu.wait_smem_to_gmem(0)

  rows_pad = nb * br
  pad = functools.partial(_pad, rows=rows_pad, cols=d_pad)
  operands = [_pad(g_D.reshape(1, d), 1, d_pad).reshape(d_pad), pad(x_NxD), pad(dy_NxD)]
  out_type = [jax.ShapeDtypeStruct((rows_pad, d_pad), x_NxD.dtype)]
  scratch = [plgpu.SMEM((d_pad,), jnp.float32), plgpu.SMEM((br, d_pad), x_NxD.dtype),
             plgpu.SMEM((br, d_pad), dy_NxD.dtype)]
  if fused:
    operands = [jnp.broadcast_to(alpha, (_ALPHA_LEN,)), *operands[:2], pad(f_NxD), operands[2]]
    out_type.append(jax.ShapeDtypeStruct((rows_pad, d_pad), f_NxD.dtype))
    scratch = [plgpu.SMEM((_ALPHA_LEN,), jnp.float32), *scratch[:2],
               plgpu.SMEM((br, d_pad), f_NxD.dtype), scratch[2]]
  out_type.append(jax.ShapeDtypeStruct((num_ctas, num_acc, d_pad), jnp.float32))
  scratch += [plgpu.Barrier(num_arrivals=1 + fused), plgpu.Barrier(num_arrivals=2 + fused)]
  outs = _launch(body, operands, out_type, scratch, num_ctas, interpret)
  dg = outs[-1][:, 0, :d].sum(axis=0)
  if fused:
    return outs[0][:rows, :d], outs[1][:rows, :d], dg, jnp.sum(outs[-1][:, 1])
  return outs[0][:rows, :d], None, dg, None
