r"""Where the TPU compiler expects a compiled step's time to go, per kind of op (issue 24, item 1).

  .venv/bin/python -m mav_jax.benchmark --config configs/decoder.py:paper --target v5p:2x2x1 \
      --clip_config configs/clip.py:base --batch_size 8 --skip_sample --strategies data_parallel \
      --save_hlo --output out/d_paper_dp
  .venv/bin/python scripts/per_op.py out/d_paper_dp/hlo/*.hlo.txt.gz [--top 15]

Reads the optimised HLO `--save_hlo` keeps and sums the compiler's per-op estimate
(`"estimated_cycles"` in each scheduled op's backend config) per kind (`compiled_stats.OP_KINDS`:
collectives, convolutions, matmuls, group norm / reductions, copies / transposes, optimizer / EMA
updates, other elementwise work): ops, share of the estimated cycles, bytes read + written as the
shapes say. Compiler estimates, not measurements; a loop body's ops count once.
"""

import argparse
import gzip
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mav_jax.parallel import compiled_stats  # noqa: E402


def markdown(rows: list[dict]) -> str:
  lines = ["| kind | ops | est. cycles share | GiB read + written |", "|---|---|---|---|"]
  for r in compiled_stats.per_op_table(rows):
    lines.append(f"| {r['kind']} | {r['ops']} | {r['share']:.1%} | {r['bytes'] / 2**30:.2f} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("hlo", nargs="+", help="optimised HLO text (.gz or plain) from --save_hlo")
  parser.add_argument("--top", type=int, default=10, help="also list the N dearest ops")
  args = parser.parse_args()
  for path in args.hlo:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
      rows = compiled_stats.per_op(f.read())
    print(f"## {os.path.basename(path)}\n")
    if not rows:
      print("no per-op estimates in this program (not compiled for a TPU?)\n")
      continue
    print(markdown(rows) + "\n")
    total = sum(r["cycles"] for r in rows)
    print("| dearest ops | kind | share | JAX op |\n|---|---|---|---|")
    for r in sorted(rows, key=lambda r: -r["cycles"])[: args.top]:
      print(f"| {r['name']} | {r['kind']} | {r['cycles'] / total:.1%} | {r['op_name'][-70:]} |")
    print()


if __name__ == "__main__":
  main()
