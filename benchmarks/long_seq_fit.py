"""Per-chip memory of the paper config at long sequences on v5p slices: ahead-of-time TPU compiles.

  nice -n 10 python benchmarks/long_seq_fit.py                  # every variant not yet in the JSON
  python benchmarks/long_seq_fit.py --only splash_4096_v5p256   # one variant (rerun: drop its entry)

Each variant is one `python -m keel_jax.aot --config configs/paper_keel_512.py:<overrides>
--topology <slice> --steps=train --json` process (libtpu, no TPU needed; ~2 CPU-minutes each, more
under load); its report goes into docs/perf/long_seq_fit.json, rewritten after every compile, so an
interrupted sweep resumes. The variants are fixed here so the table in docs/PERFORMANCE.md can be
regenerated: the 128-chip slice of MaxText's comparison (v5p-256, data 16 x fsdp 8) with remat
'full' and the nested scan (16 groups of 16 blocks), xla vs splash attention, seq 4096 and 8192
(8192 at the same tokens per step: batch 128), and the 8-chip v5p-16 with gradient accumulation.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "docs", "perf", "long_seq_fit.json")
CONFIG = "configs/paper_keel_512.py"
V5P_256 = ("v5p-256", {"mesh.data": 16, "mesh.fsdp": 8})
V5P_16 = ("v5p-16", {"mesh.data": 1, "mesh.fsdp": 8})
LEAN = {"remat_policy": "full", "scan_groups": 16, "loss_chunk": 512}

VARIANTS = {  # name -> (slice, mesh, config overrides)
    "xla_4096_v5p256": (*V5P_256, {**LEAN, "attention_impl": "xla"}),
    "splash_4096_v5p256": (*V5P_256, {**LEAN, "attention_impl": "splash"}),
    "xla_8192_v5p256": (*V5P_256, {**LEAN, "attention_impl": "xla", "seq_len": 8192, "batch_size": 128}),
    "splash_8192_v5p256": (*V5P_256, {**LEAN, "attention_impl": "splash", "seq_len": 8192, "batch_size": 128}),
    "splash_4096_v5p16_accum16": (*V5P_16, {**LEAN, "attention_impl": "splash", "grad_accum_steps": 16}),
}


def command(slice_name: str, mesh: dict, overrides: dict) -> list[str]:
  arg = ",".join(f"{k}={v}" for k, v in overrides.items())
  return [sys.executable, "-m", "keel_jax.aot", "--config", f"{CONFIG}:{arg}", "--topology", slice_name,
          *[f"--config.{k}={v}" for k, v in mesh.items()], "--steps=train", "--json"]


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only", default="", help="comma-separated variant names")
  p.add_argument("--out", default=OUT)
  a = p.parse_args(argv)
  results = json.load(open(a.out)) if os.path.exists(a.out) else {}
  env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  names = a.only.split(",") if a.only else [n for n in VARIANTS if n not in results]
  for name in names:
    slice_name, mesh, overrides = VARIANTS[name]
    cmd = command(slice_name, mesh, overrides)
    print(f"{name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    entry = {"command": " ".join(["python"] + cmd[1:]), "exit": proc.returncode,
             "wall_s": round(time.perf_counter() - start, 1), "loadavg": list(os.getloadavg())}
    try:
      entry["report"] = json.loads(proc.stdout)
    except json.JSONDecodeError:
      entry["stderr_tail"] = proc.stderr[-2000:]
    results[name] = entry
    with open(a.out, "w") as f:
      json.dump(results, f, indent=1)
    rep = entry.get("report", {})
    print(f"  exit {proc.returncode}, {rep.get('per_chip_bytes', 0) / 2 ** 30:.2f} GiB per chip", file=sys.stderr)


if __name__ == "__main__":
  main()
