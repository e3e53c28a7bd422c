"""Config helpers: the base ConfigDict every config file starts from, `key=value` args, validation.

A config file is `configs/<name>.py` with `get_config(arg=None)`; `arg` is the text after ':' in
`--config configs/<name>.py:block=pre_ln,num_blocks=32` and sets `model.*` / `data.*` / `train.*`
fields by their short or dotted names.
"""
from __future__ import annotations

import difflib
import importlib.util
import json
import math
import re
import sys

import ml_collections
from absl import flags

from keel_jax import data as data_lib
from keel_jax.errors import EXIT_BAD_INPUT, ConfigError
from keel_jax.model_config import RENAMED_FIELDS, ModelConfig, model_defaults, warn_renamed


def base_config() -> ml_collections.ConfigDict:
  """Every field a run reads, with CPU-friendly defaults. Config files override what they need."""
  cfg = ml_collections.ConfigDict()
  cfg.model = model_defaults()
  cfg.data = dict(
      source="stdlib", paths="", prepared_dir="", seq_len=256, batch_size=16, tokenizer="byte",
      bpe_vocab_size=4096, val_fraction=0.02, eval_batches=8, on_bad_file="skip", max_files=0,
      synthetic_task="", vocab_multiple=64,
      document_mask=False,  # attention stays within each packed document (segment ids from eos)
      document_positions=False)  # RoPE positions restart at each document (needs document_mask)
  cfg.train = dict(
      num_steps=1000, lr=3e-3, warmup_steps=100, lr_floor=1e-7, schedule="cosine", b1=0.9, b2=0.95,
      eps=1e-8, weight_decay=0.01, clip_norm=1.0, seed=0, log_every=10, eval_every=200,
      checkpoint_every=200, keep_checkpoints=3, nonfinite_policy="halt", max_consecutive_skips=10,
      spike_factor=3.0, profile_steps=0,
      telemetry_every=50,  # per-sub-layer telemetry records every N steps (0 = off); keel_jax/plot_telemetry.py
      grad_accum_steps=1,  # microbatches per step (lax.scan), one optimiser update
      loss_chunk=0,  # sequence positions per chunk of the output projection + loss (0: all at once)
      z_loss=0.0,  # weight of mean log(Z)^2 added to the loss
      compilation_cache_dir="")  # persistent XLA compilation cache ("" = off); docs/PERFORMANCE.md
  # Axis sizes (one may be -1: the rest). dcn_*: how many of an axis's ways cross the slow network
  # (TPU slices, or GPU processes); see docs/SCALING.md.
  cfg.mesh = dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1)
  return cfg


def paper_config() -> ml_collections.ConfigDict:
  """The paper's model, data and optimiser (docs/DESIGN.md section 2.8), bfloat16 for accelerators:
  what the paper config files start from."""
  cfg = base_config()
  cfg.model.update(block="keel", d_model=1024, num_heads=16, num_kv_heads=8, d_ff=3072, dtype="bfloat16",
                   remat_policy="save_dots_no_batch")
  cfg.data.update(source="prepared", prepared_dir="data/prepared", tokenizer="bpe", seq_len=4096, batch_size=256)
  cfg.train.update(b1=0.9, b2=0.95, weight_decay=0.01, clip_norm=1.0)
  cfg.mesh.update(data=-1, fsdp=8, tensor=1)
  return cfg


def parse_arg(arg: str | None) -> dict[str, str]:
  """'a=1,b=x' -> {'a': '1', 'b': 'x'}; a bare word 'w' -> {'w': 'true'}."""
  out = {}
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    out[key.strip()] = value.strip() if _ else "true"
  return out


def _coerce(old, text: str):
  if isinstance(old, bool):
    return text.lower() in ("1", "true", "yes")
  if isinstance(old, int):
    return int(text)
  if isinstance(old, float):
    return float(text)
  return text


SECTIONS = ("model", "data", "train", "mesh")


def apply_arg(cfg: ml_collections.ConfigDict, arg: str | None, ignore: tuple[str, ...] = ()) -> None:
  """Sets fields from `arg`. 'num_blocks=8' finds the one section holding that name; 'train.lr=1e-3' is explicit."""
  for key, text in parse_arg(arg).items():
    if key in ignore:
      continue
    section, _, name = key.rpartition(".")
    if name in RENAMED_FIELDS and section in ("", "model"):
      warn_renamed(name)
      key = f"{section}.{RENAMED_FIELDS[name]}" if section else RENAMED_FIELDS[name]
    if "." in key:
      section, name = key.split(".", 1)
    else:
      owners = [s for s in SECTIONS if name_in(cfg, s, key)]
      if len(owners) > 1:
        raise ConfigError(f"--config arg {key}", text,
                          f"a dotted name, as {key} is a field of {' and '.join(owners)}")
      section, name = (owners[0] if owners else ""), key
    if not name_in(cfg, section, name):
      raise unknown_field(cfg, key, text, where=f"in --config ...:{key}={text}")
    cfg[section][name] = _coerce(cfg[section][name], text)


def name_in(cfg, section: str, name: str) -> bool:
  return section in cfg and name in cfg[section]


def field_names(cfg: ml_collections.ConfigDict) -> list[str]:
  """Every 'section.field' of `cfg`."""
  return [f"{s}.{f}" for s in cfg for f in (cfg[s] if isinstance(cfg[s], ml_collections.ConfigDict) else ())]


def unknown_field(cfg: ml_collections.ConfigDict, path: str, value, where: str) -> ConfigError:
  """The error for a field `path` ('section.field', or a bare field name) that `cfg` does not have:
  it names the closest existing fields."""
  names = field_names(cfg)
  section = path.rpartition(".")[0]
  if section and section not in cfg:
    close = difflib.get_close_matches(section, list(cfg), n=3, cutoff=0.5)
    hint = f"did you mean section {' or '.join(close)}?" if close else f"the sections are {', '.join(cfg)}"
    return ConfigError(path, value, f"no such section ({where}); {hint}")
  if section:
    close = difflib.get_close_matches(path, names, n=3, cutoff=0.6)
  else:  # a bare name: compare with the field names alone
    short = {n.split(".", 1)[1]: n for n in reversed(names)}
    close = [short[c] for c in difflib.get_close_matches(path, list(short), n=3, cutoff=0.6)]
  hint = f"did you mean {' or '.join(close)}?" if close else f"the fields are {', '.join(names)}"
  return ConfigError(path, value, f"no such field ({where}); {hint}")


def parse_flags(argv: list[str]) -> list[str]:
  """absl flags parser for every CLI that takes --config (`app.run(main, flags_parser=parse_flags)`):
  a ConfigError in the config file or its :arg, and an unknown field in a --config.<section>.<field>
  override, exit 2 with the message (field and closest names), not a traceback."""
  upgraded = upgrade_argv(argv)
  if argv is sys.argv:  # ml_collections reads the overrides from sys.argv itself
    sys.argv[:] = upgraded
  argv = upgraded
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # absl and ml_collections re-wrap what the config file raised
    error = _config_error_in(e) or _override_error(argv)
    if error is None:
      raise
    print(f"error: {error}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def upgrade_argv(argv: list[str], flag: str = "config") -> list[str]:
  """--config.model.<old name>=... overrides rewritten to the current field name (warning for each)."""
  out = []
  for a in argv:
    m = re.fullmatch(rf"(--?(?:no)?{flag}\.model\.)([^=]+)(=.*)?", a)
    if m and m.group(2) in RENAMED_FIELDS:
      warn_renamed(m.group(2))
      a = m.group(1) + RENAMED_FIELDS[m.group(2)] + (m.group(3) or "")
    out.append(a)
  return out


def _config_error_in(e: BaseException | None) -> ConfigError | None:
  while e is not None and not isinstance(e, ConfigError):
    e = e.__cause__ or e.__context__
  return e


def _override_error(argv: list[str], flag: str = "config") -> ConfigError | None:
  """Loads the --config file as ml_collections does and checks each override's field exists."""
  value = None
  for i, a in enumerate(argv):
    if a in (f"-{flag}", f"--{flag}") and i + 1 < len(argv):
      value = argv[i + 1]
    elif m := re.fullmatch(rf"--?{flag}=(.*)", a):
      value = m.group(1)
  if value is None:
    return None
  path, _, arg = value.partition(":")
  try:
    spec = importlib.util.spec_from_file_location("_keel_config_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(arg) if arg else module.get_config()
  except ConfigError as e:
    return e
  except Exception:  # the file itself is the problem: absl's own message says which
    return None
  for a in argv:
    if m := re.fullmatch(rf"--?(?:no)?{flag}\.([^=]+)(?:=(.*))?", a):
      field, text = m.group(1), m.group(2)
      section, _, name = field.rpartition(".")
      if not name_in(cfg, section, name):
        return unknown_field(cfg, field, text, where=f"in --{flag}.{field}")
  return None


def _check(ok: bool, field: str, value, allowed: str) -> None:
  if not ok:
    raise ConfigError(field, value, allowed)


def validate(cfg: ml_collections.ConfigDict, vocab_size: int = 256) -> ModelConfig:
  """Checks every section before anything compiles; returns the ModelConfig. Raises ConfigError."""
  for section in SECTIONS:
    _check(section in cfg, section, None, f"a '{section}' section (start from config_lib.base_config())")
  d, t = cfg.data, cfg.train
  data_lib.validate(d)
  _check(not d.get("document_positions", False) or d.get("document_mask", False), "data.document_positions",
         True, "False unless data.document_mask=True (positions restart at the documents that mask marks)")
  k = t.get("grad_accum_steps", 1)
  _check(isinstance(k, int) and k > 0 and d.batch_size % k == 0, "train.grad_accum_steps", k,
         f"a positive divisor of data.batch_size={d.batch_size}")
  chunk = t.get("loss_chunk", 0)
  _check(isinstance(chunk, int) and chunk >= 0 and (chunk == 0 or d.seq_len % chunk == 0), "train.loss_chunk",
         chunk, f"0 (no chunks) or a divisor of data.seq_len={d.seq_len}")
  _check(math.isfinite(t.get("z_loss", 0.0)) and t.get("z_loss", 0.0) >= 0, "train.z_loss", t.get("z_loss"),
         "a non-negative number")
  for f in ("num_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
    _check(isinstance(t[f], int) and t[f] > 0, f"train.{f}", t[f], "a positive integer")
  _check(isinstance(t.telemetry_every, int) and t.telemetry_every >= 0, "train.telemetry_every", t.telemetry_every,
         "a non-negative integer (0 = off)")
  _check(isinstance(t.warmup_steps, int) and 0 <= t.warmup_steps, "train.warmup_steps", t.warmup_steps,
         "a non-negative integer")
  for f in ("lr", "clip_norm", "eps"):
    _check(math.isfinite(t[f]) and t[f] > 0, f"train.{f}", t[f], "a positive number")
  _check(0 <= t.lr_floor <= t.lr, "train.lr_floor", t.lr_floor, f"a number in [0, train.lr={t.lr}]")
  _check(t.schedule in ("cosine", "linear_warmup_only"), "train.schedule", t.schedule,
         "one of ('cosine', 'linear_warmup_only')")
  for f in ("b1", "b2"):
    _check(0 <= t[f] < 1, f"train.{f}", t[f], "a number in [0, 1)")
  _check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "a non-negative number")
  _check(t.nonfinite_policy in ("halt", "skip"), "train.nonfinite_policy", t.nonfinite_policy, "one of ('halt', 'skip')")
  for f in ("data", "fsdp", "tensor"):
    _check(isinstance(cfg.mesh[f], int) and (cfg.mesh[f] > 0 or cfg.mesh[f] == -1), f"mesh.{f}",
           cfg.mesh[f], "a positive integer or -1 (the remaining devices)")
  _check(sum(cfg.mesh[f] == -1 for f in ("data", "fsdp", "tensor")) <= 1, "mesh", cfg.mesh.to_dict(),
         "at most one axis size of -1")
  return ModelConfig.from_config(cfg.model, vocab_size=padded_vocab(vocab_size, d.vocab_multiple),
                                 max_seq_len=d.seq_len)


def padded_vocab(vocab_size: int, multiple: int) -> int:
  """Rounds the tokenizer's vocabulary up (257 byte ids -> 320): shardable, MXU-friendly widths."""
  return -(-vocab_size // multiple) * multiple


def to_json(cfg: ml_collections.ConfigDict) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)
