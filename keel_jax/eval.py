"""Evaluation CLI: `python -m keel_jax.eval --workdir DIR [--split val|train] [--layer_removal]`.

Scores the newest checkpoint (or `--step`) on `--num_batches` fixed batches of the run's data
(default: data.eval_batches of data.batch_size windows, the same windows training's eval records
use) and writes JSON with loss, perplexity and bits per byte. `--layer_removal` adds the paper's
appendix-A study (keel_jax/evaluate.py defines the identity that replaces a removed sub-layer): one
entry per sub-layer with its dPPL, and a PNG bar chart of dPPL against the sub-layer index.

Outputs (local or gs://) go to DIR/eval/eval_step<S>_<split>.json (and ..._layer_removal.png), or `--out FILE.json`
(the plot beside it, FILE.png). `--data key=value,...` overrides data fields, e.g. another corpus
tokenized with the same tokenizer (`--data source=files,paths=/corpus/*.txt`). The JSON also goes
to stdout. Bad input (no checkpoint, an unknown step, unusable data) exits 2 and writes nothing.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from absl import app, flags, logging
from etils import epath

from keel_jax import config_lib, data
from keel_jax import evaluate as ev
from keel_jax import paths
from keel_jax.errors import EXIT_BAD_INPUT, ConfigError, DataError
from keel_jax.load import RunError, define_override_flags, load_run, overrides_from_flags


_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json, checkpoints/, tokenizer/)")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest)")
_SPLIT = flags.DEFINE_enum("split", "val", list(ev.SPLITS), "Which split to score")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", None, "Batches to score (default: data.eval_batches)")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Windows per batch (default: data.batch_size)")
_LAYER_REMOVAL = flags.DEFINE_bool("layer_removal", False, "Also run the layer-removal study (L+1 passes)")
_OUT = flags.DEFINE_string("out", None, "JSON output path (default: DIR/eval/eval_step<S>_<split>.json)")
_DATA = flags.DEFINE_string("data", "", "Overrides of data fields, 'key=value,...' (e.g. paths=...)")
define_override_flags()  # --config.mesh.*, --config.model.norm_impl=... (keel_jax/load.py)


def run_eval(workdir: str, step: int | None = None, split: str = "val", num_batches: int | None = None,
             batch_size: int | None = None, layer_removal: bool = False, data_overrides: str = "",
             log=print, overrides: str = "") -> tuple[dict, object]:
  """Everything but the writing: (result dict, the run). Raises RunError/ConfigError/DataError.
  `overrides`: mesh and non-parameter model fields, as load_run takes them."""
  run = load_run(workdir, step, overrides)
  cfg = run.config
  if data_overrides:
    config_lib.apply_arg(cfg, ",".join(k if "." in k.split("=")[0] else f"data.{k}"
                                       for k in data_overrides.split(",") if k))
  num_batches = cfg.data.eval_batches if num_batches is None else num_batches
  batch_size = cfg.data.batch_size if batch_size is None else batch_size
  for name, v in (("--num_batches", num_batches), ("--batch_size", batch_size)):
    if v < 1:
      raise ConfigError(name, v, "a positive integer")
  token_data, tok = data.load_token_data(cfg.data, run.workdir)
  if tok.fingerprint() != run.tokenizer.fingerprint():
    raise DataError(f"the data's tokenizer ({tok!r}) is not the run's ({run.tokenizer!r})")
  seq_len = run.model_cfg.max_seq_len
  batches = ev.split_batches(token_data, split, seq_len, batch_size, num_batches)
  bpt = ev.split_bytes_per_token(token_data, run.tokenizer, split, batches)

  loss_fn = ev.make_loss_fn(run.model)
  t0 = time.perf_counter()
  with run.context():
    result = {"workdir": run.workdir, "step": run.step, "split": split, "block": run.model_cfg.block,
              "num_sublayers": run.model_cfg.num_sublayers, "seq_len": seq_len, "batch_size": batch_size,
              **ev.evaluate(run.model, run.params, batches, bpt, loss_fn=loss_fn), "bytes_per_token": bpt}
    if layer_removal:
      progress = lambda i, L: log(f"layer removal: sub-layer {i + 1}/{L}") if (i + 1) % max(L // 8, 1) == 0 else None
      result["layer_removal"] = ev.layer_removal(run.model, run.params, batches, loss_fn=loss_fn, progress=progress)
  result["seconds"] = round(time.perf_counter() - t0, 3)
  return result, run


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.ERROR)  # Orbax warns about metadata files it does not need
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  try:
    result, run = run_eval(_WORKDIR.value, _STEP.value, _SPLIT.value, _NUM_BATCHES.value, _BATCH_SIZE.value,
                           _LAYER_REMOVAL.value, _DATA.value, log=log, overrides=overrides_from_flags())
  except (RunError, ConfigError, DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)

  out = paths.path(_OUT.value or f"{run.workdir}/eval/eval_step{run.step}_{result['split']}.json")
  paths.makedirs(out.parent)
  if "layer_removal" in result:
    png = out.with_name(out.stem + ("_layer_removal.png" if not _OUT.value else ".png"))
    title = (f"{run.model_cfg.block}, {run.model_cfg.num_sublayers} sub-layers, step {run.step}, "
             f"{result['split']} PPL {result['ppl']:.3f}")
    with tempfile.TemporaryDirectory() as tmp:  # matplotlib writes local files; the copy goes anywhere
      ev.plot_layer_removal(result["layer_removal"], os.path.join(tmp, png.name), title)
      png.write_bytes(epath.Path(tmp, png.name).read_bytes())
    result["plot"] = str(png)
  text = json.dumps(result, indent=2)
  paths.write_text(out, text + "\n")
  print(text)
  log(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
