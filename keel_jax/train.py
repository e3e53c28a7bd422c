"""Training entry point: `python -m keel_jax.train --config configs/default.py --workdir DIR`.

Reads top-down as the data path: config -> data -> model -> loss -> optimiser -> step -> checkpoint
-> metrics. Re-running with the same workdir resumes from the newest complete checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from keel_jax import attention_impls, config_lib, data, paths, sharding
from keel_jax.checkpoint import Checkpointer, CheckpointError, abstract_like
from keel_jax.errors import EXIT_BAD_INPUT, ConfigError, DataError
from keel_jax.evaluate import bits_per_byte, perplexity
from keel_jax.loss import LossOptions
from keel_jax.metrics import MetricsWriter, significant
from keel_jax.model import Decoder, param_table
from keel_jax.model_config import NON_PARAMETER_FIELDS, upgrade_model_fields
from keel_jax.optimizer import lr_schedule, make_optimizer
from keel_jax.preemption import Preemption
from keel_jax.train_step import create_state, make_eval_step, make_train_step

EXIT_NONFINITE = 3  # halted on a non-finite loss or gradient; last good checkpoint kept
TELEMETRY = ("sublayer_grad_norm", "update_param_ratio", "branch_ratio")  # the "telemetry" records' [L] fields


class TrainingHalted(RuntimeError):
  """A non-finite loss/gradient under policy 'halt' (or too many skips in a row)."""


# ---- setup ---------------------------------------------------------------------------------------

def maybe_initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None, force: bool = False) -> None:
  """Joins the other processes of a multi-host run; call before any other JAX work.

  Explicit settings win: the arguments (--coordinator_address/--num_processes/--process_id), else
  JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID. Otherwise jax.distributed.initialize()
  detects them itself in a SLURM or Open MPI job of several tasks, on a GKE TPU slice, or when
  `force` (--distributed; Cloud TPU VM pod slices, whose peers come from the metadata server).
  """
  env = os.environ
  address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
  if address:
    n = num_processes if num_processes is not None else env.get("JAX_NUM_PROCESSES")
    i = process_id if process_id is not None else env.get("JAX_PROCESS_ID")
    if n is None or i is None:
      raise app.UsageError(f"coordinator address {address!r} given: also set --num_processes and "
                           "--process_id (or JAX_NUM_PROCESSES and JAX_PROCESS_ID)")
    jax.distributed.initialize(address, int(n), int(i))
  elif (force or int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")):
    jax.distributed.initialize()


def check_resume_compatible(workdir, cfg, allow_change: bool) -> list[str]:
  """Refuses to resume a checkpoint written for another model (or tokenizer), showing both sides.

  Fields in model_config.NON_PARAMETER_FIELDS may differ; returns lines naming those that do.
  """
  path = paths.path(workdir) / "config.json"
  if not path.exists():
    return []
  old = json.loads(path.read_text())
  keys = ("model", "data.tokenizer", "data.bpe_vocab_size", "data.vocab_multiple")
  def pick(c):
    c = c if isinstance(c, dict) else c.to_dict()
    return {"model": upgrade_model_fields(c["model"]), **{k: c["data"].get(k.split(".")[1]) for k in keys[1:]}}
  before, now = pick(old), pick(cfg)
  diff = {f"model.{k}": (before["model"].get(k), now["model"].get(k)) for k in set(before["model"]) | set(now["model"])
          if before["model"].get(k) != now["model"].get(k)}
  diff.update({k: (before[k], now[k]) for k in keys[1:] if before[k] != now[k]})
  free = {k: v for k, v in diff.items() if k.split(".", 1)[1] in NON_PARAMETER_FIELDS and k.startswith("model.")}
  describe = lambda d: [f"  {k}: checkpoint has {a!r}, config asks for {b!r}" for k, (a, b) in sorted(d.items())]
  refused = {k: v for k, v in diff.items() if k not in free}
  if refused and not allow_change:
    raise ConfigError("workdir", str(workdir), "a workdir whose checkpoint matches the model config; it differs:\n"
                      + "\n".join(describe(refused)) + "\nUse a new --workdir, or pass --allow_config_change "
                      f"to resume anyway (fields that may change: model.{{{', '.join(NON_PARAMETER_FIELDS)}}}).")
  return describe(free)


def setup_compilation_cache(cache_dir: str) -> None:
  """Persistent XLA compilation cache in `cache_dir` (train.compilation_cache_dir; JAX also reads
  JAX_COMPILATION_CACHE_DIR itself): a re-run with the same shapes loads its executables instead of
  compiling them. Takes effect only before the process's first compilation."""
  if cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.expanduser(cache_dir)))


# ---- the run -------------------------------------------------------------------------------------

def train(cfg, workdir: str, *, allow_config_change: bool = False, stop_after: int | None = None,
          log=print) -> dict:
  """Trains (or resumes) the run described by `cfg` in `workdir`. Returns the last eval record.

  `stop_after=s` ends after step s with a checkpoint, as a preemption would (notebooks train in
  chunks this way; tests use it to interrupt a run deterministically).
  """
  config_lib.validate(cfg)  # everything but the vocabulary size, before any data or compile work
  setup_compilation_cache(cfg.train.get("compilation_cache_dir", ""))
  is_main = jax.process_index() == 0
  workdir = paths.check_writable(workdir)  # local or gs://; a clear error before any data or compile work
  ckpt = Checkpointer(workdir / "checkpoints", cfg.train.keep_checkpoints)
  changed = check_resume_compatible(workdir, cfg, allow_config_change) if ckpt.latest_step() is not None else []
  if changed and is_main:
    log("resuming with fields that do not change the parameters set otherwise:\n" + "\n".join(changed))

  # data
  token_data, tokenizer = data.load_token_data(cfg.data, workdir)
  model_cfg = config_lib.validate(cfg, tokenizer.vocab_size)
  mesh = sharding.make_mesh(cfg.mesh)
  sharding.check_batch(cfg.data.batch_size, mesh, cfg.train.get("grad_accum_steps", 1))
  model_cfg = dataclasses.replace(model_cfg, attention_impl=attention_impls.resolve(
      model_cfg.attention_impl, attention_impls.target_platform(mesh), cfg.data.seq_len, log if is_main else None))
  eos_id = tokenizer.eos_id if cfg.data.get("document_mask", False) else None  # batches carry segment ids
  train_iter = data.make_train_iterator(token_data.train, cfg.data.seq_len, cfg.data.batch_size,
                                        cfg.train.seed, *sharding.data_shard_of_process(mesh), eos_id=eos_id)
  eval_set = data.eval_batches(token_data.val, cfg.data.seq_len, cfg.data.batch_size, cfg.data.eval_batches,
                               eos_id=eos_id)

  # model, optimiser, state
  model = Decoder(model_cfg)
  tx, schedule = make_optimizer(cfg.train), lr_schedule(cfg.train)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    init_fn, state_shardings, abstract_boxed = create_state(model, tx, mesh, jax.random.key(cfg.train.seed))
    if is_main:
      log(f"model: {model_cfg.block}, {model_cfg.num_blocks} blocks = {model_cfg.num_sublayers} sub-layers, "
          f"mesh {dict(mesh.shape)}\n{param_table(abstract_boxed)}")
    if ckpt.latest_step() is None:
      state, start = init_fn(jax.random.key(cfg.train.seed)), 0
    else:  # the newest checkpoint that restores and verifies; broken newer ones are moved aside
      abstract_state = abstract_like(jax.eval_shape(init_fn, jax.random.key(0)), state_shardings)
      start, state = ckpt.restore_latest(abstract_state, train_iter, log=log)
      if is_main:
        log(f"resumed from {ckpt.directory} at step {start}")
    if is_main:  # only once the state fits: a refused or failed resume must leave config.json as it was
      paths.write_text(workdir / "config.json", config_lib.to_json(cfg))  # never torn
    loss_options = LossOptions.from_config(cfg)
    step_fn, telemetry_fn = (
        jax.jit(make_train_step(model, tx, schedule, telemetry, loss_options,
                                cfg.train.get("grad_accum_steps", 1)), donate_argnums=0,
                in_shardings=(state_shardings, sharding.batch_sharding(mesh)), out_shardings=(state_shardings, None))
        for telemetry in (False, True))  # the telemetry variant compiles at its first use
    eval_fn = jax.jit(make_eval_step(model, loss_options), in_shardings=(state_shardings.params, sharding.batch_sharding(mesh)))
    loop = Loop(cfg, workdir, mesh, ckpt, MetricsWriter(workdir, is_main, resume_step=start), token_data,
                leaf_names=[jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.params)],
                log=log, is_main=is_main)
    if token_data.skipped and is_main:  # bad input files belong in the run's record, not only a log line
      log(f"data: skipped files {dict(sorted(token_data.skipped.items()))} (data.on_bad_file={cfg.data.on_bad_file!r})")
      loop.writer.write(start, "event", {"event": "skipped_files", **token_data.skipped})
    try:
      return loop.run(state, start, step_fn, eval_fn, train_iter, eval_set, stop_after, telemetry_fn)
    finally:
      loop.close()


@dataclasses.dataclass
class Loop:
  """The step loop: metrics are fetched one step late so the host never stalls the device."""
  cfg: Any
  workdir: Any  # epath.Path (local or gs://)
  mesh: Any
  ckpt: Checkpointer
  writer: MetricsWriter
  token_data: Any
  leaf_names: list
  log: Any
  is_main: bool

  def __post_init__(self):
    self.consecutive_skips = 0
    self.loss_ema = None
    self.last_eval: dict = {}
    self.preempt = Preemption()
    self.last_time, self.last_step = time.perf_counter(), None
    self.tracing = False

  def run(self, state, start, step_fn, eval_fn, train_iter, eval_set, stop_after=None, telemetry_fn=None) -> dict:
    t, tokens_per_step = self.cfg.train, self.cfg.data.batch_size * self.cfg.data.seq_len
    bar = None  # a live bar on a terminal; elsewhere (logs, pipes, notebooks' captured output) plain lines
    if self.is_main and (sys.stderr.isatty() or os.environ.get("KEEL_PROGRESS") == "1"):
      from tqdm.auto import tqdm
      bar = tqdm(total=t.num_steps, initial=start, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)
    self.last_step, pending = start, None
    self.run_start = (time.perf_counter(), start)
    end = t.num_steps if stop_after is None else min(stop_after, t.num_steps)
    for step in range(start, end):
      self.maybe_profile(step, start)
      batch = sharding.global_batch(next(train_iter), self.mesh)
      telemetry = telemetry_fn is not None and t.telemetry_every and (step + 1) % t.telemetry_every == 0
      state, metrics = (telemetry_fn if telemetry else step_fn)(state, batch)
      if pending is not None:
        self.handle_metrics(*pending, tokens_per_step, bar)
      pending = (step + 1, metrics)
      done = step + 1
      stop = self.preempt.should_stop(done)  # the same answer on every process
      boundary = done % t.eval_every == 0 or done % t.checkpoint_every == 0 or done == end or stop
      if boundary:  # sync before saving: never checkpoint a step whose metrics are unchecked
        self.handle_metrics(*pending, tokens_per_step, bar)
        pending = None
      if done % t.eval_every == 0 or done == t.num_steps:
        self.evaluate(done, state.params, eval_fn, eval_set)
      if done % t.checkpoint_every == 0 or done == end or stop:
        self.ckpt.save(done, state, train_iter)
        self.writer.sync()  # the records up to a checkpoint are in the workdir with it
      if stop:
        self.ckpt.wait()
        why = f"signal {self.preempt.signal}" if self.preempt.signal else "a preemption notice to one of the processes"
        self.log(f"stopped by {why} at step {done}: checkpoint saved, re-run to resume")
        self.writer.write(done, "event", {"event": "preempted", "signal": self.preempt.signal})
        raise SystemExit(0)  # a requested shutdown that saved its work: not a failure
    if pending is not None:
      self.handle_metrics(*pending, tokens_per_step, bar)
    if bar is not None:
      bar.close()
    self.ckpt.wait()
    return self.last_eval

  def handle_metrics(self, step, metrics, tokens_per_step, bar) -> None:
    m = jax.device_get(metrics)
    now = time.perf_counter()
    tps = tokens_per_step * (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_time, self.last_step = now, step
    t = self.cfg.train
    if not bool(m["finite"]):
      self.on_nonfinite(step, m)
    else:
      self.consecutive_skips = 0
    loss = float(m["loss"])
    if math.isfinite(loss):
      if self.loss_ema is not None and loss > t.spike_factor * self.loss_ema:
        self.writer.write(step, "event", {"event": "loss_spike", "loss": loss, "loss_ema": self.loss_ema})
      self.loss_ema = loss if self.loss_ema is None else 0.95 * self.loss_ema + 0.05 * loss
    if bar is not None:
      bar.update(step - bar.n)
      bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
    if step % t.log_every == 0 or step == t.num_steps:
      rec = {k: m[k] for k in ("loss", "lr", "grad_norm", "update_norm", "param_norm", "z_loss") if k in m}
      rec.update(tokens_per_sec=tps, skipped=int(m["skipped"]),  # non-finite updates skipped so far
                 sublayer_grad_norm=significant(m["sublayer_grad_norm"]))
      self.writer.write(step, "train", rec)
      if bar is None and self.is_main:
        t0, step0 = self.run_start  # ETA from this run's average pace (includes compile and eval time)
        eta = (now - t0) / max(step - step0, 1) * (t.num_steps - step)
        self.log(f"step {step}/{t.num_steps}: loss {loss:.4f} lr {float(m['lr']):.2e} "
                 f"grad_norm {float(m['grad_norm']):.3f} tok/s {tps:,.0f} eta {eta / 60:.1f} min")
    if "branch_ratio" in m:  # per-sub-layer telemetry, [L] each (train.telemetry_every)
      self.writer.write(step, "telemetry", {k: significant(m[k]) for k in TELEMETRY})

  def on_nonfinite(self, step, m) -> None:
    bad = "loss" if not math.isfinite(float(m["loss"])) else (
        "gradient of " + self.leaf_names[int(np.argmin(m["leaf_finite"]))])
    self.consecutive_skips += 1
    self.writer.write(step, "event", {"event": "nonfinite", "first_nonfinite": bad, "loss": float(m["loss"]),
                                      "policy": self.cfg.train.nonfinite_policy})
    policy, limit = self.cfg.train.nonfinite_policy, self.cfg.train.max_consecutive_skips
    if policy == "halt" or self.consecutive_skips >= limit:
      why = "policy 'halt'" if policy == "halt" else f"{self.consecutive_skips} non-finite steps in a row"
      raise TrainingHalted(f"non-finite {bad} at step {step} ({why}); the update was not applied and "
                           f"the last good checkpoint is kept in {self.ckpt.directory}")
    self.log(f"step {step}: non-finite {bad}: update skipped ({self.consecutive_skips} in a row)")

  def evaluate(self, step, params, eval_fn, eval_set) -> None:
    p, n = sharding.data_shard_of_process(self.mesh)  # this process's block of each batch
    losses = []
    for batch in eval_set:
      rows = batch["tokens"].shape[0] // n
      local = {k: v[p * rows:(p + 1) * rows] for k, v in batch.items()}
      losses.append(eval_fn(params, sharding.global_batch(local, self.mesh)))
    loss = float(np.mean(jax.device_get(losses)))
    bpb = bits_per_byte(loss, self.token_data.bytes_per_token_val)
    self.last_eval = {"step": step, "eval_loss": loss, "eval_bpb": bpb, "eval_ppl": perplexity(loss)}
    self.writer.write(step, "eval", {k: v for k, v in self.last_eval.items() if k != "step"})
    if self.is_main:
      self.log(f"step {step}: eval loss {loss:.4f}, bits/byte {bpb:.4f}")

  def maybe_profile(self, step, start) -> None:
    """train.profile_steps=N: a trace of N steps (from the third: the first two compile and warm up)
    in workdir/profile, for TensorBoard's profile plugin or Perfetto."""
    n = self.cfg.train.profile_steps
    if n and step == start + 2:
      jax.profiler.start_trace(str(self.workdir / "profile"))
      self.tracing = True
    if self.tracing and step == start + 2 + n:
      self.stop_profile()

  def stop_profile(self) -> None:
    if self.tracing:  # also when the run ends (or stops) before the N steps are done
      jax.profiler.stop_trace()
      self.tracing = False
      self.log(f"profile trace written to {self.workdir / 'profile'}")

  def close(self) -> None:
    self.stop_profile()
    self.preempt.close()
    self.ckpt.close()
    self.writer.close()


# ---- CLI -----------------------------------------------------------------------------------------

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/default.py[:block=pre_ln]")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, config.json")
_ALLOW = flags.DEFINE_bool("allow_config_change", False, "Resume even if the model config differs from the checkpoint's")
# Multi-host (docs/SCALING.md): set these, or the JAX_* variables, where JAX cannot find its peers itself.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host runs)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host runs)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes-1")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() and let it detect "
                                 "the peers (Cloud TPU pod slices); SLURM/MPI jobs are detected without it")


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("both --config and --workdir are required")
  maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _DISTRIBUTED.value)
  try:
    final = train(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW.value)
  except (ConfigError, DataError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
  except TrainingHalted as e:
    print(f"halted: {e}", file=sys.stderr)
    sys.exit(EXIT_NONFINITE)
  if jax.process_index() == 0 and final:
    print(json.dumps(final))


if __name__ == "__main__":
  app.run(main, flags_parser=config_lib.parse_flags)
