"""Ahead-of-time compilation for a Cloud TPU slice: does a run fit, and how fast could it be.

    python -m keel_jax.aot --config configs/paper_keel_512.py --topology v5p-256 \
        --config.mesh.data=16 --config.mesh.fsdp=8 [--json] [--search 3]

Runs on any host with libtpu installed (`pip install -e '.[tpu]'`), TPU or not: the slice's devices
come from `jax.experimental.topologies` and nothing runs on them. It compiles the train step that
training runs (keel_jax.train_step), the eval step and the sampling loop (keel_jax.generate) with
the TPU compiler, from abstract arguments that carry the run's shardings, and reports per chip:
compile seconds; argument / output / temporary bytes and their total (argument + output - aliased
+ temporary, as XLA's memory analysis gives them) against the chip's HBM; the analytic model FLOPs
and the FLOPs the step executes with its remat policy (keel_jax.flops; XLA's cost analysis, also
reported, counts a scanned layer once); a roofline lower bound on the step time (the larger of
executed FLOPs / peak and the state read and written once / HBM bandwidth; communication is not
counted) and the MFU ceiling it implies; and the number of Mosaic (Pallas) kernels in the step.

Slice names are Google Cloud's (keel_jax.tpu_slices): v4-N and v5p-N count TensorCores (chips =
N / 2), v5e-N / v5litepod-N and v6e-N count chips.

Exit status: 0 the steps fit; 2 one does not (the message says by how much and what would help;
`--search N` compiles up to N alternatives: more fsdp, full remat, the nested scan); 1 bad input
(unknown slice, a mesh or batch that does not divide, libtpu missing). A compile that runs out of
memory (RESOURCE_EXHAUSTED) counts as not fitting, with the bytes it names.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from typing import Any

# Unlike the other CLIs (bad input: 2, errors.EXIT_BAD_INPUT), 2 here means "does not fit" and bad
# input is 1, as MaxText's train_compile and scripts that branch on "fits" expect.
EXIT_FITS, EXIT_INPUT_ERROR, EXIT_DOES_NOT_FIT = 0, 1, 2
STEPS = ("train", "eval", "sample")
INSTALL_HINT = "libtpu is not installed: pip install -e '.[tpu]' (jax[tpu], about 700 MB)"
# Environment a TPU compile needs on a host without a TPU; set before jax is imported.
TPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
GiB = 1024 ** 3


class AotError(ValueError):
  """Input aot cannot work with (not a config error): libtpu missing, an unknown step name."""


def libtpu_available() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def tokenizer_vocab_size(cfg) -> int:
  """The vocabulary the run's tokenizer will have, known without data: 257 byte ids, or the BPE
  size asked for (an upper bound: a small corpus may train fewer merges)."""
  return int(cfg.data.bpe_vocab_size) if cfg.data.tokenizer == "bpe" else 257


# ---- one compile ---------------------------------------------------------------------------------

@dataclasses.dataclass
class StepReport:
  """What XLA says about one compiled function, per chip."""
  name: str
  compile_s: float
  argument_bytes: int = 0
  output_bytes: int = 0
  alias_bytes: int = 0
  temp_bytes: int = 0
  xla_flops: float = 0.0  # cost analysis: a scanned body counted once
  xla_bytes_accessed: float = 0.0
  mosaic_calls: int = 0
  oom: str = ""  # the compiler's RESOURCE_EXHAUSTED message, when it ran out of memory
  needed_bytes: int = 0  # what an out-of-memory compile says it needs (-1: more than HBM, amount unknown)
  state_bytes: int = 0  # train step: the train state's (params, Adam moments) bytes on one chip

  @property
  def per_chip_bytes(self) -> int:
    if self.oom:
      return self.needed_bytes
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


_SIZE = r"([0-9.]+)\s*([KMGT]?)i?B?"
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def parse_oom_bytes(message: str) -> int:
  """The bytes an out-of-memory TPU compile says it needs ('... required for HLO temporaries (1.66T)
  exceeds available HBM (15.75G)', or 'Used 33.02G of 15.75G hbm'); 0 when it names no amount."""
  for pattern in (r"\(" + _SIZE + r"\)\s+exceeds", r"Used\s+" + _SIZE + r"\s+of"):
    m = re.search(pattern, message)
    if m:
      return int(float(m.group(1)) * _UNITS[m.group(2)])
  return 0


def compile_one(name: str, jitted, *abstract_args) -> StepReport:
  """Lowers and compiles `jitted` for the abstract arguments; an out-of-memory compile is a report."""
  import jax
  t0 = time.perf_counter()
  try:
    compiled = jitted.lower(*abstract_args).compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    msg = str(e)
    return StepReport(name, time.perf_counter() - t0, oom=msg.strip().splitlines()[0][:400],
                      needed_bytes=parse_oom_bytes(msg) or -1)
  report = StepReport(name, time.perf_counter() - t0)
  mem = compiled.memory_analysis()
  if mem is not None:
    report.argument_bytes, report.output_bytes = mem.argument_size_in_bytes, mem.output_size_in_bytes
    report.alias_bytes, report.temp_bytes = mem.alias_size_in_bytes, mem.temp_size_in_bytes
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  report.xla_flops, report.xla_bytes_accessed = float(cost.get("flops", 0)), float(cost.get("bytes accessed", 0))
  report.mosaic_calls = count_mosaic_calls(compiled.as_text())
  return report


def count_mosaic_calls(hlo_text: str) -> int:
  """Mosaic (Pallas TPU) kernels in compiled HLO: custom calls to 'tpu_custom_call'."""
  return hlo_text.count('custom_call_target="tpu_custom_call"')


# ---- the run's functions, abstractly -------------------------------------------------------------

def check_config(cfg, chips: int):
  """Every check that needs no compiler: the config, the mesh against the chip count, the batch
  against the data-parallel size. Raises ConfigError (as training would); returns the ModelConfig."""
  from keel_jax import config_lib, sharding
  model_cfg = config_lib.validate(cfg, tokenizer_vocab_size(cfg))
  shape = sharding.mesh_shape(cfg.mesh, chips)
  sharding.dcn_shape(cfg.mesh, shape)
  sharding.check_batch(cfg.data.batch_size, _SizedMesh(dict(zip(sharding.MESH_AXES, shape))))
  return model_cfg


@dataclasses.dataclass
class _SizedMesh:  # what sharding.check_batch reads of a mesh before there are devices
  shape: dict


def compile_steps(cfg, slc, steps=STEPS, log=lambda s: None) -> list[StepReport]:
  """Compiles the named steps of the run `cfg` for slice `slc` (a tpu_slices.Slice)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from keel_jax import attention_impls, sharding
  from keel_jax.loss import LossOptions
  from keel_jax.model import Decoder
  from keel_jax.optimizer import lr_schedule, make_optimizer
  from keel_jax.train_step import create_state, make_eval_step, make_train_step

  model_cfg = check_config(cfg, slc.chips)
  mesh = sharding.make_mesh(cfg.mesh, slc.devices())
  accum = cfg.train.get("grad_accum_steps", 1)
  sharding.check_batch(cfg.data.batch_size, mesh, accum)
  model_cfg = dataclasses.replace(model_cfg, attention_impl=attention_impls.resolve(
      model_cfg.attention_impl, attention_impls.target_platform(mesh), cfg.data.seq_len, log))
  loss_options = LossOptions.from_config(cfg)
  model = Decoder(model_cfg)
  tx, schedule = make_optimizer(cfg.train), lr_schedule(cfg.train)
  rng = jax.eval_shape(jax.random.key, cfg.train.seed)  # abstract: nothing concrete on the slice's devices

  def abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)

  reports = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    init_fn, state_shardings, _ = create_state(model, tx, mesh, rng)
    state = abstract(jax.eval_shape(init_fn, rng), state_shardings)
    batch_sharding = sharding.batch_sharding(mesh)
    tokens = jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len + 1), jnp.int32, sharding=batch_sharding)
    batch = {"tokens": tokens, **({"segment_ids": tokens} if cfg.data.get("document_mask", False) else {})}
    for name in steps:
      log(f"compiling the {name} step for {slc.name} ({slc.chips} chips, mesh {dict(mesh.shape)}) ...")
      if name == "train":
        fn = jax.jit(make_train_step(model, tx, schedule, loss_options=loss_options, grad_accum_steps=accum),
                     donate_argnums=0,
                     in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None))
        reports.append(compile_one(name, fn, state, batch))
        reports[-1].state_bytes = sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
                                      for a in jax.tree.leaves(state))
      elif name == "eval":
        fn = jax.jit(make_eval_step(model, loss_options), in_shardings=(state_shardings.params, batch_sharding))
        reports.append(compile_one(name, fn, state.params, batch))
      elif name == "sample":
        reports.append(compile_one(name, *_sample_args(cfg, model_cfg, mesh, state.params)))
      else:
        raise AotError(f"unknown step {name!r}: expected some of {STEPS}")
      log(f"  {name}: {reports[-1].compile_s:.1f} s, {reports[-1].per_chip_bytes / GiB:.2f} GiB per chip")
  return reports


def _sample_args(cfg, model_cfg, mesh, abstract_params):
  """The sampling loop (keel_jax.generate) with one prompt of seq_len / 2 tokens per data-parallel
  shard, continued to the full context: the largest KV cache a run's sample CLI would hold."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from keel_jax import generate, sharding
  rows = mesh.shape["data"] * mesh.shape["fsdp"]
  prompt = max(1, cfg.data.seq_len // 2)
  rows_sharding = sharding.batch_sharding(mesh)
  scalar = NamedSharding(mesh, P())
  key = jax.eval_shape(jax.random.key, 0)
  args = (abstract_params,
          jax.ShapeDtypeStruct((rows, prompt), jnp.int32, sharding=rows_sharding),
          jax.ShapeDtypeStruct((rows, prompt), jnp.int32, sharding=rows_sharding),
          jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=scalar),
          *(jax.ShapeDtypeStruct((), d, sharding=scalar) for d in (jnp.float32, jnp.int32, jnp.float32, jnp.int32)))
  fn = generate._compiled(model_cfg, cfg.data.seq_len - prompt, False)
  return (fn, *args)


# ---- the report ----------------------------------------------------------------------------------

def roofline(cfg, model_cfg, slc, train: StepReport) -> dict[str, float]:
  """Lower bound on the train step's time per chip and the MFU ceiling it implies (no communication)."""
  from keel_jax.flops import hardware_flops_per_token, matmul_flops_per_token
  tokens = cfg.data.batch_size * cfg.data.seq_len
  model_flops = matmul_flops_per_token(model_cfg, cfg.data.seq_len)["train_flops_per_token"] * tokens / slc.chips
  hw_flops = hardware_flops_per_token(model_cfg, cfg.data.seq_len) * tokens / slc.chips
  compute_s = hw_flops / slc.gen.peak_bf16_flops
  memory_s = (train.argument_bytes + train.output_bytes) / slc.gen.hbm_bytes_per_s
  step_s = max(compute_s, memory_s)
  return {"model_flops_per_chip": model_flops, "executed_flops_per_chip": hw_flops,
          "compute_bound_s": compute_s, "state_memory_bound_s": memory_s, "step_s_lower_bound": step_s,
          "mfu_ceiling": model_flops / slc.gen.peak_bf16_flops / step_s if step_s else 0.0}


def build_report(cfg, slc, reports: list[StepReport]) -> dict[str, Any]:
  from keel_jax import sharding
  model_cfg = check_config(cfg, slc.chips)
  hbm = slc.gen.hbm_bytes
  train = next((r for r in reports if r.name == "train"), None)
  worst = max(reports, key=lambda r: math.inf if r.per_chip_bytes < 0 else r.per_chip_bytes)
  out = {
      "topology": slc.name, "chips": slc.chips, "tpu_topology": slc.topology,
      "mesh": dict(zip(sharding.MESH_AXES, sharding.mesh_shape(cfg.mesh, slc.chips))),
      "model": {k: cfg.model[k] for k in ("block", "num_blocks", "d_model", "dtype", "remat_policy",
                                          "scan_groups", "norm_impl")},
      "sublayers": model_cfg.num_sublayers, "batch_size": cfg.data.batch_size, "seq_len": cfg.data.seq_len,
      "fits": all(0 <= r.per_chip_bytes <= hbm for r in reports),
      "hbm_bytes": hbm,
      "per_chip_bytes": worst.per_chip_bytes, "worst_step": worst.name,
      "temp_bytes": (train or worst).temp_bytes,
      "compile_s": round(sum(r.compile_s for r in reports), 2),
      "mosaic_calls": train.mosaic_calls if train else 0,
      "steps": {r.name: {**dataclasses.asdict(r), "per_chip_bytes": r.per_chip_bytes} for r in reports},
  }
  if train is not None and not train.oom:
    out["roofline"] = roofline(cfg, model_cfg, slc, train)
  if not out["fits"]:
    out["over_bytes"] = worst.per_chip_bytes - hbm if worst.per_chip_bytes > 0 else None
    out["suggestions"] = suggestions(cfg, model_cfg, slc, train or worst)
  return out


def suggestions(cfg, model_cfg, slc, train: StepReport) -> list[dict[str, Any]]:
  """Alternatives that cut per-chip memory, most promising first, as config overrides with the
  reason; `search` compiles them. Estimates from the measured bytes: the train state divides over
  fsdp * tensor, activation temporaries scale with the per-chip batch."""
  from keel_jax import sharding
  data, fsdp, tensor = sharding.mesh_shape(cfg.mesh, slc.chips)
  out = []
  if data > 1:
    est = (f": the train state's {train.state_bytes / GiB:.2f} GiB per chip becomes about "
           f"{train.state_bytes / data / GiB:.2f} GiB" if train.state_bytes else "")
    out.append({"overrides": {"mesh.data": 1, "mesh.fsdp": data * fsdp},
                "why": f"shard parameters and Adam state over all {data * fsdp} data-parallel chips{est}"})
  if model_cfg.remat_policy != "full":
    out.append({"overrides": {"model.remat_policy": "full"},
                "why": "save only each block's input for the backward pass (about 1/3 more compute)"})
  if not model_cfg.scan_groups:
    g = nested_scan_groups(model_cfg.num_blocks)
    if g:
      out.append({"overrides": {"model.scan_groups": g},
                  "why": f"nested scan: {g} groups of {model_cfg.num_blocks // g} blocks keep ~sqrt(depth) "
                         "residual-stream copies instead of one per block"})
  per_chip_batch = cfg.data.batch_size // (data * fsdp)
  k = 2 * cfg.train.get("grad_accum_steps", 1)
  if per_chip_batch % k == 0:
    out.append({"overrides": {"train.grad_accum_steps": k},
                "why": f"gradient accumulation: {k} microbatches of {per_chip_batch // k} sequences per chip "
                       "(activation temporaries shrink about k-fold; the global batch stays)"})
  if per_chip_batch > 1:
    out.append({"overrides": {"data.batch_size": cfg.data.batch_size // 2},
                "why": f"halve the per-chip batch ({per_chip_batch} -> {per_chip_batch // 2} sequences; "
                       "activation temporaries roughly halve; the global batch changes)"})
  combined = {}
  for s in out[:3]:
    combined.update(s["overrides"])
  if len(out) > 1:
    out.insert(min(len(out), 3), {"overrides": combined, "why": "all of the above but the batch"})
  return out


def nested_scan_groups(num_blocks: int) -> int:
  """The divisor of num_blocks nearest sqrt(num_blocks) (0 when there is none above 1)."""
  divisors = [g for g in range(2, num_blocks) if num_blocks % g == 0]
  return min(divisors, key=lambda g: abs(g - math.sqrt(num_blocks))) if divisors else 0


def with_overrides(cfg, overrides: dict[str, Any]):
  new = copy.deepcopy(cfg)
  for key, value in overrides.items():
    section, field = key.split(".", 1)
    new[section][field] = value
  return new


def search(cfg, slc, train: StepReport, max_tries: int, log=lambda s: None) -> list[dict[str, Any]]:
  """Compiles (train step only) up to `max_tries` of the `suggestions` for a run whose train step
  gave `train`, in order; each result is that variant's overrides, fit, bytes and MFU ceiling."""
  from keel_jax.errors import ConfigError
  tried = []
  for s in suggestions(cfg, check_config(cfg, slc.chips), slc, train)[:max_tries]:
    variant = with_overrides(cfg, s["overrides"])
    try:
      report = build_report(variant, slc, compile_steps(variant, slc, ("train",), log))
    except ConfigError as e:
      tried.append({**s, "error": str(e)})
      continue
    tried.append({**s, **{k: report[k] for k in ("fits", "per_chip_bytes", "compile_s")},
                  "mfu_ceiling": report.get("roofline", {}).get("mfu_ceiling")})
  return tried


def fmt_bytes(n: float) -> str:
  return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2 ** 20:.1f} MiB"


def describe(report: dict[str, Any]) -> str:
  """The human-readable summary."""
  hbm = report["hbm_bytes"]
  lines = [f"{report['topology']} ({report['chips']} chips, {report['tpu_topology']}), mesh {report['mesh']}, "
           f"{report['model']['block']} {report['sublayers']} sub-layers, batch {report['batch_size']} x "
           f"{report['seq_len']}"]
  for r in report["steps"].values():
    if r["oom"]:
      need = f"at least {fmt_bytes(r['needed_bytes'])}" if r["needed_bytes"] > 0 else "more than HBM"
      lines.append(f"  {r['name']:<6} out of memory at compile ({r['compile_s']:.1f} s), needs {need}: {r['oom']}")
      continue
    lines.append(f"  {r['name']:<6} compiled in {r['compile_s']:.1f} s; per chip: args {fmt_bytes(r['argument_bytes'])}"
                 f" + out {fmt_bytes(r['output_bytes'])} - aliased {fmt_bytes(r['alias_bytes'])} + temp "
                 f"{fmt_bytes(r['temp_bytes'])} = {fmt_bytes(r['per_chip_bytes'])} of {fmt_bytes(hbm)}"
                 + (f"; Mosaic kernels: {r['mosaic_calls']}" if r["name"] == "train" else ""))
  if "roofline" in report:
    rf = report["roofline"]
    lines.append(f"  roofline: {rf['model_flops_per_chip'] / 1e12:.3g} TFLOP model / "
                 f"{rf['executed_flops_per_chip'] / 1e12:.3g} TFLOP executed per chip per step; step >= "
                 f"{rf['step_s_lower_bound']:.3g} s; MFU ceiling {rf['mfu_ceiling']:.1%} (communication not counted)")
  if report["fits"]:
    lines.append(f"fits: {fmt_bytes(report['per_chip_bytes'])} per chip ({report['worst_step']} step) "
                 f"of {fmt_bytes(hbm)} HBM")
  else:
    over = report.get("over_bytes")
    lines.append(f"does NOT fit: the {report['worst_step']} step needs "
                 + (f"{fmt_bytes(report['per_chip_bytes'])} per chip or more, {fmt_bytes(over)} beyond "
                    if over else "more than ") + f"the {fmt_bytes(hbm)} of HBM. What would help:")
    for s in report["suggestions"]:
      flags = " ".join(f"--config.{k}={v}" for k, v in s["overrides"].items())
      lines.append(f"  {flags}\n      {s['why']}")
    for t in report.get("search", []):
      flags = " ".join(f"--config.{k}={v}" for k, v in t["overrides"].items())
      result = t.get("error") or (f"{'fits' if t['fits'] else 'does not fit'}: "
                                  f"{fmt_bytes(t['per_chip_bytes'])} per chip"
                                  + (f", MFU ceiling {t['mfu_ceiling']:.1%}" if t.get("mfu_ceiling") else ""))
      lines.append(f"  tried {flags}: {result}")
  return "\n".join(lines)


# ---- CLI -----------------------------------------------------------------------------------------

def run(cfg, topology: str, steps=STEPS, search_tries: int = 0, log=lambda s: None) -> dict[str, Any]:
  """Parses the slice, checks the config, compiles; returns the report (see `build_report`).
  Raises tpu_slices.UnknownSlice, ConfigError or AotError on bad input."""
  from keel_jax import tpu_slices
  slc = tpu_slices.parse(topology)
  check_config(cfg, slc.chips)
  unknown = [s for s in steps if s not in STEPS]
  if unknown:
    raise AotError(f"unknown step {unknown[0]!r}: expected some of {STEPS}")
  if not libtpu_available():
    raise AotError(INSTALL_HINT)
  reports = compile_steps(cfg, slc, steps, log)
  report = build_report(cfg, slc, reports)
  if not report["fits"] and search_tries:
    train = next((r for r in reports if r.name == "train"), reports[0])
    report["search"] = search(cfg, slc, train, search_tries, log)
  return report


def main(argv) -> None:
  from absl import app, flags
  del argv
  f = flags.FLAGS
  if f.config is None or not f.topology:
    raise app.UsageError("both --config and --topology are required")
  from keel_jax import tpu_slices
  from keel_jax.errors import ConfigError
  log = (lambda s: print(s, file=sys.stderr, flush=True))
  try:
    report = run(f.config, f.topology, tuple(filter(None, f.steps.split(","))), f.search, log)
  except (tpu_slices.UnknownSlice, ConfigError, AotError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_INPUT_ERROR)
  print(json.dumps(report) if f.json else describe(report))
  sys.exit(EXIT_FITS if report["fits"] else EXIT_DOES_NOT_FIT)


def parse_flags(argv: list[str]) -> list[str]:
  """config_lib.parse_flags (a config mistake: the message, no traceback), exiting EXIT_INPUT_ERROR."""
  from keel_jax import config_lib
  from keel_jax.errors import EXIT_BAD_INPUT
  try:
    return config_lib.parse_flags(argv)
  except SystemExit as e:
    sys.exit(EXIT_INPUT_ERROR if e.code == EXIT_BAD_INPUT else e.code)


def _define_flags() -> None:
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/paper_keel_512.py[:block=pre_ln]")
  flags.DEFINE_string("topology", None, "Cloud TPU slice: v4-N / v5p-N (N TensorCores, chips = N/2), "
                      "v5e-N / v5litepod-N / v6e-N (N chips)")
  flags.DEFINE_bool("json", False, "Print one JSON object instead of the summary")
  flags.DEFINE_string("steps", ",".join(STEPS), f"Which of {STEPS} to compile (comma-separated)")
  flags.DEFINE_integer("search", 0, "When it does not fit: compile up to this many alternatives (train step)")


if __name__ == "__main__":
  for k, v in TPU_ENV.items():
    os.environ.setdefault(k, v)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for the slice; never grab a local accelerator
  from absl import app
  _define_flags()
  app.run(main, flags_parser=parse_flags)
