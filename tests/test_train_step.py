"""The train step: k microbatches give the loss and gradients of the whole batch; a run with
train.grad_accum_steps logs the losses of the run without."""
import chex
import flax.linen as nn
import jax
import numpy as np
import pytest

from cli_utils import run_train
from keel_jax import config_lib
from keel_jax.errors import ConfigError
from keel_jax.loss import LossOptions
from keel_jax.metrics import read_records
from keel_jax.model import Decoder, init_params
from keel_jax.model_config import ModelConfig
from keel_jax.train import train
from keel_jax.train_step import loss_and_grads


def test_accumulated_microbatches_equal_the_whole_batch():
  cfg = ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, d_ff=48, max_seq_len=12)
  model = Decoder(cfg)
  params = nn.meta.unbox(init_params(model, jax.random.key(0)))
  rs = np.random.RandomState(0)
  batch = {"tokens": rs.randint(0, 64, size=(8, 13)).astype(np.int32)}
  batch["segment_ids"] = np.cumsum(batch["tokens"] < 6, axis=1).astype(np.int32)  # some documents too
  opts = LossOptions(z_loss=1e-3, document_positions=True)
  whole = jax.jit(lambda p: loss_and_grads(model, p, batch, opts, 1))(params)
  accumulated = jax.jit(lambda p: loss_and_grads(model, p, batch, opts, 4))(params)
  chex.assert_trees_all_close(accumulated, whole, atol=1e-6, rtol=1e-5)


def test_batch_not_divisible_by_grad_accum_steps_names_the_numbers():
  cfg = config_lib.base_config()
  cfg.data.batch_size, cfg.train.grad_accum_steps = 12, 5
  with pytest.raises(ConfigError) as e:
    config_lib.validate(cfg)
  assert e.value.field == "train.grad_accum_steps" and "12" in str(e.value) and "5" in str(e.value)
  cfg.train.grad_accum_steps, cfg.train.loss_chunk = 4, 100
  with pytest.raises(ConfigError) as e:
    config_lib.validate(cfg)
  assert e.value.field == "train.loss_chunk" and "256" in str(e.value)


@pytest.mark.slow
def test_cli_run_with_grad_accum_logs_the_losses_of_the_run_without(tmp_path):
  args = "num_steps=6,log_every=1,eval_every=6,checkpoint_every=6"
  from test_train import tiny_config
  train(tiny_config(args), str(tmp_path / "plain"), log=lambda *_: None)
  run_train(tmp_path / "accum", f"--config.train.grad_accum_steps=4", "--config.train.num_steps=6",
            "--config.train.log_every=1", "--config.train.eval_every=6", "--config.train.checkpoint_every=6")
  losses = lambda w: [r["loss"] for r in read_records(w) if r["kind"] == "train"]
  a, b = losses(tmp_path / "plain"), losses(tmp_path / "accum")
  assert len(a) == len(b) == 6
  np.testing.assert_allclose(b, a, rtol=1e-5)
