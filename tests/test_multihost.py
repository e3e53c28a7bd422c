"""Two real processes joined by jax.distributed (CPU backend, localhost coordinator), each with two
fake devices, run the training CLI: one run on a 4-device mesh spanning both, then a resume on
another mesh. Both processes see the one-process losses; only process 0 writes or logs. A SIGTERM
to one process stops both at one agreed step. (Layouts that no two processes can feed are tested
on fake devices in test_sharding.py.)"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cli_utils import REPO
from keel_jax.metrics import read_records
from scaling_worker import CONFIG, STOP, fake_devices_env, free_port, reference_losses, train_losses

pytestmark = pytest.mark.slow
RTOL = 2e-5  # as in test_sharding.py


def run_two_processes(workdir, logs, *flags: str, via: str = "flags", timeout: int = 300) -> list[dict]:
  """Both processes of `scaling_worker.py cli` (the train CLI); [{'rc', 'stdout', 'stderr',
  'report'}] per process. `via`: 'flags' (--coordinator_address ...) or 'env' (JAX_* variables)."""
  return collect(*start_two_processes(workdir, logs, *flags, via=via), timeout=timeout)


def start_two_processes(workdir, logs, *flags: str, via: str = "flags", **env_extra):
  """(processes, their (stdout, stderr) files), started; `env_extra` goes into both environments."""
  address = f"localhost:{free_port()}"
  procs, files = [], []
  for i in range(2):
    if via == "flags":
      env, extra = fake_devices_env(2, **env_extra), [f"--coordinator_address={address}", "--num_processes=2",
                                                      f"--process_id={i}"]
    else:
      env, extra = fake_devices_env(2, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2",
                                    JAX_PROCESS_ID=str(i), **env_extra), []
    out, err = open(logs / f"p{i}.out", "w+"), open(logs / f"p{i}.err", "w+")
    files.append((out, err))
    procs.append(subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tests", "scaling_worker.py"), "cli", "--config", CONFIG,
         "--workdir", str(workdir), *flags, *extra], cwd=REPO, env=env, stdout=out, stderr=err))
  return procs, files


def collect(procs, files, timeout: int = 300) -> list[dict]:
  """Waits for both processes (ending the other if one fails); their exit codes and output."""
  try:
    for p in procs:
      p.wait(timeout=timeout)
  finally:
    for p in procs:  # one process failing leaves the other waiting on it: end it too
      if p.poll() is None:
        p.kill()
        p.wait()
  results = []
  for p, (out, err) in zip(procs, files):
    out.seek(0), err.seek(0)
    stdout, stderr = out.read(), err.read()
    out.close(), err.close()
    reports = [json.loads(l[len("PROCESS "):]) for l in stdout.splitlines() if l.startswith("PROCESS ")]
    results.append({"rc": p.returncode, "stdout": stdout, "stderr": stderr, "report": reports[-1] if reports else None})
  return results


def ok(results) -> None:
  for i, r in enumerate(results):
    assert r["rc"] == 0, f"process {i} exited {r['rc']}\n{r['stdout'][-2000:]}\n{r['stderr'][-4000:]}"


def test_two_processes_train_resume_on_another_mesh_and_agree(tmp_path):
  workdir, ref = tmp_path / "run", reference_losses()
  (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()

  # Run 1: mesh data=2 x fsdp=2 over both processes' devices, stopped after STOP steps.
  first = run_two_processes(workdir, tmp_path / "a", f"--config.train.num_steps={STOP}", "--config.mesh.fsdp=2")
  ok(first)
  assert [r["report"]["process"] for r in first] == [0, 1]
  assert all(r["report"]["processes"] == 2 and r["report"]["devices"] == 4 for r in first)
  a, b = (r["report"]["losses"] for r in first)
  assert a == b and sorted(map(int, a)) == list(range(1, STOP + 1))  # same global loss, each step
  np.testing.assert_allclose([a[str(s)] for s in range(1, STOP + 1)], [ref[s] for s in range(1, STOP + 1)], rtol=RTOL)
  # Only process 0 logs.
  assert "model: keel" in first[0]["stdout"] and "eval loss" in first[0]["stdout"]
  assert "model:" not in first[1]["stdout"] and "eval loss" not in first[1]["stdout"]
  assert os.listdir(workdir / "checkpoints") == [str(STOP)]

  # Run 2: the same workdir, coordinator from the environment this time, on mesh fsdp=2 x tensor=2
  # with the tensor axis split across the two processes (a hybrid mesh, dcn_tensor=2): both
  # processes hold every batch row, so both read the whole batch. Resumes, runs to num_steps.
  second = run_two_processes(workdir, tmp_path / "b", "--config.mesh.data=1", "--config.mesh.fsdp=2",
                             "--config.mesh.tensor=2", "--config.mesh.dcn_tensor=2", via="env")
  ok(second)
  assert f"resumed from {workdir / 'checkpoints'} at step {STOP}" in second[0]["stdout"]
  assert "resumed from" not in second[1]["stdout"]
  a, b = (r["report"]["losses"] for r in second)
  assert a == b and sorted(map(int, a)) == list(range(STOP + 1, len(ref) + 1))
  np.testing.assert_allclose([a[str(s)] for s in sorted(ref) if s > STOP], [ref[s] for s in sorted(ref) if s > STOP],
                             rtol=RTOL)

  # One metrics file, written by process 0 alone: each step once, the losses both processes saw.
  written = train_losses(workdir)
  assert sorted(written) == sorted(ref)
  assert [r["step"] for r in read_records(str(workdir)) if r["kind"] == "train"] == sorted(ref)
  np.testing.assert_allclose([written[s] for s in sorted(ref)], [ref[s] for s in sorted(ref)], rtol=RTOL)



def test_sigterm_to_one_process_stops_both_at_one_step_with_one_checkpoint_then_resumes(tmp_path):
  ref, workdir = reference_losses(), tmp_path / "run"
  (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
  # A run set for 40 steps, each >= 0.5 s (KEEL_TEST_STEP_SECONDS) so the signal lands mid-run; only
  # process 1 gets it. The learning rate is flat after warm-up: its steps equal the 6-step reference's.
  procs, files = start_two_processes(workdir, tmp_path / "a", "--config.train.num_steps=40",
                                     KEEL_TEST_STEP_SECONDS="0.5")
  deadline = time.time() + 240
  while time.time() < deadline and not any(r["kind"] == "train" for r in read_records(str(workdir))):
    if any(p.poll() is not None for p in procs):
      break
    time.sleep(0.1)
  procs[1].send_signal(signal.SIGTERM)
  stopped = collect(procs, files, timeout=120)
  ok(stopped)  # both exit 0: a requested stop that saved its work
  a, b = (r["report"]["losses"] for r in stopped)
  reached = max(map(int, a))
  assert a == b and sorted(map(int, a)) == list(range(1, reached + 1)) and reached < len(ref)
  assert os.listdir(workdir / "checkpoints") == [str(reached)]  # one checkpoint, of the agreed step
  for r in stopped:
    assert f"stopped by a preemption notice to one of the processes at step {reached}" in r["stdout"]
  assert [r["step"] for r in read_records(str(workdir)) if r["kind"] == "event" and r["event"] == "preempted"] == [reached]

  resumed = run_two_processes(workdir, tmp_path / "b")
  ok(resumed)
  assert f"at step {reached}" in resumed[0]["stdout"]
  written = train_losses(workdir)
  assert sorted(written) == sorted(ref)
  np.testing.assert_allclose([written[s] for s in sorted(ref)], [ref[s] for s in sorted(ref)], rtol=RTOL)
