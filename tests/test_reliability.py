"""Reliability, with the real CLI in subprocesses: kill -9 anywhere, SIGTERM, non-finite gradients,
mismatched and corrupt workdirs, bad corpus files. A run may lose the work since its last
checkpoint and nothing else; a resumed run must match an uninterrupted one bit for bit.

KEEL_KILL_SEED / KEEL_KILL_POINTS (env) pick other or more kill points for the kill -9 test.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cli_utils import REPO, cli_env, run_train
from keel_jax.metrics import MetricsWriter, read_records

# Checkpoints every 2 steps (saves are in flight most of the time) and every step logged. Keep all
# ten checkpoints, so tests can compare any of them with the uninterrupted run's.
RUN = ("--config.train.num_steps=20", "--config.train.checkpoint_every=2", "--config.train.log_every=1",
       "--config.train.keep_checkpoints=10")
TMP_MARK = ".orbax-checkpoint-tmp"  # Orbax writes a step into `<step>.orbax-checkpoint-tmp*`, then renames


# ---- helpers -------------------------------------------------------------------------------------

def records(workdir, kinds=("train", "eval")) -> list[dict]:
  """The run's per-step record minus wall-clock fields: what must be bitwise reproducible."""
  return [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in read_records(workdir) if r["kind"] in kinds]


def events(workdir, name: str) -> list[dict]:
  return [r for r in read_records(workdir) if r["kind"] == "event" and r["event"] == name]


def steps(workdir) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def load_state(workdir, step: int) -> dict:
  """The saved train state (numpy), read without our code, without writing anything."""
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  finally:
    manager.close()
  return jax.tree.map(np.asarray, state)


def assert_same_state(a: dict, b: dict) -> None:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y, strict=True)


def tree_digest(path) -> dict[str, str]:
  """relative path -> sha256, for 'nothing here was touched' checks."""
  out = {}
  for root, _, files in os.walk(path):
    for f in files:
      with open(os.path.join(root, f), "rb") as fh:
        out[os.path.relpath(os.path.join(root, f), path)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def start_train(workdir, log_path, *overrides: str) -> subprocess.Popen:
  """The CLI in the background (output to a file: a full pipe would stall it)."""
  out = open(log_path, "w")
  return subprocess.Popen([sys.executable, "-m", "keel_jax.train", "--config", "configs/tiny.py",
                           "--workdir", str(workdir), *overrides], cwd=REPO, env=cli_env(PYTHONUNBUFFERED="1"),
                          stdout=out, stderr=subprocess.STDOUT, text=True)


def last_logged_step(workdir) -> int:
  try:
    rec = read_records(workdir)
  except (OSError, json.JSONDecodeError):
    return 0
  return max((r["step"] for r in rec if r["kind"] == "train"), default=0)


def wait_for(proc: subprocess.Popen, condition, timeout: float = 180.0) -> bool:
  """Polls `condition` every ~2 ms; False if the process ended first."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if condition():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(0.002)
  proc.kill()
  raise AssertionError("timed out waiting for the kill point")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The uninterrupted reference run: 20 steps, checkpoints 2, 4, ..., 20."""
  workdir = tmp_path_factory.mktemp("straight")
  run_train(workdir, *RUN)
  assert steps(workdir) == list(range(2, 21, 2))
  assert [r["step"] for r in records(workdir, ("train",))] == list(range(1, 21))
  return workdir


def copy_of(workdir, tmp_path, name="w"):
  return shutil.copytree(workdir, tmp_path / name)


# ---- hard kills ----------------------------------------------------------------------------------

def kill_plan(rng: random.Random, n: int) -> list[tuple[str, float]]:
  """n kill points in increasing order of progress, so the chain of runs moves forward.

  ('startup', seconds): any time before or while the first steps compile;
  ('tmp', step): while a checkpoint of step >= s is still being written (its tmp dir exists);
  ('done', step): right after checkpoint s (or later) is renamed into place (old ones being deleted);
  ('step', step): once step s is logged: between checkpoints, with a save possibly in flight.
  """
  plan = [("startup", rng.uniform(0.5, 6.0))]
  kinds = ["tmp", "step", "done", "tmp", "step", "tmp"]
  bounds = np.linspace(2, 20, n)  # later kill points aim at later steps
  for i in range(1, n):
    kind = kinds[(i - 1) % len(kinds)]
    lo, hi = int(bounds[i - 1]), int(bounds[i])
    plan.append((kind, rng.randint(max(lo, 1), max(hi, lo + 1))))
  return plan


@pytest.mark.slow
def test_kill_9_anywhere_then_resume_matches_uninterrupted_run(straight, tmp_path):
  seed = int(os.environ.get("KEEL_KILL_SEED", "0"))
  n = int(os.environ.get("KEEL_KILL_POINTS", "5"))
  plan = kill_plan(random.Random(seed), n)
  work, ckpt_dir = tmp_path / "killed", tmp_path / "killed" / "checkpoints"
  run = [a for a in RUN if "keep_checkpoints" not in a]  # keep the default 3: kills also hit deletions

  def listing():
    try:
      return os.listdir(ckpt_dir)
    except FileNotFoundError:
      return []

  def inode(path):
    try:
      return os.stat(path).st_ino
    except FileNotFoundError:
      return None

  report = []
  for i, (kind, arg) in enumerate(plan + [("none", 0)]):
    # Only this run's doing may trigger the kill: not the killed run's leftover tmp dirs (the
    # next run deletes them) nor its records past the checkpoint (the next run drops them when
    # it rewrites metrics.jsonl, under a new inode).
    before, old_tmp, old_metrics = steps(work), set(listing()), inode(work / "metrics.jsonl")
    log_path = tmp_path / f"run{i}.log"
    proc = start_train(work, log_path, *run)
    t0 = time.monotonic()
    conditions = {
        "startup": lambda: time.monotonic() - t0 >= arg,
        "tmp": lambda: any(TMP_MARK in x and x not in old_tmp and int(x.split(".")[0]) >= arg for x in listing()),
        "done": lambda: any(s >= arg and s not in before for s in steps(work)),
        "step": lambda: inode(work / "metrics.jsonl") not in (None, old_metrics) and last_logged_step(work) >= arg,
        "none": lambda: False,
    }
    hit = wait_for(proc, conditions[kind])
    if hit:
      proc.send_signal(signal.SIGKILL)
    rc = proc.wait(timeout=300)
    log = open(log_path).read()
    # Every kill leaves only complete checkpoints: the re-run resumes from the newest one and
    # never has to fall back, and never sees a partial one.
    if before and kind != "startup":  # a startup kill may come before the restore
      assert f"resumed from {ckpt_dir} at step {before[-1]}" in log, log[-3000:]
    assert "warning: checkpoint" not in log, log[-3000:]
    left = sorted(x for x in os.listdir(ckpt_dir) if TMP_MARK in x) if ckpt_dir.exists() else []
    report.append(f"{kind}={arg:.2f}" if kind == "startup" else f"{kind}>={arg}")
    report[-1] += f": rc {rc}, checkpoints {steps(work)[-3:]}, tmp dirs left {left}"
    if kind == "none" or not hit:
      assert rc == 0, log[-3000:]
      break
    assert rc == -signal.SIGKILL, log[-3000:]
  print("kill -9 points (seed %d):\n  " % seed + "\n  ".join(report))
  kills = sum(": rc -9," in r for r in report)
  assert kills >= n - 1, report  # at most one kill point may be overtaken by a fast run

  assert records(work) == records(straight)  # every step once, every loss bitwise equal
  assert steps(work) == [16, 18, 20]
  assert_same_state(load_state(work, 20), load_state(straight, 20))


# ---- SIGTERM -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_saves_the_step_reached_exits_0_and_resumes(straight, tmp_path):
  work = tmp_path / "w"
  proc = start_train(work, tmp_path / "run.log", *RUN)
  assert wait_for(proc, lambda: last_logged_step(work) >= 5), open(tmp_path / "run.log").read()[-3000:]
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0, open(tmp_path / "run.log").read()[-3000:]
  (ev,) = events(work, "preempted")
  reached = ev["step"]
  assert ev["signal"] == signal.SIGTERM and 5 <= reached < 20
  assert steps(work)[-1] == reached  # a checkpoint of exactly the step reached, odd or even
  assert [r["step"] for r in records(work, ("train",))] == list(range(1, reached + 1))
  assert "checkpoint saved, re-run to resume" in open(tmp_path / "run.log").read()

  out = run_train(work, *RUN)
  assert f"at step {reached}" in out.stdout
  assert records(work) == records(straight)
  assert_same_state(load_state(work, 20), load_state(straight, 20))


# ---- non-finite loss and gradients ---------------------------------------------------------------

def run_faulty_train(workdir, first: int, count: int, *overrides: str, check: bool = True):
  """The training CLI with steps first .. first+count-1 made non-finite (tests/faulty_train.py)."""
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "faulty_train.py"), str(first), str(count),
                         "--config", "configs/tiny.py", "--workdir", str(workdir), *overrides],
                        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f"faulty_train exited {proc.returncode}\n{proc.stderr[-5000:]}")
  return proc


@pytest.mark.slow
def test_nonfinite_halt_keeps_last_good_checkpoint_then_skip_resumes(straight, tmp_path):
  work = tmp_path / "w"
  halted = run_faulty_train(work, 7, 1, *RUN, check=False)
  assert halted.returncode == 3, halted.stderr[-3000:]
  (ev,) = events(work, "nonfinite")
  assert ev["step"] == 7 and ev["policy"] == "halt" and ev["first_nonfinite"] == "loss"
  # The message names the step and the first non-finite quantity.
  assert "non-finite loss at step 7" in halted.stderr
  assert "last good checkpoint is kept" in halted.stderr
  # Nothing after the bad step was saved or logged; what was saved is the good state of step 6.
  assert steps(work) == [2, 4, 6]
  assert records(work) == [r for r in records(straight) if r["step"] <= 6]
  assert_same_state(load_state(work, 6), load_state(straight, 6))
  before = tree_digest(work / "checkpoints")

  # Same step under policy 'skip': the run resumes from 6, skips the update at 7, finishes.
  out = run_faulty_train(work, 7, 1, *RUN, "--config.train.nonfinite_policy=skip")
  assert "at step 6" in out.stdout
  assert all(tree_digest(work / "checkpoints")[k] == v for k, v in before.items())  # 2..6 untouched
  (ev,) = [e for e in events(work, "nonfinite") if e["policy"] == "skip"]
  assert ev["step"] == 7
  train = {r["step"]: r for r in records(work, ("train",))}
  assert [s for s in train] == list(range(1, 21))
  assert [train[s]["skipped"] for s in (6, 7, 20)] == [0, 1, 1]  # skip counted, and kept counting
  s6, s8 = load_state(work, 6), load_state(work, 8)
  assert int(s8["skipped"]) == 1 and int(load_state(work, 20)["skipped"]) == 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(load_state(work, 20)["params"]))
  # Skipping changed the trajectory: step 8 differs from the run that never saw a NaN.
  assert not np.array_equal(s8["params"]["embed"]["embedding"], load_state(straight, 8)["params"]["embed"]["embedding"])
  assert int(s6["step"]) == 6


def test_skip_policy_halts_after_k_nonfinite_steps_in_a_row(tmp_path):
  out = run_faulty_train(tmp_path, 3, 100, *RUN, "--config.train.nonfinite_policy=skip",
                         "--config.train.max_consecutive_skips=3", check=False)
  assert out.returncode == 3, out.stderr[-3000:]
  assert "at step 5 (3 non-finite steps in a row)" in out.stderr
  assert [e["step"] for e in events(tmp_path, "nonfinite")] == [3, 4, 5]
  assert steps(tmp_path) == [2, 4]  # step 4's checkpoint holds the state of step 2, with 2 skips counted
  assert int(load_state(tmp_path, 4)["skipped"]) == 2


# ---- mismatched workdir --------------------------------------------------------------------------

def test_mismatched_workdir_is_refused_and_left_untouched(straight, tmp_path):
  work = copy_of(straight, tmp_path)
  untouched = tree_digest(work)

  refused = run_train(work, *RUN, "--config.model.d_model=64", check=False)
  assert refused.returncode == 2
  assert "d_model: checkpoint has 32, config asks for 64" in refused.stderr
  assert "--allow_config_change" in refused.stderr
  assert tree_digest(work) == untouched

  # The override cannot make differently shaped arrays fit: a clear error, still nothing written.
  bad = run_train(work, *RUN, "--config.model.d_model=64", "--allow_config_change", check=False)
  assert bad.returncode == 2, bad.stderr[-3000:]
  assert "params/embed/embedding: checkpoint has (320, 32), config builds (320, 64)" in bad.stderr
  assert tree_digest(work) == untouched

  # A change that keeps every shape (RoPE base) is refused too, and resumes with the override.
  refused = run_train(work, "--config.model.rope_theta=500.0", "--config.train.num_steps=22", check=False)
  assert refused.returncode == 2 and "rope_theta" in refused.stderr and "500.0" in refused.stderr
  assert tree_digest(work) == untouched
  longer = [a for a in RUN if "num_steps" not in a] + ["--config.train.num_steps=22"]
  out = run_train(work, *longer, "--config.model.rope_theta=500.0", "--allow_config_change")
  assert "at step 20" in out.stdout and steps(work)[-1] == 22
  assert json.load(open(work / "config.json"))["model"]["rope_theta"] == 500.0


# ---- corrupt checkpoints -------------------------------------------------------------------------

def largest_file(directory) -> str:
  files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
  return max(files, key=os.path.getsize)


def test_corrupt_and_truncated_checkpoints_fall_back_to_the_last_good_one(straight, tmp_path):
  work = copy_of(straight, tmp_path)
  ck = work / "checkpoints"
  # 20: random bytes over the middle of the largest array data file. Orbax/TensorStore decode this
  # without any error (tested), so only our checksums can notice.
  path = largest_file(ck / "20" / "state")
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    f.write(random.Random(0).randbytes(64))
  # 18: a data file cut in half, as a full disk would leave it.
  path = largest_file(ck / "18" / "state")
  os.truncate(path, os.path.getsize(path) // 2)
  # A save killed half-way, as Orbax leaves it: a tmp dir, here even holding most of a checkpoint.
  shutil.copytree(ck / "20", ck / f"22{TMP_MARK}-1700000000")
  os.remove(ck / f"22{TMP_MARK}-1700000000" / "commit_success.txt")

  out = run_train(work, *RUN)
  assert "warning: checkpoint 20 cannot be used (CheckpointCorrupt" in out.stdout
  assert "checksum mismatch" in out.stdout
  assert "warning: checkpoint 18 cannot be used" in out.stdout
  assert f"resumed from {ck} at step 16" in out.stdout
  moved = sorted(os.listdir(work / "checkpoints_corrupt"))
  assert [m.split(".")[0] for m in moved] == ["18", "20"]  # kept for inspection, out of the way
  assert not any(TMP_MARK in x for x in os.listdir(ck))
  # Steps 17..20 were redone: the record and the final state equal the uninterrupted run's.
  assert records(work) == records(straight)
  assert_same_state(load_state(work, 20), load_state(straight, 20))


def test_no_readable_checkpoint_stops_with_a_clear_message(straight, tmp_path):
  work = copy_of(straight, tmp_path)
  for s in steps(work):
    os.truncate(work / "checkpoints" / str(s) / "state" / "_METADATA", 100)
  untouched = tree_digest(work)
  out = run_train(work, *RUN, check=False)
  assert out.returncode == 2
  assert f"error: no checkpoint in {work / 'checkpoints'} could be restored" in out.stderr
  assert "step 20: " in out.stderr and "step 2: " in out.stderr
  assert tree_digest(work) == untouched  # nothing moved, nothing started from scratch


def test_torn_last_metrics_line_is_dropped_on_read_and_resume(tmp_path):
  good = [{"step": 1, "kind": "train", "loss": 2.0}, {"step": 2, "kind": "train", "loss": 1.5}]
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in good)
    f.write('{"step": 3, "kind": "tr')  # killed mid-write
  assert read_records(tmp_path) == good
  MetricsWriter(str(tmp_path), resume_step=2).close()
  assert open(tmp_path / "metrics.jsonl").read() == "".join(json.dumps(r) + "\n" for r in good)


# ---- bad corpus files ----------------------------------------------------------------------------

@pytest.fixture
def bad_corpus(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  stdlib = os.path.dirname(os.__file__)
  for name in ("argparse", "textwrap", "shlex", "glob", "fnmatch", "bisect"):
    shutil.copy(os.path.join(stdlib, f"{name}.py"), corpus / f"{name}.txt")
  (corpus / "empty.txt").write_bytes(b"")
  (corpus / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n" + random.Random(0).randbytes(4000))
  return corpus


def test_corpus_with_bad_files_skips_and_counts_or_names_the_file(bad_corpus, tmp_path):
  data = ("--config.data.source=files", f"--config.data.paths={bad_corpus}/*.txt", "--config.data.tokenizer=bpe",
          "--config.data.bpe_vocab_size=320", "--config.data.val_fraction=0.2")
  out = run_train(tmp_path / "skip", *data, "--config.train.num_steps=2")
  assert "data: skipped files {'empty': 1, 'undecodable': 1}" in out.stdout
  (ev,) = events(tmp_path / "skip", "skipped_files")
  assert (ev["empty"], ev["undecodable"]) == (1, 1)
  assert [r["step"] for r in records(tmp_path / "skip", ("train",))] == [2]

  err = run_train(tmp_path / "error", *data, "--config.data.on_bad_file=error", check=False)
  assert err.returncode == 2
  assert f"error: {bad_corpus}/binary.txt: not UTF-8" in err.stderr
  assert "data.on_bad_file=skip" in err.stderr
  assert steps(tmp_path / "error") == [] and not os.path.exists(tmp_path / "error" / "config.json")
