r"""Videos per second of the shipped tiny cascade (text -> 64x64 video, every stage at its configs'
steps) on this machine's CPU, for each device count and batch size: one process per device count
(fake CPU devices), one warm-up call per batch size (it compiles), then timed calls.

  .venv/bin/python scripts/sampling_throughput.py [--devices 1,8] [--batches 1,4,16] [--repeats 2]

Prints a markdown table row per (devices, batch).
"""

import argparse
import os
import statistics
import subprocess
import sys
import time


def measure(devices: int, batches: list[int], repeats: int) -> None:
  import jax

  from mav_jax import sample_lib

  cascade = sample_lib.Cascade(
    sample_lib.default_checkpoints(), progress=sample_lib.Progress(open(os.devnull, "w"))
  )
  assert len(jax.devices()) == devices
  for b in batches:
    prompts = [f"a red circle moving left {i}" for i in range(b)]
    start = time.perf_counter()
    jax.block_until_ready(cascade.text_to_video(prompts, jax.random.key(0))[0])
    first = time.perf_counter() - start
    times = []
    for r in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(cascade.text_to_video(prompts, jax.random.key(r + 1))[0])
      times.append(time.perf_counter() - start)
    t = statistics.median(times)
    print(
      f"| {devices} | {b} | {first:.1f} | {t:.2f} | {b / t:.3f} |",
      flush=True,
    )


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--devices", default="1,8")
  parser.add_argument("--batches", default="1,4,16")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--child", type=int, default=0)
  args = parser.parse_args()
  batches = [int(b) for b in args.batches.split(",")]
  if args.child:
    measure(args.child, batches, args.repeats)
    return
  print("| devices | batch | first call s (compiles) | s per call | videos/s |")
  print("|---|---|---|---|---|")
  for n in (int(d) for d in args.devices.split(",")):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
    command = [sys.executable, __file__, f"--child={n}", f"--batches={args.batches}"]
    command += [f"--repeats={args.repeats}"]
    subprocess.run(command, env=env, check=True)


if __name__ == "__main__":
  main()
