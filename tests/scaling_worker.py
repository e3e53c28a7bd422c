"""Scale-out test helpers: the shared run settings, the one-device reference run, and (as a script)
the 8-device checks that tests/test_sharding.py runs in a subprocess.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/scaling_worker.py OUT.json ROOT
    python tests/scaling_worker.py cli --config ... --workdir ...   (tests/test_multihost.py)

The pytest process has already initialised JAX with one CPU device, so fake devices need a fresh
process. The script trains a few steps on each mesh, inspects the shardings of the state, restores
one mesh's checkpoint onto others, resumes on another mesh, and tries bad inputs; it writes what it
saw to OUT.json and the tests assert on that.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_utils import REPO, cli_env, run_train  # noqa: E402

# Flat learning rate after warm-up: a run resumed with a larger train.num_steps (the multi-host
# test's second run) follows the same schedule as one that ran straight through.
ARG = "num_steps=6,log_every=1,eval_every=100,checkpoint_every=100,schedule=linear_warmup_only,warmup_steps=3"
CONFIG = f"configs/tiny.py:{ARG}"
MESHES = [(8, 1, 1), (2, 2, 2), (1, 4, 2)]
STOP = 4  # the sharded runs stop (with a checkpoint) here; the resume continues to num_steps


def fake_devices_env(n: int, **extra) -> dict:
  return cli_env(XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", **extra)


def train_losses(workdir) -> dict[int, float]:
  from keel_jax.metrics import read_records
  return {r["step"]: r["loss"] for r in read_records(str(workdir)) if r["kind"] == "train"}


@functools.lru_cache(maxsize=None)
def reference_losses() -> dict[int, float]:
  """Losses of the CLI on one device for num_steps steps; computed once per pytest session and
  shared by test_sharding.py and test_multihost.py."""
  workdir = tempfile.mkdtemp(prefix="keel_reference_")
  try:
    run_train(workdir, config=CONFIG, env=fake_devices_env(1))
    return train_losses(workdir)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


# ---- the 8-device script ---------------------------------------------------------------------------

def _tiny(arg: str = ""):
  import importlib.util
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(REPO, "configs", "tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(",".join(filter(None, [ARG, arg])))


def _with_mesh(cfg, shape):
  cfg.mesh.update(data=shape[0], fsdp=shape[1], tensor=shape[2])
  return cfg


def _state_setup(cfg, mesh):
  """(init, shardings, abstract target) exactly as train() builds them for this mesh; `init(seed)`
  runs under the mesh and rules, as in train()."""
  import flax.linen as nn
  import jax
  from keel_jax import config_lib, sharding
  from keel_jax.checkpoint import abstract_like
  from keel_jax.model import Decoder
  from keel_jax.optimizer import make_optimizer
  from keel_jax.train_step import create_state
  model = Decoder(config_lib.validate(cfg, 257))  # the byte tokenizer's vocabulary
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    init_fn, shardings, _ = create_state(model, make_optimizer(cfg.train), mesh, jax.random.key(0))
    abstract = abstract_like(jax.eval_shape(init_fn, jax.random.key(0)), shardings)

  def init(seed: int):
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      return init_fn(jax.random.key(seed))

  return init, shardings, abstract


def _describe_state(state) -> dict:
  """Per leaf: spec, shape, shard shape on the first device (what the tests assert on)."""
  import jax
  out = {}
  for path, x in jax.tree_util.tree_leaves_with_path(state):
    spec = [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]
    out[jax.tree_util.keystr(path)] = {"spec": spec, "shape": list(x.shape),
                                       "shard": list(x.addressable_shards[0].data.shape)}
  return out


def _record_compiles() -> list[str]:
  """Names of the functions JAX compiles from now on (read from its DEBUG log of each compile)."""
  import logging
  names = []

  class Handler(logging.Handler):
    def emit(self, record):
      if record.msg.startswith("Compiling "):
        names.append(str(record.args[0]))

  logger = logging.getLogger("jax._src.interpreters.pxla")
  logger.setLevel(logging.DEBUG)
  logger.addHandler(Handler(logging.DEBUG))
  logger.propagate = False  # the DEBUG records are for us, not for stderr
  return names


def main(out_path: str, root: str) -> None:
  import jax
  import numpy as np
  from keel_jax import sharding
  from keel_jax.checkpoint import Checkpointer
  from keel_jax.errors import ConfigError
  from keel_jax.train import train

  # Identical programs (the (1,4,2) step again on resume, the (2,2,2) init) compile once.
  jax.config.update("jax_compilation_cache_dir", os.path.join(root, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  compiles = _record_compiles()
  quiet = lambda *_: None
  result = {"devices": jax.device_count(), "losses": {}, "states": {}, "restored": {}, "errors": {}}

  # A few steps on each mesh, each stopping with a checkpoint; then the state as train() creates it.
  for shape in MESHES:
    name = ",".join(map(str, shape))
    workdir = os.path.join(root, name)
    train(_with_mesh(_tiny(), shape), workdir, stop_after=STOP, log=quiet)
    result["losses"][name] = train_losses(workdir)
  cfg = _with_mesh(_tiny(), (2, 2, 2))
  init, _, _ = _state_setup(cfg, sharding.make_mesh(cfg.mesh))
  result["states"]["init 2,2,2"] = _describe_state(init(cfg.train.seed))  # as train() made it

  # Save on (8,1,1), restore onto other meshes and device counts: identical arrays, new shardings.
  # (Checkpointer.restore also checks every leaf against checksums taken from the live state at save.)
  source = os.path.join(root, "8,1,1", "checkpoints")
  saved = None
  for shape, n in [((8, 1, 1), 8), ((1, 4, 2), 8), ((2, 2, 2), 8), ((1, 2, 2), 4), ((1, 1, 1), 1)]:
    cfg = _with_mesh(_tiny(), shape)
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:n])
    ckpt = Checkpointer(source, keep=3)
    state = ckpt.restore(STOP, _state_setup(cfg, mesh)[2])
    ckpt.close()
    leaves = [np.asarray(x) for x in jax.tree.leaves(state)]
    saved = saved or leaves
    name = f"{','.join(map(str, shape))} on {n}"
    result["restored"][name] = {
        "identical": all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(saved, leaves)),
        "num_devices": len(state.params["embed"]["embedding"].sharding.device_set)}
    result["states"][f"restored {name}"] = _describe_state(state)

  # The (8,1,1) run continues on (1,4,2): resumes from its checkpoint through train() itself.
  resumed = os.path.join(root, "resumed")
  shutil.copytree(os.path.join(root, "8,1,1"), resumed)
  train(_with_mesh(_tiny(), (1, 4, 2)), resumed, log=quiet)
  result["losses"]["8,1,1 then 1,4,2"] = train_losses(resumed)

  # Bad inputs: a ConfigError naming the numbers, and nothing of the model compiled before it.
  bad = {"mesh 3,1,1": ((3, 1, 1), ""), "heads over tensor 8": ((1, 1, 8), ""),
         "batch 12 over 8": ((4, 2, 1), "batch_size=12"), "dcn 2 on one process": ((2, 4, 1), "dcn_data=2")}
  for name, (shape, arg) in bad.items():
    before = len(compiles)
    try:
      train(_with_mesh(_tiny(arg), shape), os.path.join(root, "bad"), log=quiet)
      message = None
    except ConfigError as e:
      message = str(e)
    result["errors"][name] = {"message": message, "compiled": compiles[before:]}

  with open(out_path, "w") as f:
    json.dump(result, f)


# ---- the multi-process CLI --------------------------------------------------------------------------

def cli(flags: list[str]) -> None:
  """`python -m keel_jax.train FLAGS` unchanged, plus a last line 'PROCESS {json}' from every
  process: its index, the device count and the loss of each step as this process fetched it
  (only process 0 writes metrics.jsonl, so this is how the test sees process 1).
  KEEL_TEST_STEP_SECONDS=s (env) makes each step take at least s seconds, so a test can signal a
  run in the middle."""
  import time

  import jax
  from absl import app
  from keel_jax import train as train_cli
  fetched = {}
  handle_metrics = train_cli.Loop.handle_metrics

  pause = float(os.environ.get("KEEL_TEST_STEP_SECONDS", "0"))

  def record(self, step, metrics, *rest):
    time.sleep(pause)
    fetched[step] = float(jax.device_get(metrics["loss"]))
    return handle_metrics(self, step, metrics, *rest)

  train_cli.Loop.handle_metrics = record
  try:
    app.run(train_cli.main, argv=["keel_jax.train", *flags])
  finally:
    print("PROCESS " + json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                                   "devices": jax.device_count(), "losses": fetched}), flush=True)


if __name__ == "__main__":
  if sys.argv[1] == "cli":
    cli(sys.argv[2:])
  else:
    main(*sys.argv[1:3])
