"""Training system: exact resume, end-to-end CLI, config validation before any compile."""
import json
import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cli_utils import REPO, run_module, run_train
from keel_jax import config_lib
from keel_jax.errors import ConfigError, DataError
from keel_jax.metrics import read_records
from keel_jax.train import train

import importlib.util


def tiny_config(arg=None):
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(REPO, "configs", "tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def final_params(workdir):
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  state = manager.restore(manager.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  manager.close()
  return jax.tree.map(np.asarray, state["params"])


def train_losses(workdir):
  return [(r["step"], r["loss"]) for r in read_records(workdir) if r["kind"] == "train"]


def test_interrupted_and_resumed_run_equals_uninterrupted_run(tmp_path):
  cfg = tiny_config("num_steps=16,checkpoint_every=4,log_every=1,eval_every=8")
  quiet = lambda *_: None
  train(cfg, str(tmp_path / "straight"), log=quiet)
  train(cfg, str(tmp_path / "resumed"), stop_after=6, log=quiet)  # ends after a checkpoint at 6
  assert train_losses(tmp_path / "resumed")[-1][0] == 6
  train(cfg, str(tmp_path / "resumed"), log=quiet)
  a, b = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
  assert [s for s, _ in a] == list(range(1, 17))
  assert a == b  # same steps, bitwise-equal losses: data order and state restored exactly
  pa, pb = final_params(tmp_path / "straight"), final_params(tmp_path / "resumed")
  jax.tree.map(np.testing.assert_array_equal, pa, pb)


def test_cli_trains_writes_config_metrics_checkpoints_and_resumes(tmp_path):
  out = run_train(tmp_path, "--config.train.num_steps=10", "--config.model.block=pre_ln",
                  "--config.train.log_every=5", "--config.train.profile_steps=3")
  final = json.loads(out.stdout.strip().splitlines()[-1])
  # Not a terminal: plain progress lines with an ETA instead of a bar; the trace of steps 3-5 is written.
  assert re.search(r"step 5/10: loss [\d.]+ .* eta [\d.]+ min", out.stdout), out.stdout
  assert list((tmp_path / "profile").rglob("*.xplane.pb")), "no profiler trace"
  assert final["step"] == 10 and np.isfinite(final["eval_bpb"])
  saved = json.load(open(tmp_path / "config.json"))
  assert saved["model"]["block"] == "pre_ln" and saved["train"]["num_steps"] == 10
  records = read_records(tmp_path)
  train_rec = [r for r in records if r["kind"] == "train"]
  assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec"} <= set(train_rec[0])
  assert len(train_rec[-1]["sublayer_grad_norm"]) == 4
  assert any(r["kind"] == "eval" and "eval_bpb" in r for r in records)
  assert os.listdir(tmp_path / "tensorboard")
  assert "10" in os.listdir(tmp_path / "checkpoints")
  again = run_train(tmp_path, "--config.train.num_steps=12", "--config.model.block=pre_ln")
  assert "resumed from" in again.stdout and "at step 10" in again.stdout


def test_config_arg_sets_fields_by_short_and_dotted_names():
  cfg = tiny_config("block=deepnorm,train.lr=0.01,num_blocks=6,scan_layers=false")
  assert (cfg.model.block, cfg.train.lr, cfg.model.num_blocks, cfg.model.scan_layers) == ("deepnorm", 0.01, 6, False)
  with pytest.raises(ConfigError, match="no_such_field"):
    tiny_config("no_such_field=3")


@pytest.mark.parametrize("arg,field", [
    ("train.lr=-1", "train.lr"),
    ("seq_len=0", "data.seq_len"),
    ("source=web", "data.source"),
    ("nonfinite_policy=ignore", "train.nonfinite_policy"),
    ("mesh.data=3", "mesh"),  # 3 does not multiply to this machine's device count
    ("block=resnet", "model.block"),
    ("num_heads=3", "model.d_model"),
])
def test_bad_config_is_refused_before_anything_is_written(tmp_path, arg, field):
  with pytest.raises(ConfigError) as e:
    train(tiny_config(arg), str(tmp_path / "w"), log=lambda *_: None)
  assert e.value.field == field
  assert not os.path.exists(tmp_path / "w" / "config.json")


@pytest.mark.parametrize("arg,match", [
    ("source=files,paths=/nonexistent/*.txt", "nonexistent"),
    ("seq_len=100000000", "seq_len"),
])
def test_bad_data_gives_a_clear_error(tmp_path, arg, match):
  with pytest.raises(DataError, match=match):
    train(tiny_config(arg), str(tmp_path / "w"), log=lambda *_: None)


def test_empty_corpus_is_a_clear_error(tmp_path):
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(DataError):
    train(tiny_config(f"source=files,paths={tmp_path}/*.txt"), str(tmp_path / "w"), log=lambda *_: None)


def test_cli_reports_missing_config_file_and_missing_get_config(tmp_path):
  bad = run_module("keel_jax.train", "--config", "configs/nope.py", "--workdir", str(tmp_path), check=False)
  assert bad.returncode != 0 and "nope.py" in bad.stderr
  (tmp_path / "noget.py").write_text("x = 1\n")
  bad = run_module("keel_jax.train", "--config", str(tmp_path / "noget.py"), "--workdir", str(tmp_path / "w"), check=False)
  assert bad.returncode != 0 and "get_config" in bad.stderr
  assert not os.path.exists(tmp_path / "w")


def test_cli_refuses_a_workdir_holding_another_model_shape(tmp_path):
  run_train(tmp_path, "--config.train.num_steps=2")
  before = open(tmp_path / "config.json").read()
  bad = run_train(tmp_path, "--config.model.d_model=64", check=False)
  assert bad.returncode == 2
  assert "d_model" in bad.stderr and "32" in bad.stderr and "64" in bad.stderr
  assert open(tmp_path / "config.json").read() == before


def test_paper_configs_build_and_pass_eval_shape():
  import importlib
  from keel_jax.model import Decoder, init_params
  for name in ("paper_keel_512", "paper_max_lr"):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    model_cfg = config_lib.validate(cfg, vocab_size=32000)
    assert model_cfg.num_sublayers >= 64 and cfg.data.seq_len == 4096
    shapes = jax.eval_shape(lambda r: init_params(Decoder(model_cfg), r, seq_len=16), jax.random.key(0))
    grouped = bool(model_cfg.scan_groups)  # nested scan: [groups, blocks per group, ...]
    q_shape = (shapes["layers"]["blocks"] if grouped else shapes["layers"])["attn"]["attn"]["q"]["kernel"].value.shape
    assert int(np.prod(q_shape[:2 if grouped else 1])) == model_cfg.num_blocks
