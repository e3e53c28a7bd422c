"""keel_jax.aot and the Pallas norms on meshes: slice names, bad input before compiling, TPU compiles
of the tiny Pallas config (libtpu; skipped without it), Pallas == XLA on 8 simulated CPU devices.

TPU compiles run in a subprocess (tests/tpu_worker.py) with the environment a TPU compile needs on a
CPU host, so libtpu never loads into the test process's CPU backend."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cli_utils import REPO, cli_env, run_module
from keel_jax import aot, tpu_slices
from keel_jax.errors import ConfigError
from keel_jax.flops import hardware_flops_per_token, matmul_flops_per_token
from keel_jax.model_config import ModelConfig
from tpu_worker import COMPILE_CASES, MESHES, tiny_config

TPU_ENV = aot.TPU_ENV  # with cli_env's JAX_PLATFORMS=cpu
needs_libtpu = pytest.mark.skipif(not aot.libtpu_available(), reason="libtpu not installed (pip install -e '.[tpu]')")


def worker(mode: str, env: dict) -> dict:
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "tpu_worker.py"), mode], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- slice names ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,chips,topology,per_host", [
    ("v5p-8", 4, "v5p:2x2x1", (2, 2, 1)), ("v5p-16", 8, "v5p:2x2x2", (2, 2, 1)),
    ("v5p-256", 128, "v5p:4x4x8", (2, 2, 1)), ("v4-128", 64, "v4:4x4x4", (2, 2, 1)),
    ("v5litepod-4", 4, "v5e:2x2", (2, 2, 1)), ("v5e-8", 8, "v5e:2x4", (2, 4, 1)),
    ("v5e-256", 256, "v5e:16x16", (2, 2, 1)), ("v6e-64", 64, "v6e:8x8", (2, 2, 1)), ("v5e-1", 1, "v5e:1x1", (1, 1, 1)),
])
def test_slice_names_count_cores_for_v4_v5p_and_chips_for_v5e_v6e(name, chips, topology, per_host):
  s = tpu_slices.parse(name)
  assert (s.chips, s.topology, s.chips_per_host_bounds) == (chips, topology, per_host)


@pytest.mark.parametrize("name", ["v5p-7", "v5p-4", "v7-8", "v5e-3", "v5e-512", "tpu", "v4-x"])
def test_unknown_slice_lists_the_known_names(name):
  with pytest.raises(tpu_slices.UnknownSlice, match="v5p-256.*v6e-64"):
    tpu_slices.parse(name)


def test_parse_oom_bytes_reads_the_compilers_amount():
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
         "(1.66T) exceeds available HBM (15.75G).")  # as libtpu 0.0.42 words it
  assert aot.parse_oom_bytes(msg) == int(1.66 * 2 ** 40)
  assert aot.parse_oom_bytes("Ran out of memory in memory space hbm. Used 33.02G of 15.75G hbm.") == int(33.02 * 2 ** 30)
  assert aot.parse_oom_bytes("RESOURCE_EXHAUSTED: something else") == 0


def test_hardware_flops_add_the_recomputed_forward_of_the_remat_policy():
  mc = ModelConfig(vocab_size=320, num_blocks=4, d_model=64, num_heads=4, num_kv_heads=2, d_ff=128,
                   max_seq_len=64, remat_policy="save_dots")
  f = matmul_flops_per_token(mc)
  assert hardware_flops_per_token(mc) == f["train_flops_per_token_attention_full"]
  full = hardware_flops_per_token(ModelConfig(**{**mc.__dict__, "remat_policy": "full"}))
  layers_fwd = f["weights_fwd"] - 2 * 64 * 320 + f["attention_fwd"]
  assert full == pytest.approx(f["train_flops_per_token_attention_full"] + layers_fwd)


# ---- bad input, before any compile ------------------------------------------------------------------

def test_mesh_or_batch_that_does_not_divide_is_a_config_error_before_compiling():
  with pytest.raises(ConfigError, match="multiplying to the 4 devices"):
    aot.run(tiny_config((8, 1, 1)), "v5p-8")
  with pytest.raises(ConfigError, match="data.batch_size"):
    cfg = tiny_config((4, 1, 1))
    cfg.data.batch_size = 6
    aot.run(cfg, "v5e-4")


def test_missing_libtpu_says_how_to_install(monkeypatch):
  monkeypatch.setattr(aot, "libtpu_available", lambda: False)
  with pytest.raises(aot.AotError, match=r"pip install -e '\.\[tpu\]'"):
    aot.run(tiny_config((1, 4, 1)), "v5p-8")


@pytest.mark.parametrize("args,message", [
    (["--topology", "v5p-7"], "unknown TPU slice 'v5p-7'; known: v4-8"),
    (["--topology", "v5p-8", "--config.mesh.data=8"], "sizes multiplying to the 4 devices"),
    (["--topology", "v5p-8", "--config.mesh.dta=4"], "did you mean mesh.data"),
])
def test_cli_bad_input_exits_1_without_traceback(args, message):
  proc = run_module("keel_jax.aot", "--config", "configs/tiny.py", *args, check=False, env=cli_env(**TPU_ENV))
  assert proc.returncode == aot.EXIT_INPUT_ERROR, proc.stderr[-2000:]
  assert message in proc.stderr and "Traceback" not in proc.stderr


# ---- TPU compiles (libtpu) --------------------------------------------------------------------------

@needs_libtpu
@pytest.mark.slow
def test_tiny_pallas_config_compiles_for_tpu_slices_with_mosaic_kernels():
  seen = worker("compile", cli_env(**TPU_ENV))
  assert seen.pop("v4-128 mesh") == {"data": 8, "fsdp": 8, "tensor": 1}
  assert sorted(seen) == sorted(f"{t} {m}" for t, m in COMPILE_CASES)
  for case, report in seen.items():
    assert report["fits"], case
    assert report["mosaic_calls"] > 0, case  # the kernels, not the interpreter, on every mesh
    assert 0 < report["per_chip_bytes"] <= report["hbm_bytes"]
    assert 0 < report["roofline"]["mfu_ceiling"] <= 1


@needs_libtpu
@pytest.mark.slow
def test_cli_paper_config_on_v5e_4_data_parallel_exits_2_and_says_what_would_help():
  proc = run_module("keel_jax.aot", "--config", "configs/paper_keel_512.py", "--topology", "v5e-4",
                    "--config.mesh.data=4", "--config.mesh.fsdp=1", "--steps=train", "--json", check=False,
                    env=cli_env(**TPU_ENV))
  assert proc.returncode == aot.EXIT_DOES_NOT_FIT, proc.stderr[-3000:]
  report = json.loads(proc.stdout)
  assert not report["fits"] and report["per_chip_bytes"] > report["hbm_bytes"] == 16 * 2 ** 30
  # its train state alone, ~3.2 B params x 12 bytes (float32 param + two Adam moments) = 36 GiB, is on
  # every data-parallel chip: sharding it over the 4 chips (fsdp) is the first thing to suggest
  assert any(s["overrides"].get("mesh.fsdp") == 4 for s in report["suggestions"])


# ---- Pallas norms under shard_map on simulated devices -------------------------------------------------

@pytest.mark.slow
def test_pallas_norms_in_shard_map_equal_xla_in_loss_and_gradients_on_8_cpu_devices():
  seen = worker("cpu_mesh", cli_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  xla = seen.pop("xla")  # one device, XLA norms: the reference
  assert sorted(seen) == sorted(str(m) for m in MESHES) and xla["pallas_calls"] == 0
  for shape, pallas in seen.items():
    assert pallas["shard_maps"] > 0 and pallas["pallas_calls"] > 0, shape
    np.testing.assert_allclose(pallas["loss"], xla["loss"], rtol=1e-6)
    for g_pallas, g_xla in zip(pallas["grads"], xla["grads"]):
      np.testing.assert_allclose(g_pallas, g_xla, rtol=1e-4, atol=1e-7)


def test_tpu_generations_are_found_by_jax_device_kind():
  assert tpu_slices.generation_of("TPU v5").name == "v5p"  # jax calls a v5p chip "TPU v5"
  assert tpu_slices.generation_of("TPU v5 lite").name == "v5e"
  assert tpu_slices.generation_of("NVIDIA H100 80GB HBM3") is None
