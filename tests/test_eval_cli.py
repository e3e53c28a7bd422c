"""The sample and eval CLIs and load_run on one tiny trained workdir (trained once for the module)."""
import json
import math
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from cli_utils import run_module, run_train

from keel_jax import evaluate as ev
from keel_jax.generate import GREEDY, generate
from keel_jax.load import RunError, load_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  w = tmp_path_factory.mktemp("run")
  run_train(w, "--config.train.num_steps=10")
  return str(w)


def listing(d) -> set:
  return {os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs}


def last_eval(workdir) -> dict:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return [r for r in records if r.get("kind") == "eval"][-1]


def test_load_run_and_sample_cli_greedy(workdir):
  run = load_run(workdir)
  assert run.step == 10 and run.model_cfg.num_blocks == 2 and run.tokenizer.kind == "byte"
  # Past the context of 32: a 42-byte prompt keeps its last 32 bytes, then 40 new tokens.
  prompts = ["def f(x):", "import " * 6]
  proc = run_module("keel_jax.sample", "--workdir", workdir, "--temperature", "0", "--max_new_tokens", "40",
                    "--nostop_at_eos", *sum((["--prompt", p] for p in prompts), []))
  ids = [list(run.tokenizer.encode(p))[-32:] for p in prompts]
  want = generate(run.model, run.params, ids, 40, GREEDY, vocab_limit=run.tokenizer.vocab_size).tokens_BxN
  expected = "".join(f"--- sample {i} ---\n{run.tokenizer.decode(t)}\n" for i, t in enumerate(want))
  assert proc.stdout == expected
  assert "prompt of 42 tokens truncated from the left to the model's window of 32 tokens" in proc.stderr
  assert "attends to the last 32 tokens" in proc.stderr
  with pytest.raises(RunError, match="steps available: \\[10\\]"):
    load_run(workdir, step=3)


def test_eval_cli_layer_removal(workdir):
  proc = run_module("keel_jax.eval", "--workdir", workdir, "--layer_removal")
  out = os.path.join(workdir, "eval", "eval_step10_val.json")
  with open(out) as f:
    result = json.load(f)
  assert json.loads(proc.stdout) == result
  # Same windows and loss as training's own eval record at that step.
  rec = last_eval(workdir)
  assert result["loss"] == pytest.approx(rec["eval_loss"], rel=1e-5)
  assert result["bpb"] == pytest.approx(result["loss"] / math.log(2), rel=1e-6)  # byte tokenizer
  lr = result["layer_removal"]
  assert [r["index"] for r in lr["sublayers"]] == list(range(4))  # 2 blocks = 4 sub-layers
  assert [r["kind"] for r in lr["sublayers"]] == ["attn", "ffn", "attn", "ffn"]
  for r in lr["sublayers"]:
    assert r["dppl"] == pytest.approx(r["ppl"] - lr["base"]["ppl"])
  with open(result["plot"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_eval_cli_train_split_out(workdir, tmp_path):
  out = str(tmp_path / "sub" / "e.json")
  run_module("keel_jax.eval", "--workdir", workdir, "--split", "train", "--num_batches", "1", "--out", out)
  with open(out) as f:
    result = json.load(f)
  assert result["split"] == "train" and result["num_batches"] == 1 and result["num_tokens"] == 8 * 32
  assert "layer_removal" not in result and not os.path.exists(str(tmp_path / "sub" / "e.png"))


def test_layer_removal_compiles_once_and_removal_is_identity(workdir):
  run = load_run(workdir)
  rows = np.random.default_rng(0).integers(0, 256, (2, 9)).astype(np.int32)
  loss_fn = ev.make_loss_fn(run.model)
  result = ev.layer_removal(run.model, run.params, [{"tokens": rows}], loss_fn=loss_fn)
  assert len(result["sublayers"]) == 4 and loss_fn._cache_size() == 1
  # Every sub-layer removed: the stream stays the embedding (keel has no final norm), so the logits
  # are the tied head applied to the embedding.
  logits = run.model.apply({"params": run.params}, rows, sublayer_keep=ev.keep_mask(4, range(4)))
  emb = run.params["embed"]["embedding"]
  np.testing.assert_allclose(logits, jnp.take(emb, rows, axis=0) @ emb.T, rtol=1e-5, atol=1e-5)


def test_no_checkpoint(workdir, tmp_path):
  empty = tmp_path / "w"
  empty.mkdir()
  shutil.copy(os.path.join(workdir, "config.json"), empty / "config.json")
  before = listing(empty)
  for module, extra in (("keel_jax.sample", ["--prompt", "x"]), ("keel_jax.eval", ["--layer_removal"])):
    proc = run_module(module, "--workdir", str(empty), *extra, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "no checkpoint in" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""
  assert listing(empty) == before


@pytest.mark.parametrize("args,message", [
    (["--prompt", "caf\udcff"], "cannot encode: U+DCFF"),  # invalid UTF-8 in argv -> lone surrogate
    (["--prompt", "abc", "--max_new_tokens", "0"], "max_new_tokens must be >= 1"),
])
def test_sample_bad_input(workdir, args, message):
  before = listing(workdir)
  proc = run_module("keel_jax.sample", "--workdir", workdir, *args, check=False)
  assert proc.returncode == 2 and message in proc.stderr and proc.stdout == "", proc.stderr
  assert listing(workdir) == before
