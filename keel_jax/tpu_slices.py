"""Cloud TPU slices by their Google Cloud names, and what each chip brings (for keel_jax.aot).

    s = tpu_slices.parse("v5p-256")  # 128 chips, 4x4x8, 95 GiB HBM each
    devices = s.devices()           # compile-only devices (needs libtpu; no TPU needed)

Naming (as `gcloud compute tpus` writes it): v4-N and v5p-N count TensorCores, two per chip, so
v5p-256 is 128 chips; v5litepod-N (also written v5e-N) and v6e-N count chips. JAX sees one device
per chip (v4 and v5p run their two cores as one "megacore" device).

Per-chip figures are Google's published specifications (cloud.google.com/tpu/docs/<version>):
HBM capacity, dense bfloat16 peak FLOP/s, HBM bandwidth.
"""
from __future__ import annotations

import dataclasses
import math

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Generation:
  name: str  # as in the slice name: v4, v5p, v5e, v6e
  topology_prefix: str  # as libtpu names the generation in topology strings
  counts_cores: bool  # the slice name's number counts TensorCores (2 per chip), not chips
  hbm_bytes: int  # per chip
  peak_bf16_flops: float  # per chip, dense
  hbm_bytes_per_s: float  # per chip
  dims: int  # torus dimensions: 3 (v4, v5p) or 2 (v5e, v6e)
  chip_config: str  # libtpu chip_config_name: 'megacore' runs a chip's two cores as one device
  max_chips: int  # the largest slice of one pod
  device_kind: str  # what jax's Device.device_kind says for this chip


GENERATIONS = {
    "v4": Generation("v4", "v4", True, 32 * GiB, 275e12, 1228e9, 3, "megacore", 4096, "TPU v4"),
    "v5p": Generation("v5p", "v5p", True, 95 * GiB, 459e12, 2765e9, 3, "megacore", 8960, "TPU v5"),
    "v5e": Generation("v5e", "v5e", False, 16 * GiB, 197e12, 819e9, 2, "default", 256, "TPU v5 lite"),
    "v6e": Generation("v6e", "v6e", False, 32 * GiB, 918e12, 1640e9, 2, "default", 256, "TPU v6 lite"),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str  # as given, e.g. 'v5p-256'
  gen: Generation
  chips: int
  shape: tuple[int, ...]  # chips along each torus dimension

  @property
  def topology(self) -> str:
    """libtpu's topology string, e.g. 'v5p:4x4x8'."""
    return f"{self.gen.topology_prefix}:{'x'.join(map(str, self.shape))}"

  @property
  def chips_per_host_bounds(self) -> tuple[int, int, int]:
    """Chips per host along each dimension: 4 (2x2) on multi-host slices; single-host v5e/v6e
    slices put up to 8 chips (2x4) on one host."""
    if self.chips < 4:  # v5e-1, v5e-2
      return (*self.shape, 1)
    if self.gen.dims == 2 and self.chips == 8:
      return (2, 4, 1)
    return (2, 2, 1)

  def devices(self):
    """Compile-only devices of this slice (one per chip). Needs libtpu (`pip install -e '.[tpu]'`)."""
    from jax.experimental import topologies
    return topologies.get_topology_desc(platform="tpu", topology_name=self.topology,
                                        chips_per_host_bounds=self.chips_per_host_bounds,
                                        chip_config_name=self.gen.chip_config).devices


def generation_of(device_kind: str) -> Generation | None:
  """The generation of a jax device ('TPU v5' is a v5p chip, 'TPU v5 lite' a v5e), or None."""
  return next((g for g in GENERATIONS.values() if g.device_kind == device_kind), None)


class UnknownSlice(ValueError):
  """A name that is not a Cloud TPU slice this table knows."""


def _shape(chips: int, dims: int) -> tuple[int, ...] | None:
  """The slice shape Cloud TPU uses for a power-of-two chip count: from 2x2x1 (v4/v5p) or 1x1
  (v5e/v6e), double the smallest dimension (the last of equals) per doubling: 2x2x2, 2x2x4, 2x4x4,
  4x4x4, 4x4x8, ... and 1x1, 1x2 -> 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16."""
  if chips < 1 or chips & (chips - 1):
    return None
  if dims == 2:
    shape = [1, 1]
    if chips == 2:
      return (1, 2)
  else:
    if chips < 4:
      return None
    shape = [2, 2, 1]
  while math.prod(shape) < chips:
    i = max(j for j in range(dims) if shape[j] == min(shape))
    shape[i] *= 2
  return tuple(sorted(shape)) if dims == 2 else tuple(shape)


def known_names() -> list[str]:
  """Every slice name `parse` accepts, per generation (the aliases v5litepod-N are accepted too)."""
  names = []
  for gen in GENERATIONS.values():
    chips = 1 if gen.dims == 2 else 4
    while chips <= gen.max_chips:
      names.append(f"{gen.name}-{chips * 2 if gen.counts_cores else chips}")
      chips *= 2
  return names


def parse(name: str) -> Slice:
  """'v5p-256' / 'v4-128' / 'v5litepod-16' / 'v5e-16' / 'v6e-64' -> Slice. UnknownSlice otherwise."""
  prefix, _, number = name.strip().lower().rpartition("-")
  gen = GENERATIONS.get(ALIASES.get(prefix, prefix))
  shape = None
  if gen is not None and number.isdigit():
    n = int(number)
    if not gen.counts_cores or n % 2 == 0:
      chips = n // 2 if gen.counts_cores else n
      if chips <= gen.max_chips:
        shape = _shape(chips, gen.dims)
  if shape is None:
    raise UnknownSlice(f"unknown TPU slice {name!r}; known: {', '.join(known_names())} "
                       "(v4/v5p numbers count TensorCores, 2 per chip; v5e/v5litepod/v6e count chips)")
  return Slice(name, gen, math.prod(shape), shape)
