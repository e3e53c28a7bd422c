"""Sharded training on 8 fake CPU devices: same losses as one device, declared shardings, restore
across meshes, bad input refused before compiling. The 8-device work runs once, in a subprocess
(tests/scaling_worker.py); these tests read what it saw."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from cli_utils import REPO
from keel_jax import sharding
from keel_jax.errors import ConfigError
from keel_jax.model import Decoder, init_params
from keel_jax.model_config import ModelConfig
from scaling_worker import MESHES, STOP, fake_devices_env, reference_losses

# float32 with other reduction orders: ~2e-7 relative seen; a wrong batch shard or stale parameter
# moves the loss by ~1e-2.
RTOL = 2e-5


@pytest.fixture(scope="module")
def seen(tmp_path_factory):
  root = tmp_path_factory.mktemp("mesh_runs")
  out = root / "result.json"
  log = root / "worker.log"
  with open(log, "w") as f:  # a file, not a pipe: nobody reads while the reference run below goes on
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "scaling_worker.py"), str(out), str(root)],
                            cwd=REPO, env=fake_devices_env(8), stdout=f, stderr=subprocess.STDOUT)
    try:
      reference_losses()  # the one-device run, meanwhile (both are mostly single-threaded compiles)
      proc.wait(timeout=900)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  stderr = log.read_text()
  assert proc.returncode == 0, stderr[-5000:]
  assert "Involuntary full rematerialization" not in stderr  # the embedding pitfall stays fixed
  result = json.loads(out.read_text())
  assert result["devices"] == 8
  return result


def losses(record) -> list[tuple[int, float]]:
  return sorted((int(k), v) for k, v in record.items())


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [",".join(map(str, m)) for m in MESHES])
def test_sharded_training_gives_the_one_device_losses(seen, mesh):
  ref = losses(reference_losses())
  got = losses(seen["losses"][mesh])
  assert [s for s, _ in got] == list(range(1, STOP + 1))
  np.testing.assert_allclose([l for _, l in got], [l for _, l in ref[:STOP]], rtol=RTOL)


@pytest.mark.slow
def test_resuming_on_another_mesh_continues_the_same_run(seen):
  """Saved on (8,1,1) at step 4, resumed by train() on (1,4,2): steps 5-6 as if never moved."""
  ref = losses(reference_losses())
  got = losses(seen["losses"]["8,1,1 then 1,4,2"])
  assert [s for s, _ in got] == [s for s, _ in ref]
  np.testing.assert_allclose([l for _, l in got], [l for _, l in ref], rtol=RTOL)


@pytest.mark.slow
def test_checkpoint_restores_onto_other_meshes_and_device_counts_identically(seen):
  restored = seen["restored"]
  assert {k: v["num_devices"] for k, v in restored.items()} == {
      "8,1,1 on 8": 8, "1,4,2 on 8": 8, "2,2,2 on 8": 8, "1,2,2 on 4": 4, "1,1,1 on 1": 1}
  assert all(v["identical"] for v in restored.values()), restored  # bitwise, params and optimiser state


# What the rules declare, per mesh axis: [] = replicated. 'layers' (the scan axis) stays whole.
EXPECTED = {
    "['embed']['embedding']": [["tensor", "fsdp"], None],  # vocab rows, so the lookup shards cleanly
    "['layers']['attn']['attn']['q']['kernel']": [None, "fsdp", "tensor", None],  # layers, embed, heads, kv
    "['layers']['attn']['attn']['k']['kernel']": [None, "fsdp", "tensor", None],  # ..., kv_heads, kv
    "['layers']['attn']['attn']['o']['kernel']": [None, "tensor", None, "fsdp"],  # layers, heads, kv, embed
    "['layers']['ffn']['mlp']['gate']['kernel']": [None, "fsdp", "tensor"],  # layers, embed, mlp
    "['layers']['ffn']['mlp']['down']['kernel']": [None, "tensor", "fsdp"],  # layers, mlp, embed
}


@pytest.mark.slow
@pytest.mark.parametrize("state", ["init 2,2,2", "restored 2,2,2 on 8", "restored 1,4,2 on 8"])
def test_params_and_optimiser_state_carry_the_declared_shardings(seen, state):
  leaves = seen["states"][state]
  mesh = dict(zip(("data", "fsdp", "tensor"), map(int, state.split()[1].split(","))))
  for name, spec in EXPECTED.items():
    for prefix in (".params", ".opt_state[1][0].mu", ".opt_state[1][0].nu"):  # Adam moments like params
      leaf = leaves[prefix + name]
      assert leaf["spec"] == spec, (prefix + name, leaf)
      ways = [np.prod([mesh[a] for a in ([s] if isinstance(s, str) else s or [])]) for s in spec]
      assert leaf["shard"] == [n // w for n, w in zip(leaf["shape"], ways)], (prefix + name, leaf)
  norms = [k for k in leaves if k.endswith("['scale']")]
  assert norms and all(leaves[k]["spec"] == [None, None] for k in norms)  # (layers, norm): replicated
  for name in (".step", ".skipped", ".opt_state[1][0].count"):
    assert leaves[name]["spec"] == []
  # Every Adam moment matches its parameter, whatever the model holds.
  for k, v in leaves.items():
    if k.startswith(".opt_state[1][0].mu"):
      assert v["spec"] == leaves[".params" + k[len(".opt_state[1][0].mu"):]]["spec"]
  # FSDP x tensor = 4 (2,2,2) or 8 (1,4,2): each device holds that fraction of the matrices.
  ways = mesh["fsdp"] * mesh["tensor"]
  big = [v for k, v in leaves.items() if k.startswith(".params") and len(v["shape"]) >= 2 and "scale" not in k]
  assert sum(np.prod(v["shard"]) for v in big) * ways == sum(np.prod(v["shape"]) for v in big)


@pytest.mark.slow
@pytest.mark.parametrize("case,numbers", [
    ("mesh 3,1,1", ["'data': 3", "8 devices", "product is 3"]),
    ("heads over tensor 8", ["kv_heads=2", "('tensor',) (=8)"]),
    ("batch 12 over 8", ["= 12", "mesh.data * mesh.fsdp = 8"]),
    ("dcn 2 on one process", ["'dcn_data': 2", "1 processes"]),
])
def test_bad_mesh_or_batch_is_a_config_error_naming_the_numbers_before_compiling(seen, case, numbers):
  error = seen["errors"][case]
  assert error["message"] is not None, case
  for text in numbers:
    assert text in error["message"], (text, error["message"])
  # Nothing of the model was compiled: at most the PRNG key from the seed.
  assert all("seed" in f or "stage" in f for f in error["compiled"]), error["compiled"]


# ---- in-process: the pure parts, on abstract meshes ------------------------------------------------

def test_mesh_shape_fills_in_minus_one_and_checks_the_product():
  assert sharding.mesh_shape(dict(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
  assert sharding.mesh_shape(dict(data=1, fsdp=-1, tensor=2), 8) == (1, 4, 2)
  with pytest.raises(ConfigError, match="fixed part \\(3\\) divides the 8 devices"):
    sharding.mesh_shape(dict(data=-1, fsdp=3, tensor=1), 8)
  with pytest.raises(ConfigError, match="multiplying to the 8 devices \\(product is 16\\)"):
    sharding.mesh_shape(dict(data=4, fsdp=2, tensor=2), 8)
  with pytest.raises(ConfigError, match="mesh.dcn_fsdp"):
    sharding.dcn_shape(dict(dcn_fsdp=3), (2, 4, 1))


def test_divisibility_is_checked_per_parameter_on_an_abstract_mesh():
  cfg = ModelConfig(vocab_size=320, max_seq_len=16, num_blocks=1, d_model=48, num_heads=6, num_kv_heads=3,
                    d_ff=96)
  boxed = jax.eval_shape(lambda: init_params(Decoder(cfg), jax.random.key(0)))
  mesh = lambda *sizes: jax.sharding.AbstractMesh(sizes, sharding.MESH_AXES)
  sharding.check_divisible(boxed, mesh(2, 4, 1))
  for sizes, text in [((1, 1, 2), "(kv_heads=3) over mesh axes ('tensor',) (=2)"),
                      ((1, 32, 1), "(embed=48) over mesh axes ('fsdp',) (=32)"),
                      ((1, 1, 3), "(vocab=320) over mesh axes ('tensor', 'fsdp') (=3); or set data.vocab_multiple")]:
    with pytest.raises(ConfigError) as e:
      sharding.check_divisible(boxed, mesh(*sizes))
    assert text in str(e.value)


def test_batch_must_divide_by_the_data_parallel_size():
  mesh = jax.sharding.AbstractMesh((2, 3, 1), sharding.MESH_AXES)
  sharding.check_batch(12, mesh)
  with pytest.raises(ConfigError, match="= 8 is not allowed.*mesh.data \\* mesh.fsdp = 6"):
    sharding.check_batch(8, mesh)


def test_rules_never_use_a_mesh_axis_twice_in_one_array():
  """Activations keep 'embed' whole (the batch took fsdp); the untied head shards vocab, not embed."""
  with nn.logical_axis_rules(sharding.LOGICAL_RULES):
    assert tuple(nn.logical_to_mesh_axes(("batch", "length", "embed"))) == (("data", "fsdp"), None, None)
    assert tuple(nn.logical_to_mesh_axes(("batch", "length", "mlp"))) == (("data", "fsdp"), None, "tensor")
    assert tuple(nn.logical_to_mesh_axes(("embed", "vocab"))) == (None, ("tensor", "fsdp"))
    assert tuple(nn.logical_to_mesh_axes(("layers", "embed", "mlp"))) == (None, "fsdp", "tensor")


class FakeDevice:
  """Enough of a jax Device for Mesh layouts: which process owns it."""
  platform = device_kind = "cpu"

  def __init__(self, id: int, process_index: int):
    self.id, self.process_index = id, process_index

  def __repr__(self):
    return f"FakeDevice({self.id}, process {self.process_index})"


def fake_mesh(shape, processes_in_mesh_order):
  devices = np.array([FakeDevice(i, p) for i, p in enumerate(processes_in_mesh_order)]).reshape(shape)
  return jax.sharding.Mesh(devices, sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


@pytest.mark.parametrize("shape,owners,blocks", [
    ((2, 2, 2), [0, 0, 1, 1, 2, 2, 3, 3], [(0, 4), (1, 4), (2, 4), (3, 4)]),  # 2 devices each: one block each
    ((2, 2, 2), list(range(8)), [(i // 2, 4) for i in range(8)]),  # 1 device each: tensor peers share a block
    ((1, 1, 8), [0] * 4 + [1] * 4, [(0, 1), (0, 1)]),  # tensor across both: both read the whole batch
    ((1, 4, 1), [0, 1, 0, 1], [(0, 2), (1, 2)]),  # shards {0, 2} and {1, 3}: not contiguous, still fine
])
def test_each_process_reads_the_block_of_the_batch_its_devices_hold(shape, owners, blocks):
  mesh = fake_mesh(shape, owners)
  assert [sharding.data_shard_of_process(mesh, p) for p in sorted(set(owners))] == blocks


def test_processes_holding_overlapping_batch_shards_are_refused():
  mesh = fake_mesh((1, 2, 2), [0, 0, 0, 1])  # process 0: shards {0, 1}, process 1: shard {1}
  with pytest.raises(ConfigError, match="overlapping or unequal sets of the data \\* fsdp shards: \\[\\[0, 1\\], \\[1\\]\\]"):
    sharding.data_shard_of_process(mesh, 0)


def test_dcn_split_puts_that_axis_across_processes():
  devices = [FakeDevice(i, i // 4) for i in range(8)]  # 2 processes ("hosts") of 4 devices
  mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2, dcn_fsdp=2), devices)
  owners = np.vectorize(lambda d: d.process_index)(mesh.devices)
  assert owners.tolist() == [[[0, 0], [0, 0], [1, 1], [1, 1]]]  # fsdp = 2 processes x 2 within each
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2, dcn_data=2), devices)
  assert np.vectorize(lambda d: d.process_index)(mesh.devices)[:, 0, 0].tolist() == [0, 1]
  with pytest.raises(ConfigError, match="multiplying to the 2 processes \\(product is 4\\)"):
    sharding.make_mesh(dict(data=4, fsdp=2, tensor=1, dcn_data=4), devices)
