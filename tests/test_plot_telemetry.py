"""Per-sub-layer telemetry: the telemetry step's numbers against numpy, the records and TensorBoard
events of a tiny run, and the heatmap script."""
import glob
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np

from keel_jax import config_lib
from keel_jax.diagnostics import sublayer_branch_ratios
from keel_jax.metrics import read_records
from keel_jax.model import Decoder, init_params, layer_stack
from keel_jax.optimizer import lr_schedule, make_optimizer
from keel_jax.plot_telemetry import plot, telemetry_arrays
from keel_jax.train import TELEMETRY, train
from keel_jax.sharding import strip_boxes
from keel_jax.train_step import TrainState, make_train_step
from test_train import tiny_config


def read_tb_histograms(logdir) -> dict[tuple[str, int], list[float]]:
  """{(tag, step): bucket counts} from the TFRecord event files in `logdir` (tensorboard's reader is
  not a dependency: records are length, crc, Event proto, crc)."""
  from tensorboardX.proto import event_pb2
  out = {}
  for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
    data = open(path, "rb").read()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      for v in event.summary.value:
        if v.HasField("histo"):
          out[(v.tag, event.step)] = list(v.histo.bucket)
  return out


def test_telemetry_step_matches_numpy_and_leaves_training_unchanged():
  cfg = tiny_config("block=keel,num_blocks=3")
  model = Decoder(config_lib.validate(cfg, 257))
  tx, schedule = make_optimizer(cfg.train), lr_schedule(cfg.train)
  params = strip_boxes(init_params(model, jax.random.key(0)))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     skipped=jnp.zeros((), jnp.int32))
  batch = {"tokens": jax.random.randint(jax.random.key(1), (4, 17), 0, 256)}
  plain, _ = jax.jit(make_train_step(model, tx, schedule))(state, batch)
  tele, m = jax.jit(make_train_step(model, tx, schedule, telemetry=True))(state, batch)
  jax.tree.map(np.testing.assert_array_equal, plain.params, tele.params)  # telemetry changes nothing
  old, new = layer_stack(params, model.cfg), layer_stack(tele.params, model.cfg)
  ratio = []
  for b in range(3):  # depth order attn_0, ffn_0, attn_1, ...
    for kind in ("attn", "ffn"):
      o = np.concatenate([np.asarray(a[b], np.float64).ravel() for a in jax.tree.leaves(old[kind])])
      n = np.concatenate([np.asarray(a[b], np.float64).ravel() for a in jax.tree.leaves(new[kind])])
      ratio.append(np.linalg.norm(n - o) / np.linalg.norm(o))
  np.testing.assert_allclose(m["update_param_ratio"], ratio, rtol=1e-3)
  np.testing.assert_allclose(m["branch_ratio"], sublayer_branch_ratios(model, params, batch["tokens"][:, :-1]),
                             rtol=1e-5)
  assert m["branch_ratio"].shape == m["update_param_ratio"].shape == (6,)


def test_tiny_run_writes_telemetry_records_tensorboard_profiles_and_heatmap(tmp_path):
  train(tiny_config("num_steps=10,telemetry_every=4,log_every=5"), str(tmp_path), log=lambda *_: None)
  tele = [r for r in read_records(tmp_path) if r["kind"] == "telemetry"]
  assert [r["step"] for r in tele] == [4, 8]
  L = 4
  for r in tele:
    for k in TELEMETRY:
      assert len(r[k]) == L and all(np.isfinite(r[k])) and min(r[k]) > 0, (k, r[k])
  hist = read_tb_histograms(tmp_path / "tensorboard")
  for r in tele:
    for k in TELEMETRY:  # the profile histogram holds the record's values, one bucket per sub-layer
      np.testing.assert_allclose(hist[(f"telemetry/{k}", r["step"])], r[k], rtol=1e-6)
  steps, arrays = telemetry_arrays(read_records(tmp_path))
  assert list(steps) == [4, 8] and all(a.shape == (L, 2) for a in arrays.values())
  png = plot(str(tmp_path))
  assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
