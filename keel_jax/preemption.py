"""Stopping a run cleanly when its machines are about to go away: SIGTERM, SIGINT, or a Cloud TPU
maintenance notice. The loop asks `Preemption.should_stop(step)` after every step; when it says
yes, every process saves the same step and the run exits 0 (train.py).

One process: the signal sets a flag; the step in flight finishes, then the loop stops.

Several processes (jax.distributed): a notice usually reaches one host, but a step is a collective,
so a process that stopped alone would leave the others waiting for it forever. JAX's preemption
sync service (on with jax.distributed unless `jax_enable_preemption_service` is off) catches
SIGTERM itself, tells every process, and agrees on one step past the furthest any process has
reached; `multihost_utils.reached_preemption_sync_point(step)`, called with the same step on every
process, is True at that step everywhere. Python therefore leaves SIGTERM to JAX there; SIGINT and
the maintenance notice are forwarded to it as a SIGTERM to this process.

The maintenance notice: on a Cloud TPU VM, the metadata server's `instance/maintenance-event`
changes from NONE before the host is taken for maintenance. A daemon thread waits on it (only on
TPU hosts, or wherever KEEL_MAINTENANCE_URL names another endpoint) and sends this process SIGTERM.
"""
from __future__ import annotations

import os
import signal
import threading
import urllib.request

import jax
from jax.experimental import multihost_utils

MAINTENANCE_URL = ("http://metadata.google.internal/computeMetadata/v1/instance/maintenance-event"
                   "?wait_for_change=true")


class Preemption:
  """Signal handlers for the life of a training loop; `close()` puts the previous ones back."""

  def __init__(self, maintenance_url: str | None = None):
    self.signal: int | None = None  # the signal this process received, if any
    self.agreed = (jax.process_count() > 1 and jax.distributed.is_initialized()
                   and getattr(jax.config, "jax_enable_preemption_service", True))
    handled = (signal.SIGINT,) if self.agreed else (signal.SIGTERM, signal.SIGINT)
    self.previous = {s: signal.signal(s, self._on_signal) for s in handled}
    url = maintenance_url or os.environ.get("KEEL_MAINTENANCE_URL") or (
        MAINTENANCE_URL if jax.devices()[0].platform == "tpu" else None)
    self._closed = threading.Event()
    if url:
      threading.Thread(target=watch_maintenance, args=(url, self._closed), daemon=True).start()

  def _on_signal(self, signum, _frame) -> None:
    self.signal = signum
    if self.agreed and signum != signal.SIGTERM:
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's notifier, which tells the other processes

  def should_stop(self, step: int) -> bool:
    """True when the run must stop after `step` (the same step on every process)."""
    if self.agreed:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signal is not None

  def close(self) -> None:
    self._closed.set()
    for s, previous in self.previous.items():
      signal.signal(s, previous)


def watch_maintenance(url: str, closed: threading.Event) -> None:
  """Waits on the metadata server's maintenance event; SIGTERM to this process when one is announced.
  Gives up quietly if the endpoint does not answer (not on a Cloud VM)."""
  failures = 0
  while not closed.is_set() and failures < 3:
    try:
      request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
      with urllib.request.urlopen(request, timeout=3600) as response:
        event = response.read().decode().strip()
    except OSError:
      failures += 1
      closed.wait(1.0)
      continue
    failures = 0
    if event and event != "NONE" and not closed.is_set():
      os.kill(os.getpid(), signal.SIGTERM)
      return
