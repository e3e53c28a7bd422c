"""Subprocess side of tests/test_aot.py; prints one JSON object.

  python tests/tpu_worker.py compile   # TPU compiles of the tiny Pallas config (needs libtpu)
  python tests/tpu_worker.py cpu_mesh  # 8 simulated CPU devices: Pallas (interpreted) vs XLA norms

Each mode runs all its cases in one process: one import of jax (and libtpu) for all of them.
"""
import json
import os
import sys

MESHES = ((8, 1, 1), (1, 8, 1), (2, 2, 2))
# (slice, mesh): the 8-chip v5p slice on three meshes, then v5p-8 (4 chips) on fsdp and v5e-4 on data.
COMPILE_CASES = [("v5p-16", m) for m in MESHES] + [("v5p-8", (1, 4, 1)), ("v5e-4", (4, 1, 1))]


def tiny_config(mesh, **model):
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
  import tiny
  cfg = tiny.get_config()
  cfg.model.update(norm_impl="pallas", **model)
  cfg.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  return cfg


def compile_cases() -> dict:
  from keel_jax import aot, sharding, tpu_slices
  # 8 x 8 on v4-128's 4x4x4 torus maps only by splitting a physical axis (jax.make_mesh refuses)
  mesh = sharding.make_mesh(dict(data=8, fsdp=8, tensor=1), tpu_slices.parse("v4-128").devices())
  out = {"v4-128 mesh": dict(mesh.shape)}
  for topology, mesh in COMPILE_CASES:
    cfg = tiny_config(mesh)
    reports = aot.compile_steps(cfg, tpu_slices.parse(topology), ("train",))
    out[f"{topology} {mesh}"] = aot.build_report(cfg, tpu_slices.parse(topology), reports)
  return out


def cpu_mesh_cases() -> dict:
  """Loss and gradients of a small Keel model with XLA norms (one device) and with the Pallas
  kernels (interpreted) on each mesh, and how often the Pallas step's jaxpr enters shard_map."""
  import dataclasses

  import flax.linen as nn
  import jax
  import numpy as np

  from keel_jax import sharding
  from keel_jax.model import Decoder, init_params, lm_loss, strip_boxes
  from keel_jax.model_config import ModelConfig

  mc = ModelConfig(vocab_size=64, num_blocks=2, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64,
                   max_seq_len=8)
  params = strip_boxes(init_params(Decoder(mc), jax.random.key(0)))
  tokens = jax.random.randint(jax.random.key(1), (8, 9), 0, 64)

  def run(impl, mesh):
    model = Decoder(dataclasses.replace(mc, norm_impl=impl))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      traced = jax.jit(jax.value_and_grad(lambda p, t: lm_loss(model, p, t))).trace(params, tokens)
      loss, grads = traced.lower().compile()(params, tokens)
    jaxpr = str(traced.jaxpr)
    return {"loss": float(loss), "grads": [np.asarray(g).tolist() for g in jax.tree.leaves(grads)],
            "shard_maps": jaxpr.count("shard_map"), "pallas_calls": jaxpr.count("pallas_call")}

  out = {"xla": run("xla", sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]))}
  for shape in MESHES:
    out[str(shape)] = run("pallas", sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape))))
  return out


if __name__ == "__main__":
  result = compile_cases() if sys.argv[1] == "compile" else cpu_mesh_cases()
  print(json.dumps(result))
