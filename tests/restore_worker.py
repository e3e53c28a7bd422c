"""Trains a tiny run on 8 fake devices, mesh data=2 x fsdp=2 x tensor=2, with Pallas norms
(interpreted on CPU), then restores it for sampling onto that mesh and writes the logits of fixed
tokens: `XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/restore_worker.py WORKDIR OUT.npz`
(tests/test_load.py restores the same checkpoint on one device with XLA norms and compares)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scaling_worker import _tiny  # noqa: E402

MESH = "mesh.data=2,mesh.fsdp=2,mesh.tensor=2"


def tokens_BxT():
  import numpy as np
  return np.random.default_rng(0).integers(0, 256, (2, 16)).astype(np.int32)


def logits(run):
  import jax
  with run.context():
    return jax.device_get(jax.jit(run.model.apply)({"params": run.params}, tokens_BxT()))


def main(workdir: str, out: str) -> None:
  import jax
  import numpy as np
  from keel_jax.load import load_run
  from keel_jax.train import train
  assert jax.device_count() == 8
  cfg = _tiny("num_steps=2,checkpoint_every=2,eval_every=2,norm_impl=pallas,data=2,fsdp=2,tensor=2")
  train(cfg, workdir, log=lambda *_: None)
  run = load_run(workdir, overrides=MESH)
  spec = run.params["embed"]["embedding"].sharding.spec
  np.savez(out, logits=logits(run), mesh=np.asarray(list(run.mesh.shape.values())), embed_spec=str(spec),
           norm_impl=run.model_cfg.norm_impl)


if __name__ == "__main__":
  main(*sys.argv[1:3])
