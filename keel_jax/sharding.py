"""Device mesh from config, logical-axis rules, and shardings for params, optimiser state and batches.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and optimiser state
sharded), `tensor` (attention heads and FFN width split). The model names its axes logically
(`embed`, `mlp`, `heads`, ...); `LOGICAL_RULES` maps them to mesh axes, so the model never changes.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from keel_jax.errors import ConfigError
from keel_jax.model import strip_boxes

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
LOGICAL_RULES = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("norm", None),
    ("layers", None),
    ("layer_groups", None),
)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """Resolves one -1 to the remaining devices; checks the product is the device count."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError("mesh", dict(zip(MESH_AXES, sizes)),
                        f"sizes whose fixed part ({known}) divides the {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError("mesh", dict(zip(MESH_AXES, sizes)),
                      f"sizes multiplying to the {num_devices} devices (product is {math.prod(sizes)})")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh with Auto axes (flax logical partitioning assumes Auto).

  `jax.make_mesh` orders devices so the fastest links (within a host / slice) carry the innermost
  axes (tensor, then fsdp); data parallelism spans hosts.
  """
  devices = devices if devices is not None else jax.devices()
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def check_divisible(abstract_boxed_params, mesh: jax.sharding.Mesh, rules=LOGICAL_RULES) -> None:
  """Every sharded dimension must divide by its mesh axes: say which one does not, before compiling."""
  specs = nn.get_partition_spec(abstract_boxed_params)
  flat_specs = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))
  flat_values = jax.tree.leaves(strip_boxes(abstract_boxed_params))
  for (path, logical), value in zip(flat_specs, flat_values):
    mesh_spec = nn.logical_to_mesh_axes(logical, rules)
    for dim, (size, axes) in enumerate(zip(value.shape, mesh_spec)):
      axes = (axes,) if isinstance(axes, str) else (axes or ())
      n = math.prod(mesh.shape[a] for a in axes)
      if size % n:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        raise ConfigError("mesh", dict(mesh.shape), f"axis sizes that divide parameter {name} dim {dim} "
                          f"({logical[dim]}={size}) over mesh axes {axes} (={n})")


def param_shardings(abstract_boxed_params, mesh, rules=LOGICAL_RULES):
  """NamedSharding per param leaf (unboxed tree structure) from the logical axis names."""
  specs = nn.logical_to_mesh(nn.get_partition_spec(abstract_boxed_params), rules)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params, shardings, mesh):
  """Adam moments shard like their params; counters and other scalars are replicated."""
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  return optax.tree_map_params(tx, lambda _, s: s, abstract_opt, shardings,
                               transform_non_params=lambda _: NamedSharding(mesh, P()))


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, None))


def check_batch(global_batch: int, mesh) -> None:
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch % dp or global_batch % jax.process_count():
    raise ConfigError("data.batch_size", global_batch, f"a multiple of the data-parallel size "
                      f"mesh.data * mesh.fsdp = {dp} and of the process count {jax.process_count()}")


def global_batch(local_batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Host-local rows -> one global array sharded over the batch axes (works on one or many hosts)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
