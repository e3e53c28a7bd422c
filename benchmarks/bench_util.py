"""Shared pieces of the benchmark scripts: run metadata, configs, a jitted train step, timers.

Every script prints one JSON object whose `env` holds the load average before and after: the CPU
host is shared, so a number taken under load reads slower than the code is.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from keel_jax import config_lib
from keel_jax.flops import matmul_flops_per_token  # noqa: F401 (the benchmarks read it from here)
from keel_jax.model import Decoder
from keel_jax.optimizer import lr_schedule, make_optimizer
from keel_jax.train_step import init_state, make_train_step

VOCAB = 320  # the byte tokenizer's 257 ids padded to a multiple of 64, as config_lib.validate does


def env_info() -> dict[str, Any]:
  """What a reader needs to judge a timing: machine, versions, load average now."""
  return {"loadavg": list(os.getloadavg()), "cpu_count": os.cpu_count(), "backend": jax.default_backend(),
          "devices": [d.device_kind for d in jax.devices()], "jax": jax.__version__,
          "python": platform.python_version(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def make_cfg(block: str = "keel", num_blocks: int = 8, d_model: int = 64, seq_len: int = 64,
             batch_size: int = 4, d_ff: int | None = None, num_heads: int = 4, num_kv_heads: int = 2,
             lr: float = 3e-3, **model: Any):
  """A base_config with the model/data fields a benchmark varies; `model` overrides any model field."""
  cfg = config_lib.base_config()
  cfg.model.update(block=block, num_blocks=num_blocks, d_model=d_model, num_heads=num_heads,
                   num_kv_heads=num_kv_heads, d_ff=d_ff or 3 * d_model, **model)
  cfg.data.update(seq_len=seq_len, batch_size=batch_size)
  cfg.train.update(lr=lr)
  return cfg


def build(cfg, donate: bool = True, make_step: Callable = make_train_step):
  """(model, jitted init: rng -> TrainState, train step (jit, state donated unless `donate=False`)).
  `make_step(model, tx, schedule)` defaults to the trainer's own step."""
  model = Decoder(config_lib.validate(cfg, VOCAB))
  tx, schedule = make_optimizer(cfg.train), lr_schedule(cfg.train)

  step = jax.jit(make_step(model, tx, schedule), donate_argnums=0 if donate else ())
  return model, jax.jit(lambda rng: init_state(model, tx, rng)), step


def random_batch(cfg, seed: int = 0) -> dict[str, jax.Array]:
  """Uniform random tokens [batch, seq_len + 1]: timing does not depend on the text."""
  rng = np.random.default_rng(seed)
  return {"tokens": jnp.asarray(rng.integers(0, 257, (cfg.data.batch_size, cfg.data.seq_len + 1)), jnp.int32)}


def timed(fn: Callable, *args) -> tuple[Any, float]:
  """(result, seconds), the result blocked on: async dispatch would otherwise time only the launch."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


def time_train_steps(step, state, batch, steps: int, warmup: int = 1) -> tuple[Any, list[float]]:
  """Per-step seconds of `steps` synchronised steps after `warmup` untimed ones (compile happens there)."""
  for _ in range(warmup):
    state, _ = step(state, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    (state, metrics), dt = timed(step, state, batch)
    times.append(dt)
  return state, times


def summary(times: list[float]) -> dict[str, float]:
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def cpu_peak_flops(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> dict[str, float]:
  """Achievable matmul FLOP/s on this host: median over repeats of one n x n x n product."""
  a = jax.random.normal(jax.random.key(1), (n, n), dtype)
  b = jax.random.normal(jax.random.key(2), (n, n), dtype)
  mm = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(mm(a, b))
  times = [timed(mm, a, b)[1] for _ in range(repeats)]
  return {"n": n, "dtype": jnp.dtype(dtype).name, "median_s": statistics.median(times),
          "flops_per_s": 2 * n ** 3 / statistics.median(times), "best_flops_per_s": 2 * n ** 3 / min(times)}
