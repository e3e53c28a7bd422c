"""One call from a workdir to a usable model: `run = load_run('runs/x')`, for notebooks and the
sample/eval CLIs.

    run = load_run(workdir)            # newest checkpoint; load_run(workdir, step=200) for another
    logits = run.model.apply({'params': run.params}, tokens_BxT)

Only the parameters are read from the checkpoint (an Orbax partial restore of `state.params`): the
optimiser state, about twice the size of the parameters, is never loaded. The config comes from
`workdir/config.json` laid over today's `config_lib.base_config()`, so fields added to the code
after the run was trained take their defaults. Nothing in the workdir is written. The workdir may
be local or gs:// (keel_jax/paths.py).

Restore anywhere: the parameters go onto the machine the caller runs on, whatever mesh trained
them. By default onto one device, or sharded over all devices (fsdp) when they would fill more
than half of one device's memory; `overrides='mesh.fsdp=4,mesh.tensor=2'` picks the mesh as in
training (the training sharding rules apply). Overrides may also set the model fields that do not
change the parameters (model_config.NON_PARAMETER_FIELDS: `model.norm_impl=xla` evaluates a run
trained with Pallas norms where Pallas is not available); any other field is refused.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import flags
from ml_collections import config_flags

from keel_jax import config_lib, paths, sharding
from keel_jax import tokenizer as tokenizer_lib
from keel_jax.data import synthetic
from keel_jax.errors import ConfigError
from keel_jax.model import Decoder, init_params, strip_boxes
from keel_jax.model_config import NON_PARAMETER_FIELDS, ModelConfig


class RunError(ValueError):
  """The workdir holds no usable run: no config.json, no checkpoint, or not the asked-for step."""


@dataclasses.dataclass
class Run:
  """A trained model as loaded from its workdir. `params` are float32 arrays on `mesh` (None: one
  device). Apply the model under `run.context()` so sharded params meet the training rules."""
  model: Decoder
  params: Any
  tokenizer: Any  # keel_jax.tokenizer.ByteTokenizer | BPETokenizer | synthetic.SyntheticTokenizer
  config: ml_collections.ConfigDict  # the run's resolved config (model, data, train, mesh)
  model_cfg: ModelConfig
  step: int
  workdir: str
  mesh: Any = None

  def decode_model(self) -> Decoder:
    """The same model with a KV cache (decode=True), for keel_jax.generate."""
    return Decoder(self.model_cfg, decode=True)

  def context(self):
    """`with run.context():` the mesh and logical axis rules (a no-op on one device)."""
    import contextlib
    stack = contextlib.ExitStack()
    if self.mesh is not None:
      stack.enter_context(jax.set_mesh(self.mesh))
      stack.enter_context(nn.logical_axis_rules(sharding.LOGICAL_RULES))
    return stack


def load_config(workdir) -> ml_collections.ConfigDict:
  """`workdir/config.json` over the current base config (new fields keep their defaults)."""
  path = paths.path(workdir) / "config.json"
  if not path.exists():
    raise RunError(f"{str(workdir)!r} is not a training workdir: it has no config.json "
                   "(written by `python -m keel_jax.train --workdir DIR` when training starts)")
  saved = json.loads(path.read_text())
  merged = config_lib.base_config().to_dict()
  for section, fields in saved.items():
    if isinstance(fields, dict) and isinstance(merged.get(section), dict):
      merged[section].update(fields)
    else:
      merged[section] = fields
  return ml_collections.ConfigDict(merged)


def checkpoint_steps(workdir) -> list[int]:
  """Steps of the complete (finalized) checkpoints in `workdir/checkpoints`, ascending."""
  directory = paths.path(workdir) / "checkpoints"
  return sorted(ocp.utils.checkpoint_steps(directory)) if directory.exists() else []


def choose_step(workdir, step: int | None = None) -> int:
  """`step` if a checkpoint of it exists, else the newest; RunError saying what exists otherwise."""
  steps = checkpoint_steps(workdir)
  if not steps:
    raise RunError(f"no checkpoint in {paths.path(workdir) / 'checkpoints'}: train first "
                   "(`python -m keel_jax.train --workdir DIR ...` saves every train.checkpoint_every steps)")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise RunError(f"no checkpoint of step {step} in {paths.path(workdir) / 'checkpoints'}; "
                   f"steps available: {steps}")
  return step


def load_tokenizer(workdir, cfg: ml_collections.ConfigDict):
  """The run's tokenizer: `workdir/tokenizer/`, or the task's for synthetic data (none is saved)."""
  if cfg.data.source == "synthetic":
    return synthetic.SyntheticTokenizer(synthetic.parse_task(cfg.data.synthetic_task))
  directory = paths.path(workdir) / "tokenizer"
  if not directory.exists():
    raise RunError(f"{str(workdir)!r} has no tokenizer/ directory (written by training when it loads data)")
  return tokenizer_lib.load_tokenizer(directory)


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: str) -> None:
  """'mesh.fsdp=2,model.norm_impl=xla' onto `cfg`: mesh fields and NON_PARAMETER_FIELDS only. Mesh
  fields start from the defaults, not from the training machine's mesh."""
  if any(k.startswith("mesh.") for k in config_lib.parse_arg(overrides)):
    cfg.mesh = config_lib.base_config().mesh
  for key in config_lib.parse_arg(overrides):
    section, _, name = key.partition(".")
    if not (section == "mesh" or (section == "model" and name in NON_PARAMETER_FIELDS)):
      raise ConfigError(key, config_lib.parse_arg(overrides)[key], "mesh.* or a model field that does not "
                        f"change the parameters (model.{{{', '.join(NON_PARAMETER_FIELDS)}}}): the checkpoint "
                        "fixes every other field")
  config_lib.apply_arg(cfg, overrides)


def choose_mesh(cfg: ml_collections.ConfigDict, mesh_given: bool, abstract_boxed):
  """The mesh the params go onto: the given mesh.* fields; else None (one device) if they take at
  most half of one device's memory, else fsdp over all devices."""
  if not mesh_given:
    stats = jax.devices()[0].memory_stats() or {}
    nbytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(strip_boxes(abstract_boxed)))
    if not stats.get("bytes_limit") or nbytes <= stats["bytes_limit"] / 2 or jax.device_count() == 1:
      return None
    cfg.mesh.update(data=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1)
  mesh = sharding.make_mesh(cfg.mesh)
  sharding.check_divisible(abstract_boxed, mesh)
  return mesh


def restore_params(checkpoint_dir, abstract_params, shardings=None):
  """Only `state.params` of one checkpoint step directory, with `shardings` (a tree like the
  params; default: all on the first device)."""
  if shardings is None:
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract_params)
  target = {"params": jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                   abstract_params, shardings)}
  args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                partial_restore=True)
  with ocp.PyTreeCheckpointer() as ckptr:
    return ckptr.restore(paths.path(checkpoint_dir) / "state", args=args)["params"]


def load_run(workdir, step: int | None = None, overrides: str = "") -> Run:
  """Model, params, tokenizer and config of the run in `workdir` at `step` (default: newest).

  `overrides`: 'mesh.fsdp=2,model.norm_impl=xla' (see the module docstring). Raises RunError (no
  config / checkpoint / step), ConfigError or DataError (bad saved config, override or tokenizer).
  The model is built with `decode=False`; `run.decode_model()` gives the cached one.
  """
  workdir = paths.path(workdir)
  if not workdir.exists() and not paths.is_remote(workdir):
    raise RunError(f"workdir {str(workdir)!r} does not exist")
  cfg = load_config(workdir)
  apply_overrides(cfg, overrides)
  step = choose_step(workdir, step)
  tok = load_tokenizer(workdir, cfg)
  model_cfg = config_lib.validate(cfg, tok.vocab_size)
  model = Decoder(model_cfg)
  abstract_boxed = jax.eval_shape(lambda r: init_params(model, r), jax.random.key(0))
  mesh = choose_mesh(cfg, any(k.startswith("mesh.") for k in config_lib.parse_arg(overrides)), abstract_boxed)
  shardings = sharding.param_shardings(abstract_boxed, mesh) if mesh is not None else None
  params = restore_params(workdir / "checkpoints" / str(step), strip_boxes(abstract_boxed), shardings)
  return Run(model=model, params=params, tokenizer=tok, config=cfg, model_cfg=model_cfg, step=step,
             workdir=str(workdir), mesh=mesh)


def define_override_flags() -> None:
  """`--config.mesh.*` and `--config.model.<field>` for the sample/eval CLIs, read by
  `overrides_from_flags()` (only the fields given; load_run refuses parameter-shaping ones)."""
  base = config_lib.base_config()
  config_flags.DEFINE_config_dict("config", ml_collections.ConfigDict({"mesh": base.mesh, "model": base.model}),
                                  "Overrides of the run's config: --config.mesh.fsdp=4, --config.model.norm_impl=xla")


def overrides_from_flags() -> str:
  f = flags.FLAGS
  return ",".join(f"{n[len('config.'):]}={f[n].value}" for n in f if n.startswith("config.") and f[n].present)
