"""Running the real CLIs in subprocesses, as a user would."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli_env(**extra) -> dict:
  env = dict(os.environ)
  env.update(PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu", **extra)
  return env


def run_module(module: str, *args: str, check: bool = True, timeout: int = 600, env=None, **popen):
  """`python -m module args...` from the repo root; returns the CompletedProcess (text output)."""
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env or cli_env(),
                        capture_output=True, text=True, timeout=timeout, **popen)
  if check and proc.returncode != 0:
    raise AssertionError(f"{module} {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
  return proc


def run_train(workdir, *overrides: str, config: str = "configs/tiny.py", **kw):
  """`python -m keel_jax.train --config CONFIG --workdir W --config.x=y ...`."""
  return run_module("keel_jax.train", "--config", config, "--workdir", str(workdir), *overrides, **kw)
