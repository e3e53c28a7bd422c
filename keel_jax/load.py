"""One call from a workdir to a usable model: `run = load_run('runs/x')`, for notebooks and the
sample/eval CLIs.

    run = load_run(workdir)            # newest checkpoint; load_run(workdir, step=200) for another
    logits = run.model.apply({'params': run.params}, tokens_BxT)

Only the parameters are read from the checkpoint (an Orbax partial restore of `state.params`): the
optimiser state, about twice the size of the parameters, is never loaded. The config comes from
`workdir/config.json` laid over today's `config_lib.base_config()`, so fields added to the code
after the run was trained take their defaults. Nothing in the workdir is written.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from keel_jax import config_lib
from keel_jax import tokenizer as tokenizer_lib
from keel_jax.data import synthetic
from keel_jax.model import Decoder, init_params, strip_boxes
from keel_jax.model_config import ModelConfig


class RunError(ValueError):
  """The workdir holds no usable run: no config.json, no checkpoint, or not the asked-for step."""


@dataclasses.dataclass
class Run:
  """A trained model as loaded from its workdir. `params` are float32 arrays on one device."""
  model: Decoder
  params: Any
  tokenizer: Any  # keel_jax.tokenizer.ByteTokenizer | BPETokenizer | synthetic.SyntheticTokenizer
  config: ml_collections.ConfigDict  # the run's resolved config (model, data, train, mesh)
  model_cfg: ModelConfig
  step: int
  workdir: str

  def decode_model(self) -> Decoder:
    """The same model with a KV cache (decode=True), for keel_jax.generate."""
    return Decoder(self.model_cfg, decode=True)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """`workdir/config.json` over the current base config (new fields keep their defaults)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise RunError(f"{workdir!r} is not a training workdir: it has no config.json "
                   "(written by `python -m keel_jax.train --workdir DIR` when training starts)")
  with open(path) as f:
    saved = json.load(f)
  merged = config_lib.base_config().to_dict()
  for section, fields in saved.items():
    if isinstance(fields, dict) and isinstance(merged.get(section), dict):
      merged[section].update(fields)
    else:
      merged[section] = fields
  return ml_collections.ConfigDict(merged)


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps of the complete (finalized) checkpoints in `workdir/checkpoints`, ascending."""
  return sorted(ocp.utils.checkpoint_steps(os.path.join(workdir, "checkpoints")))


def choose_step(workdir: str, step: int | None = None) -> int:
  """`step` if a checkpoint of it exists, else the newest; RunError saying what exists otherwise."""
  steps = checkpoint_steps(workdir)
  if not steps:
    raise RunError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}: train first "
                   "(`python -m keel_jax.train --workdir DIR ...` saves every train.checkpoint_every steps)")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise RunError(f"no checkpoint of step {step} in {os.path.join(workdir, 'checkpoints')}; "
                   f"steps available: {steps}")
  return step


def load_tokenizer(workdir: str, cfg: ml_collections.ConfigDict):
  """The run's tokenizer: `workdir/tokenizer/`, or the task's for synthetic data (none is saved)."""
  if cfg.data.source == "synthetic":
    return synthetic.SyntheticTokenizer(synthetic.parse_task(cfg.data.synthetic_task))
  directory = os.path.join(workdir, "tokenizer")
  if not os.path.isdir(directory):
    raise RunError(f"{workdir!r} has no tokenizer/ directory (written by training when it loads data)")
  return tokenizer_lib.load_tokenizer(directory)


def restore_params(checkpoint_dir: str, abstract_params, device=None):
  """Only `state.params` of one checkpoint step directory, onto `device` (default: the first)."""
  sharding = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
  target = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                                   abstract_params)}
  args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                partial_restore=True)
  with ocp.PyTreeCheckpointer() as ckptr:
    return ckptr.restore(os.path.join(checkpoint_dir, "state"), args=args)["params"]


def load_run(workdir: str, step: int | None = None) -> Run:
  """Model, params, tokenizer and config of the run in `workdir` at `step` (default: newest).

  Raises RunError (no config / checkpoint / step), ConfigError or DataError (bad saved config or
  tokenizer). The model is built with `decode=False`; `run.decode_model()` gives the cached one.
  """
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):
    raise RunError(f"workdir {workdir!r} does not exist")
  cfg = load_config(workdir)
  step = choose_step(workdir, step)
  tok = load_tokenizer(workdir, cfg)
  model_cfg = config_lib.validate(cfg, tok.vocab_size)
  model = Decoder(model_cfg)
  abstract = strip_boxes(jax.eval_shape(lambda r: init_params(model, r), jax.random.key(0)))
  params = restore_params(os.path.join(workdir, "checkpoints", str(step)), abstract)
  return Run(model=model, params=params, tokenizer=tok, config=cfg, model_cfg=model_cfg, step=step,
             workdir=workdir)
