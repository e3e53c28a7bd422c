"""Train-step speed and memory of model.attention_impl xla vs dot_product on this host, seq 512-4096; JSON.

  python benchmarks/attention_impls.py            # Keel, 4 blocks, width 128, 8k tokens per step (~15 min)
  python benchmarks/attention_impls.py --small    # seconds-long smoke run

One process compiles the trainer's own train step (keel_jax.train_step, state donated) for every
(impl, seq_len) at a fixed number of tokens per step (batch = tokens / seq_len), then times them
in interleaved rounds: each round runs `--steps` steps of every config in turn, so load on the
shared host falls on all configs alike. Per config:
  tokens_per_s   tokens per step / median step time over all rounds (`rounds`: each round's median);
  xla_peak_bytes XLA's memory analysis of the compiled step: arguments + outputs - donated + temporaries;
  xla_temp_bytes its temporaries (the attention logits are there).
`ratio`: dot_product / xla tokens/s per seq_len. Splash is not timed here: on CPU it only interprets.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_util as bu  # noqa: E402

IMPLS = ("xla", "dot_product")


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seq_lens", default="512,1024,2048,4096")
  p.add_argument("--tokens", type=int, default=8192, help="tokens per step (batch = tokens / seq_len)")
  p.add_argument("--blocks", type=int, default=4)
  p.add_argument("--d_model", type=int, default=128)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=3, help="timed steps per config per round")
  p.add_argument("--small", action="store_true", help="tiny sizes: a smoke run, not a result")
  p.add_argument("--out", default="", help="also write the JSON here")
  a = p.parse_args(argv)
  if a.small:
    a.seq_lens, a.tokens, a.blocks, a.d_model, a.rounds, a.steps = "32,64", 128, 2, 32, 2, 1
  env = bu.env_info()
  configs = {}
  for seq in [int(s) for s in a.seq_lens.split(",")]:
    for impl in IMPLS:
      cfg = bu.make_cfg(block="keel", num_blocks=a.blocks, d_model=a.d_model, seq_len=seq,
                        batch_size=max(a.tokens // seq, 1), attention_impl=impl, remat_policy="full")
      cfg.train.warmup_steps = 1
      _, init, step = bu.build(cfg)
      batch = bu.random_batch(cfg)
      state = init(jax.random.key(0))
      compiled, compile_s = bu.timed(lambda: step.lower(state, batch).compile())
      ma = compiled.memory_analysis()
      state, _ = step(state, batch)  # warm up
      configs[(impl, seq)] = {
          "state": state, "step": step, "batch": batch, "row": {
              "impl": impl, "seq_len": seq, "batch_size": cfg.data.batch_size, "compile_s": compile_s,
              "xla_temp_bytes": ma.temp_size_in_bytes,
              "xla_peak_bytes": (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
                                 + ma.temp_size_in_bytes),
              "rounds": []}}
      print(f"compiled {impl} seq {seq} in {compile_s:.1f} s", file=sys.stderr)
  for r in range(a.rounds):
    for key, c in configs.items():
      c["state"], times = bu.time_train_steps(c["step"], c["state"], c["batch"], a.steps, warmup=0)
      c["row"]["rounds"].append(statistics.median(times))
      c.setdefault("times", []).extend(times)
    print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)
  rows = []
  for (impl, seq), c in configs.items():
    row = c["row"]
    row["step"] = bu.summary(c["times"])
    row["tokens_per_s"] = row["batch_size"] * seq / row["step"]["median_s"]
    rows.append(row)
  ratio = {}
  for seq in sorted({r["seq_len"] for r in rows}):
    by = {r["impl"]: r for r in rows if r["seq_len"] == seq}
    ratio[seq] = {"tokens_per_s": by["dot_product"]["tokens_per_s"] / by["xla"]["tokens_per_s"],
                  "xla_peak_bytes": by["dot_product"]["xla_peak_bytes"] / by["xla"]["xla_peak_bytes"]}
  out = {"benchmark": "attention_impls", "args": vars(a), "env": env, "rows": rows,
         "ratio_dot_product_over_xla": ratio, "loadavg_end": list(os.getloadavg())}
  text = json.dumps(out, indent=1)
  if a.out:
    with open(a.out, "w") as f:
      f.write(text + "\n")
  print(text)
  return out


if __name__ == "__main__":
  main()
