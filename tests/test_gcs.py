"""Runs on a gs:// workdir, served by a local Cloud Storage emulator (gcp-storage-emulator, in memory):
train, kill -9, resume to the losses of a local run, sample and eval from the bucket; a bucket that
does not exist is refused before any work. No local directory named `gs:` may appear."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cli_utils import REPO, cli_env, run_module
from keel_jax import paths
from keel_jax.errors import ConfigError
from keel_jax.load import load_run
from keel_jax.train import train
from test_train import tiny_config

pytestmark = pytest.mark.slow
BUCKET = "keel-test"
ARG = "num_steps=12,checkpoint_every=4,log_every=1,eval_every=6"


@pytest.fixture(scope="module")
def gcs():
  """The emulator on a free port; the environment (here and for subprocesses) that points gcsfs,
  google-cloud-storage and TensorStore at it."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "gcs_emulator.py"), str(port), BUCKET],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  env = {"STORAGE_EMULATOR_HOST": f"http://localhost:{port}", "TENSORSTORE_GCS_HTTP_URL": f"http://localhost:{port}",
         "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}  # the gRPC probe would wait ~60 s (keel_jax/paths.py)
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    deadline = time.monotonic() + 30
    while True:
      try:
        socket.create_connection(("localhost", port), timeout=1).close()
        break
      except OSError:
        assert time.monotonic() < deadline and proc.poll() is None, "the GCS emulator did not start"
        time.sleep(0.1)
    yield env
  finally:
    proc.terminate()
    proc.wait()
    for k, v in saved.items():
      os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def fresh_fs():
  """gcsfs without its listing cache (the runs change the bucket under it)."""
  import gcsfs
  return gcsfs.GCSFileSystem(skip_instance_cache=True, use_listings_cache=False)


def bucket_text(path: str) -> str:
  return fresh_fs().cat(path).decode()


def records(text: str) -> list[dict]:
  """train/eval records minus wall-clock fields."""
  out = [json.loads(l) for l in text.splitlines() if l.strip()]
  return [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in out if r["kind"] in ("train", "eval")]


def no_local_gs_directory() -> bool:
  return not any(os.path.exists(os.path.join(d, "gs:")) for d in (REPO, os.getcwd()))


def test_gs_workdir_kill_9_resume_sample_eval_match_a_local_run(gcs, tmp_path):
  quiet = lambda *_: None
  train(tiny_config(ARG), str(tmp_path / "local"), log=quiet)
  local = records((tmp_path / "local" / "metrics.jsonl").read_text())

  # Killed (-9) as soon as the checkpoint of step 4 is complete in the bucket (Orbax marks a step
  # complete on Cloud Storage with commit_success.txt): mid-step, mid-save or mid-eval.
  work = f"gs://{BUCKET}/run"
  with open(tmp_path / "killed.log", "w") as log:
    proc = subprocess.Popen([sys.executable, "-m", "keel_jax.train", "--config", f"configs/tiny.py:{ARG}",
                             "--workdir", work], cwd=REPO, env=cli_env(PYTHONUNBUFFERED="1", **gcs),
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while not fresh_fs().exists(f"{BUCKET}/run/checkpoints/4/commit_success.txt") and proc.poll() is None:
      assert time.monotonic() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
      time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]

  resumed = []
  train(tiny_config(ARG), work, log=resumed.append)
  assert any(l.startswith(f"resumed from {work}/checkpoints at step ") for l in resumed), resumed
  assert fresh_fs().ls(f"{BUCKET}/run/tensorboard")  # event files copied into the bucket
  assert records(bucket_text(f"{work}/metrics.jsonl")) == local  # every step once, losses bitwise equal
  assert json.loads(bucket_text(f"{work}/config.json"))["train"]["num_steps"] == 12

  run_module("keel_jax.sample", "--workdir", work, "--prompt", "def ", "--max_new_tokens", "8", "--temperature", "0",
             env=cli_env(**gcs))
  # What sample and eval restored from the bucket: the local run's parameters, bit for bit.
  jax.tree.map(np.testing.assert_array_equal, load_run(work).params, load_run(tmp_path / "local").params)
  ev = json.loads(run_module("keel_jax.eval", "--workdir", work, env=cli_env(**gcs)).stdout)
  assert ev["step"] == 12 and ev["loss"] == pytest.approx(local[-1]["eval_loss"], rel=1e-6)
  assert json.loads(bucket_text(f"{work}/eval/eval_step12_val.json"))["loss"] == ev["loss"]
  assert no_local_gs_directory()


def test_missing_bucket_is_one_clear_error_before_any_work(gcs, tmp_path):
  out = run_module("keel_jax.train", "--config", "configs/tiny.py", "--workdir", "gs://no-such-bucket/run",
                   env=cli_env(**gcs), check=False, timeout=120)
  assert out.returncode == 2, out.stderr[-3000:]
  assert "gs://no-such-bucket/run" in out.stderr and "bucket 'no-such-bucket' was not found" in out.stderr
  assert "Traceback" not in out.stderr and "model:" not in out.stdout  # nothing built or compiled
  assert no_local_gs_directory()


def test_write_failures_name_the_path_and_how_to_provide_credentials():
  denied = paths._write_failure(paths.epath.Path("gs://b/run"), PermissionError("403 Forbidden"))
  assert "GOOGLE_APPLICATION_CREDENTIALS" in denied and "gcloud auth application-default login" in denied
  with pytest.raises(ConfigError, match="/proc/keel_cannot_write"):
    paths.check_writable("/proc/keel_cannot_write")


def test_prepared_data_in_a_bucket_trains_like_a_local_copy(gcs, tmp_path):
  from keel_jax import data, prepare
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i in range(6):
    (corpus / f"{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps. " * (40 + i))
  args = ["--source", "files", "--paths", str(corpus), "--val_fraction", "0.3"]
  prepare.prepare(prepare._parse([*args, "--out", str(tmp_path / "prepared")]))
  prepare.prepare(prepare._parse([*args, "--out", f"gs://{BUCKET}/prepared"]))
  assert fresh_fs().exists(f"{BUCKET}/prepared/meta.json") and fresh_fs().exists(f"{BUCKET}/prepared/tokenizer/meta.json")
  def load(prepared_dir):
    return data.load_token_data(tiny_config(f"source=prepared,seq_len=16,batch_size=2,prepared_dir={prepared_dir}").data)[0]
  here, there = load(tmp_path / "prepared"), load(f"gs://{BUCKET}/prepared")
  assert list(there.train) == list(here.train) and list(there.val) == list(here.val)
  assert no_local_gs_directory()
