"""Device mesh from config, logical-axis rules, and shardings for params, optimiser state and batches.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and optimiser state
sharded), `tensor` (attention heads and FFN width split). The model names its axes logically
(`embed`, `mlp`, `heads`, ...); `LOGICAL_RULES` maps them to mesh axes, so the model never changes.
docs/SCALING.md says how to choose the sizes.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from keel_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# Priority order: for each array, rules are applied top-down and a mesh axis is used at most once
# (flax skips a rule whose mesh axes are taken). So activations ('batch', 'length', 'embed') keep
# 'embed' whole: 'batch' has taken 'fsdp' first.
LOGICAL_RULES = (
    ("batch", BATCH_AXES),
    ("length", None),
    # The embedding table ('vocab', 'embed') is split over vocab rows by tensor * fsdp, not over
    # embed by fsdp: a gather from an embed-sharded table yields embed-sharded activations that XLA
    # could only turn into batch-sharded ones by replicating them ("Involuntary full
    # rematerialization"). Vocab rows shard the gather cleanly. It is listed before 'embed' so it
    # wins 'fsdp' for the untied output projection ('embed', 'vocab') too.
    ("vocab", ("tensor", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("norm", None),
    ("layers", None),
    ("layer_groups", None),
)
DCN_FIELDS = ("dcn_data", "dcn_fsdp", "dcn_tensor")


def strip_boxes(tree):
  """nn.Partitioned boxes -> their values (also abstract ones), without the sharding constraint
  that `nn.meta.unbox` applies, which needs a concrete mesh."""
  return jax.tree.map(lambda b: b.value if isinstance(b, nn.Partitioned) else b, tree,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


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


def dcn_shape(mesh_cfg, shape: tuple[int, ...]) -> tuple[int, int, int]:
  """How many of each axis's ways cross the slow network (between TPU slices, or between
  processes on GPU). Optional fields `mesh.dcn_*`, default 1; each must divide its axis size."""
  dcn = tuple(int(mesh_cfg.get(f, 1)) for f in DCN_FIELDS)
  for axis, size, d in zip(MESH_AXES, shape, dcn):
    if d < 1 or size % d:
      raise ConfigError(f"mesh.dcn_{axis}", d, f"a positive divisor of mesh.{axis} = {size}")
  return dcn


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh with Auto axes (flax logical partitioning assumes Auto).

  Within a slice (or host), `jax.make_mesh` orders devices so the innermost axes (tensor, then
  fsdp) get the fastest links. Across TPU slices (or GPU processes) the `mesh.dcn_*` split makes a
  hybrid mesh: each axis is dcn_<axis> blocks of <axis> / dcn_<axis> devices, the blocks on
  different slices, so only that axis's collectives cross the slow network.
  """
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_cfg, len(devices))
  dcn = dcn_shape(mesh_cfg, shape)
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices > 1 and math.prod(dcn) != slices:
    raise ConfigError("mesh", {f: d for f, d in zip(DCN_FIELDS, dcn)},
                      f"dcn sizes multiplying to the {slices} TPU slices these devices span "
                      f"(product is {math.prod(dcn)}); usually mesh.dcn_data={slices}")
  if math.prod(dcn) == 1:
    try:
      return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    except NotImplementedError:  # sizes that map onto the torus only by splitting a physical axis
      from jax.experimental import mesh_utils  # (e.g. 8 x 8 on a 4x4x4 v4-128)
      grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
      return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)
  granules = slices if slices > 1 else len({d.process_index for d in devices})
  if math.prod(dcn) != granules:
    raise ConfigError("mesh", {f: d for f, d in zip(DCN_FIELDS, dcn)},
                      f"dcn sizes multiplying to the {granules} processes (product is {math.prod(dcn)})")
  from jax.experimental import mesh_utils  # only multi-slice / multi-process meshes need it
  ici = tuple(s // d for s, d in zip(shape, dcn))
  grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=slices == 1)
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)


def check_divisible(abstract_boxed_params, mesh, rules=LOGICAL_RULES) -> None:
  """Every sharded dimension must divide by its mesh axes: say which one does not, before compiling.
  `mesh` may be a Mesh or an AbstractMesh (only the axis sizes are read)."""
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
        hint = (f"; or set data.vocab_multiple to a multiple of {n}" if logical[dim] == "vocab" else "")
        raise ConfigError("mesh", dict(mesh.shape), f"axis sizes that divide parameter {name} dim {dim} "
                          f"({logical[dim]}={size}) over mesh axes {axes} (={n}){hint}")


def param_shardings(abstract_boxed_params, mesh, rules=LOGICAL_RULES):
  """NamedSharding per param leaf (unboxed tree structure) from the logical axis names."""
  specs = nn.logical_to_mesh(nn.get_partition_spec(abstract_boxed_params), rules)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params, shardings, mesh):
  """Adam moments shard like their params; counters and other scalars are replicated.

  Abstract throughout (tx.init runs under eval_shape, also for optax's placeholder pass), so this
  works under `jax.set_mesh` of devices this host cannot hold arrays on (ahead-of-time compiles)."""
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  return optax.tree_map_params(lambda p: jax.eval_shape(tx.init, p), lambda _, s: s, abstract_opt,
                               shardings, transform_non_params=lambda _: NamedSharding(mesh, P()))


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, None))


def check_batch(global_batch: int, mesh, grad_accum_steps: int = 1) -> None:
  """The global batch must split evenly over the data-parallel devices, each device's rows over the
  grad_accum_steps microbatches (and, on a concrete mesh, the processes must hold equal blocks of
  it: see `data_shard_of_process`)."""
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch % dp:
    raise ConfigError("data.batch_size", global_batch, f"a multiple of the data-parallel size "
                      f"mesh.data * mesh.fsdp = {dp}")
  if global_batch % (dp * grad_accum_steps):
    raise ConfigError("data.batch_size", global_batch, f"a multiple of data-parallel size {dp} x "
                      f"train.grad_accum_steps {grad_accum_steps} = {dp * grad_accum_steps} (each device's "
                      f"{global_batch // dp} rows split into {grad_accum_steps} microbatches)")
  if isinstance(mesh, jax.sharding.Mesh):
    data_shard_of_process(mesh)


@functools.lru_cache(maxsize=16)
def _shard_groups(mesh: jax.sharding.Mesh) -> tuple[tuple[frozenset, ...], dict[int, int]]:
  """The distinct sets of batch shards (of data * fsdp) that processes hold, ordered by first
  shard, and the set each process holds. Read from the whole mesh: every process agrees."""
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  held: dict[int, set] = {}
  for device, index in batch_sharding(mesh).devices_indices_map((dp, 1)).items():
    held.setdefault(device.process_index, set()).update(range(*index[0].indices(dp)))
  groups = tuple(sorted({frozenset(h) for h in held.values()}, key=min))
  return groups, {p: groups.index(frozenset(h)) for p, h in held.items()}


def data_shard_of_process(mesh, process: int | None = None) -> tuple[int, int]:
  """(index, count): the data loader gives this process block `index` of `count` equal blocks of
  every global batch, and `global_batch` places those rows on its devices.

  Usually count = the number of processes. Processes whose devices hold the same batch shards
  (tensor parallelism across processes, e.g. one process per GPU) share a block. Shards that are
  not one contiguous range (a topology-aware TPU device order) are fine: the global batch is then
  a permutation of the one-process batch, which the mean loss does not see.
  """
  groups, group_of = _shard_groups(mesh)
  if len({len(g) for g in groups}) != 1 or sum(map(len, groups)) != mesh.shape["data"] * mesh.shape["fsdp"]:
    raise ConfigError("mesh", dict(mesh.shape), "a layout where processes hold equal, separate blocks "
                      f"of the batch (they hold overlapping or unequal sets of the data * fsdp shards: "
                      f"{[sorted(g) for g in groups]}); keep mesh.tensor within a host")
  return group_of[jax.process_index() if process is None else process], len(groups)


def global_batch(local_batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """This process's block of rows -> one global array sharded over the batch axes (one or many hosts)."""
  sharding, (_, count) = batch_sharding(mesh), data_shard_of_process(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * count, *v.shape[1:]))
          for k, v in local_batch.items()}
