"""Where the paper config fits: ahead-of-time TPU compiles of its train step on Cloud TPU slices.

  nice -n 10 python benchmarks/tpu_fit.py                 # all rows, resumes docs/perf/tpu_fit.json
  python benchmarks/tpu_fit.py --rows keel/512 --slices v5p-256,v5p-128
  python benchmarks/tpu_fit.py --table                    # the markdown table for docs/SCALING.md

For each row (block x sub-layers) and slice, variants of configs/paper_keel_512.py are compiled in
order, each in its own `python -m keel_jax.aot --steps=train --json` process, until one fits:
  1. the config as shipped (its mesh, remat policy and scan);
  2. fsdp over every chip (data=1), same remat;
  3. that with remat 'full';
  4. that with the nested scan (model.scan_groups = 16, or 32 at 1024 sub-layers);
  5. then the batch halved, while the per-chip batch is above 1 (the run then needs gradient
     accumulation to keep the paper's batch of 256).
The variants are ordered by their roofline MFU ceiling (remat recompute is the only thing that
changes it; fsdp over more chips costs communication the roofline does not see), so the first that
fits is the best this search finds. An out-of-memory compile fails within seconds; a fitting one
takes ~1-5 min of CPU. The JSON is rewritten after every compile, and entries already in it are
skipped, so the script resumes where it stopped. Requires libtpu (`pip install -e '.[tpu]'`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from keel_jax import aot, tpu_slices  # noqa: E402

CONFIG = "configs/paper_keel_512.py"
ROWS = ("keel/512", "keel/1024", "pre_ln/512", "pre_ln/1024")  # block / sub-layers, in priority order
SLICES = ("v4-128", "v5p-16", "v5p-32", "v5p-64", "v5p-128", "v5p-256", "v5e-256", "v6e-64", "v6e-256")
PAPER_BATCH = 256
GiB = 1024 ** 3


def variants(chips: int, sublayers: int):
  """(name, overrides) in the order tried."""
  fsdp_all = {"mesh.data": 1, "mesh.fsdp": chips}
  groups = 16 if sublayers == 512 else 32
  yield "shipped", {}
  if chips != 8:  # on 8 chips the shipped mesh (data=-1 x fsdp=8) is already fsdp over all
    yield "fsdp_all", fsdp_all
  yield "fsdp_all+full", {**fsdp_all, "model.remat_policy": "full"}
  nested = {**fsdp_all, "model.remat_policy": "full", "model.scan_groups": groups}
  yield "fsdp_all+full+nested", nested
  batch = PAPER_BATCH // 2
  while batch >= chips:  # at least one sequence per chip
    yield f"fsdp_all+full+nested+batch{batch}", {**nested, "data.batch_size": batch}
    batch //= 2


def compile_variant(row: str, overrides: dict, topology: str, timeout: int) -> dict:
  block, sublayers = row.split("/")
  flags = [f"--config.model.block={block}", f"--config.model.num_blocks={int(sublayers) // 2}",
           "--config.model.norm_impl=pallas"]
  flags += [f"--config.{k}={v}" for k, v in overrides.items()]
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", **aot.TPU_ENV)
  cmd = [sys.executable, "-m", "keel_jax.aot", "--config", CONFIG, "--topology", topology, "--steps=train",
         "--json", *flags]
  t0 = time.time()
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
  wall = time.time() - t0
  if proc.returncode not in (aot.EXIT_FITS, aot.EXIT_DOES_NOT_FIT):
    return {"error": proc.stderr.strip().splitlines()[-1][:500] if proc.stderr.strip() else f"exit {proc.returncode}",
            "wall_s": wall}
  r = json.loads(proc.stdout)
  out = {k: r[k] for k in ("fits", "per_chip_bytes", "temp_bytes", "hbm_bytes", "compile_s", "mosaic_calls",
                           "mesh", "batch_size")}
  out.update(remat=r["model"]["remat_policy"], scan_groups=r["model"]["scan_groups"], wall_s=round(wall, 1),
             mfu_ceiling=r.get("roofline", {}).get("mfu_ceiling"),
             state_bytes=r["steps"]["train"]["state_bytes"], oom=r["steps"]["train"]["oom"][:200])
  return out


def git_commit() -> str:
  def git(*a):
    return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()
  return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "keel_jax", "configs") else "")


def measure(args) -> None:
  results = json.load(open(args.out)) if os.path.exists(args.out) else {"entries": {}}
  results.update(config=CONFIG, norm_impl="pallas",
                 note="train step only; per_chip_bytes = argument + output - aliased + temporary "
                      "(an out-of-memory compile: the temporaries the compiler says it needs)")
  for row in args.rows.split(","):
    for topology in args.slices.split(","):
      key = f"{row} {topology}"
      entry = results["entries"].get(key, {"tried": {}})
      failed = [n for n, t in entry["tried"].items() if "error" in t]
      if entry.get("done") and not failed:
        continue
      for name in failed:  # a compile that crashed (not one that ran out of memory) is tried again
        del entry["tried"][name]
      chips = tpu_slices.parse(topology).chips
      for name, overrides in variants(chips, int(row.split("/")[1])):
        if name not in entry["tried"]:
          print(f"{key}: {name} ...", file=sys.stderr, flush=True)
          entry["tried"][name] = {"overrides": overrides, "commit": git_commit(),
                                  **compile_variant(row, overrides, topology, args.timeout)}
          print(f"  {json.dumps(entry['tried'][name])}", file=sys.stderr, flush=True)
          results["entries"][key] = entry
          save(results, args.out)
        if entry["tried"][name].get("fits"):
          entry["best"] = name
          break
      entry["done"] = True
      results["entries"][key] = entry
      save(results, args.out)


def save(results: dict, path: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(results, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def table(path: str) -> str:
  """Markdown: one line per measured (row, slice)."""
  results = json.load(open(path))
  lines = ["| block | sub-layers | slice | chips | fits (batch 256) | best variant found | mesh (data x fsdp) | remat | "
           "per-chip GiB / HBM | compile s | MFU ceiling |", "|" + "---|" * 11]
  def order(key):
    row, topology = key.split()
    return (ROWS.index(row) if row in ROWS else len(ROWS), tpu_slices.parse(topology).chips, topology)

  for key in sorted(results["entries"], key=order):
    e = results["entries"][key]
    row, topology = key.split()
    block, sublayers = row.split("/")
    slc = tpu_slices.parse(topology)
    best = e["tried"].get(e.get("best", ""), {})
    fits_256 = bool(best) and best["batch_size"] == PAPER_BATCH
    if best:
      remat = best["remat"] + (f", scan_groups {best['scan_groups']}" if best["scan_groups"] else "")
      mesh = f"{best['mesh']['data']} x {best['mesh']['fsdp']}"
      mem = f"{best['per_chip_bytes'] / GiB:.1f} / {slc.gen.hbm_bytes / GiB:.0f}"
      variant = e["best"] + ("" if fits_256 else f" (needs grad accumulation x{PAPER_BATCH // best['batch_size']})")
      lines.append(f"| {block} | {sublayers} | {topology} | {slc.chips} | {'yes' if fits_256 else 'no'} | {variant} | "
                   f"{mesh} | {remat} | {mem} | {best['compile_s']:.0f} | {best['mfu_ceiling']:.0%} |")
    else:
      needs = [t["per_chip_bytes"] for t in e["tried"].values() if (t.get("per_chip_bytes") or 0) > 0]
      least = f"{min(needs) / GiB:.1f} (least tried)" if needs else "?"
      lines.append(f"| {block} | {sublayers} | {topology} | {slc.chips} | no | none of {len(e['tried'])} tried"
                   f"{' (not finished)' if not e.get('done') else ''} | | | "
                   f"{least} / {slc.gen.hbm_bytes / GiB:.0f} | | |")
  rebased = results.get("rebased", {})
  commits = sorted({rebased.get(t["commit"], t["commit"]) for e in results["entries"].values()
                    for t in e["tried"].values()})
  lines += ["", f"Measured at commits {', '.join(commits)} (train step, `model.norm_impl=pallas`). "
            + smallest_slice(results)]
  return "\n".join(lines)


def config_arg(overrides: dict) -> str:
  """The `:arg` of configs/paper_keel_512.py that applies `overrides`."""
  return ",".join(f"{k}={v}" for k, v in overrides.items())


def smallest_slice(results: dict) -> str:
  """Which measured slice with the fewest chips trains the paper config at its batch, and how."""
  fits = []
  for key, e in results["entries"].items():
    best = e["tried"].get(e.get("best", ""), {})
    if best and best["batch_size"] == PAPER_BATCH:
      row, topology = key.split()
      fits.append((tpu_slices.parse(topology).chips, topology, row, best["overrides"]))
  if not fits:
    return "No measured slice trains the paper config at batch 256."
  out = []
  for row in sorted({f[2] for f in fits}):
    chips, topology, _, overrides = min(f for f in fits if f[2] == row)
    block, sublayers = row.split("/")
    arg = config_arg({**({"block": block} if block != "keel" else {}),
                      **({"num_blocks": int(sublayers) // 2} if sublayers != "512" else {}), **overrides})
    out.append(f"{block} {sublayers}: {topology} ({chips} chips), `--config {CONFIG}{':' + arg if arg else ''}`")
  return "Smallest measured slice that trains it at batch 256: " + "; ".join(out) + "."


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=os.path.join(REPO, "docs", "perf", "tpu_fit.json"))
  p.add_argument("--rows", default=",".join(ROWS))
  p.add_argument("--slices", default=",".join(SLICES))
  p.add_argument("--timeout", type=int, default=1800, help="seconds per compile")
  p.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
  args = p.parse_args()
  if args.table:
    print(table(args.out))
    return
  if not aot.libtpu_available():
    sys.exit(aot.INSTALL_HINT)
  measure(args)
  print(table(args.out))


if __name__ == "__main__":
  main()
