"""Orbax checkpoints of the train state and the Grain iterator, saved together, restored together.

Saves are asynchronous: the step loop continues while the previous checkpoint is written. Orbax
writes each step into a temporary directory and renames it when complete, so a run killed mid-save
leaves no step directory that `latest_step()` would return (the leftover temporary directory is
deleted when the next run opens the manager).

Orbax/TensorStore do not checksum array data: bytes overwritten inside a data file decode to other
numbers without error. So each checkpoint also holds an 'integrity' item, a checksum of every
state leaf and of the iterator state, taken when it was saved; `restore` recomputes and compares
them. `restore_latest` falls back to the newest checkpoint that restores and verifies, and moves
the newer, broken ones aside (never deletes them).
"""
from __future__ import annotations

import hashlib
import json
import time

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from keel_jax import paths


class CheckpointError(RuntimeError):
  """No checkpoint in a non-empty checkpoint directory could be restored and verified."""


class CheckpointCorrupt(CheckpointError):
  """A checkpoint restored, but its contents differ from the checksums written when it was saved."""


class Checkpointer:
  """Keep-last-N checkpoints under `directory`; each holds {'state': TrainState, 'data': iterator}."""

  def __init__(self, directory, keep: int, async_save: bool = True):
    self.directory = paths.path(directory)  # local or gs:// (Orbax writes both)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_iterator=None) -> bool:
    """Starts an asynchronous save of `state` (and the iterator's position) as `step`."""
    if step in self.manager.all_steps():
      return False
    items = {"state": ocp.args.StandardSave(state),
             "integrity": ocp.args.JsonSave(integrity_record(state, data_iterator))}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores onto `abstract_state` (ShapeDtypeStructs carrying the target shardings, which may
    differ from the saved mesh); restores `data_iterator` in place. Raises CheckpointCorrupt if
    the contents differ from the checksums saved with them."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    checked = (self.directory / str(step) / "integrity").exists()
    if checked:  # absent only in checkpoints written before checksums existed
      items["integrity"] = ocp.args.JsonRestore()
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    if checked:
      verify(out["integrity"], out["state"], data_iterator, f"checkpoint {step} in {self.directory}")
    return out["state"]

  def restore_latest(self, abstract_state, data_iterator=None, log=print):
    """(step, state) of the newest checkpoint that restores and verifies; None if there is none.

    Newer checkpoints that fail (truncated, garbled, unreadable) are moved to `<dir>_corrupt/`
    with a warning: left in place they would shadow the good one on every later resume and
    block saving their step again. If none restores, nothing is moved and CheckpointError says why.
    """
    steps = sorted(self.all_steps(), reverse=True)
    if steps and (diff := self._shape_mismatches(steps[0], abstract_state)):
      raise CheckpointError(f"checkpoint {steps[0]} in {self.directory} holds other array shapes than "
                            "this config builds (so --allow_config_change cannot resume it):\n"
                            + "\n".join(f"  {d}" for d in diff) + "\nUse the original model config or a new --workdir.")
    failures = []
    for step in steps:
      try:
        state = self.restore(step, abstract_state, data_iterator)
      except Exception as e:  # noqa: BLE001 -- Orbax/TensorStore raise many types for bad bytes
        failures.append((step, e))
        continue
      for bad, e in failures:
        moved = self._quarantine(bad)
        log(f"warning: checkpoint {bad} cannot be used ({_short(e)}); moved it to {moved} and "
            f"resumed from the previous checkpoint, {step}")
      return step, state
    if not failures:
      return None
    lines = "\n".join(f"  step {s}: {_short(e)}" for s, e in failures)
    raise CheckpointError(f"no checkpoint in {self.directory} could be restored:\n{lines}\n"
                          "If the model config changed, resume with the original one; otherwise "
                          "move the checkpoints aside or use a new --workdir to start over.")

  def _shape_mismatches(self, step: int, abstract_state) -> list[str]:
    """'path: checkpoint has S1, config builds S2' lines (params first, at most 6); [] if the
    shapes fit or the metadata is unreadable (then the restore itself reports the damage)."""
    try:
      saved = _shapes(ocp.StandardCheckpointHandler().metadata(
          self.directory / str(step) / "state"))
    except Exception:  # noqa: BLE001 -- corrupt metadata: left to restore_latest's fallback
      return []
    wanted = _shapes(abstract_state)
    lines = [f"{k}: checkpoint has {saved.get(k, 'nothing')}, config builds {wanted.get(k, 'nothing')}"
             for k in sorted(set(saved) | set(wanted), key=lambda k: (not k.startswith("params"), k))
             if saved.get(k) != wanted.get(k)]
    return lines[:6] + ([f"... and {len(lines) - 6} more"] if len(lines) > 6 else [])

  def _quarantine(self, step: int) -> str:
    """Moves checkpoint `step` out of the managed directory (kept for inspection)."""
    dest_dir = self.directory.with_name(self.directory.name + "_corrupt")
    dest = dest_dir / f"{step}.{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
      paths.move_dir(self.directory / str(step), dest)
    ocp.multihost.sync_global_processes(f"keel_quarantine_{step}")
    self.manager.reload()
    return dest

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree, shardings):
  """ShapeDtypeStructs for `tree` (arrays or ShapeDtypeStructs) with the given shardings."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# ---- integrity -----------------------------------------------------------------------------------

def _leaf_checksum(x: jax.Array) -> jax.Array:
  """uint32 sum of the leaf's bit patterns times odd position weights, mod 2**32.

  Integer sums are exact in any order, so the value does not depend on sharding or device count;
  odd weights make any single changed element change the sum, and tie the value to positions.
  """
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    size = jnp.dtype(x.dtype).itemsize
    bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size])
    bits = bits.astype(jnp.uint32)  # 8-byte types gain a trailing axis of 2 words
  index = jnp.zeros(bits.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(bits.ndim)):  # row-major position without reshaping a sharded array
    index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= bits.shape[axis]
  weights = index * jnp.uint32(0x9E3779B1) | jnp.uint32(1)
  return jnp.sum(bits * weights, dtype=jnp.uint32)


_checksums = jax.jit(lambda tree: [_leaf_checksum(x) for x in jax.tree.leaves(tree)])


def integrity_record(state, data_iterator=None) -> dict:
  """{'leaves': {path: checksum}, 'data': sha256 of the iterator state} (JSON)."""
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
  sums = [int(v) for v in jax.device_get(_checksums(state))]
  record = {"leaves": dict(zip(paths, sums))}
  if data_iterator is not None:
    record["data"] = _iterator_digest(data_iterator)
  return record


def _iterator_digest(data_iterator) -> str:
  text = json.dumps(data_iterator.get_state(), sort_keys=True, default=repr)
  return hashlib.sha256(text.encode()).hexdigest()


def verify(record: dict, state, data_iterator, what: str) -> None:
  """Raises CheckpointCorrupt naming every leaf (or the iterator) that differs from `record`."""
  now = integrity_record(state, data_iterator)
  bad = sorted(set(record["leaves"]) ^ set(now["leaves"]))  # tree structure changed
  bad += [k for k, v in now["leaves"].items() if k in record["leaves"] and record["leaves"][k] != v]
  if "data" in record and "data" in now and record["data"] != now["data"]:
    bad.append("data iterator state")
  if bad:
    shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    raise CheckpointCorrupt(f"{what} is corrupt: checksum mismatch in {shown} (written at save time, "
                            "different now)")


def _shapes(tree) -> dict[str, tuple]:
  """{'params/embed/embedding': shape}: one naming for live states and Orbax metadata trees."""
  name = lambda k: str(next(getattr(k, a) for a in ("key", "name", "idx") if hasattr(k, a)))
  return {"/".join(map(name, path)): tuple(x.shape) for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _short(e: BaseException, limit: int = 300) -> str:
  """One line about `e`, from its root cause: Orbax wraps TensorStore's precise error in a generic
  one that mostly dumps the store's spec."""
  while (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"
