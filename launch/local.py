#!/usr/bin/env python3
r"""Run a multi-host job on one machine: N processes on 127.0.0.1, each with its own fake CPU
devices, joined by jax.distributed the way the hosts of a TPU pod are. Try the launch path (sharded
data loading, checkpoints written by every host, resume) on a laptop before paying for a pod.

  python launch/local.py --num_processes 2 --cpu_devices 4 -- \
      --config configs/decoder.py:tiny --workdir workdirs/two_hosts

Everything after `--` goes to the entrypoint (default `mav_jax.train`, any module taking the same
--coordinator_address / --num_processes / --process_id / --cpu_devices flags). Each output line is
prefixed with its process index. If one process fails, the others are stopped and the runner exits
with its code; Ctrl-C or SIGTERM is passed on to every process (the trainer then checkpoints).
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_commands(args) -> list[list[str]]:
  """The command of each process."""
  port = args.port or free_port()
  return [
    [
      args.python,
      "-m",
      args.module,
      *args.entrypoint_args,
      f"--coordinator_address=127.0.0.1:{port}",
      f"--num_processes={args.num_processes}",
      f"--process_id={i}",
      f"--cpu_devices={args.cpu_devices}",
    ]
    for i in range(args.num_processes)
  ]


def _pump(index: int, stream, out, lock) -> None:
  for line in stream:
    with lock:
      out.write(f"[process {index}] {line}")
      out.flush()


def run(commands: list[list[str]], env=None, out=sys.stdout, timeout: float | None = None) -> int:
  """Starts every command, prefixes their output, and returns the first non-zero exit code (the
  others are then stopped) or 0."""
  env = dict(os.environ if env is None else env)
  env.pop("XLA_FLAGS", None)  # each process fakes its own devices with --cpu_devices
  env.setdefault("PYTHONUNBUFFERED", "1")
  lock = threading.Lock()
  procs = [
    subprocess.Popen(
      cmd, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    for cmd in commands
  ]
  pumps = [
    threading.Thread(target=_pump, args=(i, p.stdout, out, lock), daemon=True)
    for i, p in enumerate(procs)
  ]
  for t in pumps:
    t.start()

  def forward(signum, frame):
    del frame
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  code = 0
  try:
    pending = set(range(len(procs)))
    while pending:
      for i in sorted(pending):
        try:
          rc = procs[i].wait(timeout=0.2 if timeout is None else min(0.2, timeout))
        except subprocess.TimeoutExpired:
          continue
        pending.discard(i)
        if rc and not code:
          code = rc
          with lock:
            out.write(f"[local] process {i} exited with {rc}: stopping the others\n")
          for j in pending:
            procs[j].terminate()
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    for p in procs:
      if p.poll() is None:
        p.kill()
    for t in pumps:
      t.join(timeout=5)
  return code


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="launch/local.py",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--num_processes", type=int, default=2, help="processes (hosts) to start")
  parser.add_argument("--cpu_devices", type=int, default=4, help="fake CPU devices per process")
  parser.add_argument("--module", default="mav_jax.train", help="entrypoint module")
  parser.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
  parser.add_argument("--python", default=sys.executable, help="Python interpreter")
  parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  parser.add_argument("entrypoint_args", nargs="*", help="after --: the entrypoint's flags")
  args = parser.parse_args(argv)
  if args.num_processes < 1 or args.cpu_devices < 1:
    parser.exit(2, "error: --num_processes and --cpu_devices must be >= 1\n")
  commands = process_commands(args)
  for cmd in commands:
    print("+ " + " ".join(cmd), flush=True)
  if args.dry_run:
    return 0
  return run(commands)


if __name__ == "__main__":
  sys.exit(main())
