#!/usr/bin/env python3
r"""The worker side of launch/tpu.py: starts the trainer detached on this host, and says whether it
runs, how it ended, or stops it. launch/tpu.py runs it on every worker over `gcloud ... ssh`, from
~/mav_jax with the venv's Python; it can be run by hand on a worker too. Standard library only.

  python launch/worker.py check            # exit 1 if a run is going on this host
  python launch/worker.py start -- -m mav_jax.train --config ... --workdir ...
  python launch/worker.py status           # running / finished / failed, and the last log lines
  python launch/worker.py stop             # SIGTERM: the trainer checkpoints and exits

A run is known by its PID file, never by matching command lines (a `pgrep -f` pattern also matches
the ssh shell that carries the command). `start` forks a small supervisor in a session of its own
(so the run outlives the ssh session); the supervisor starts the trainer, records its PID with the
process's start time (a recycled PID is not mistaken for the run), waits for it and records its exit
code. Files, in ~/mav_jax_logs: train.log (this run's output; the previous run's
is kept as train.<date>.log), train.pid, train.exit.
"""

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

# Marks the trainer's own lines in the log (the rest is JAX, XLA and Orbax logging).
_TRAIN_LINE = re.compile(rb"^\[train\] .*$", re.M)
# How JAX's coordination service names the processes it lost (their heartbeats stopped).
_LOST = (
  re.compile(rb"[Tt]ask (\d+) heartbeat timeout"),
  re.compile(rb"unhealthy \(stopped sending heartbeats\):\s*\n((?:\s*\d+[,\s]*)+)"),
)
_COORDINATOR_LOST = re.compile(
  rb"Failed to send RPC to coordination service|remote target coordination_service"
)


LOG_DIR = "~/mav_jax_logs"  # launch/tpu.py's REMOTE_LOG lives here
STOP_WAIT_SECONDS = 600  # for the trainer to save its checkpoint and exit after SIGTERM
SETTLE_SECONDS = 2.0  # a command that cannot start at all (a bad path, a flag error) ends by then


class Files:
  def __init__(self, log_dir: str):
    self.dir = os.path.expanduser(log_dir)
    self.log = os.path.join(self.dir, "train.log")
    self.pid = os.path.join(self.dir, "train.pid")
    self.exit = os.path.join(self.dir, "train.exit")


def _host() -> str:
  return socket.gethostname()


def _start_time(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None if it
  is gone or a zombie (ended, not yet reaped)."""
  try:
    with open(f"/proc/{pid}/stat", "rb") as f:
      stat = f.read()
  except OSError:
    return None
  fields = stat[stat.rindex(b")") + 2 :].split()  # after "(command name)", which may hold spaces
  if fields[0] in (b"Z", b"X"):
    return None
  return fields[19].decode()


def _write_atomic(path: str, text: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def running_pid(files: Files) -> int | None:
  """The PID of this host's run if it is going, else None."""
  try:
    pid_text, started = open(files.pid).read().split()
    pid = int(pid_text)
  except (OSError, ValueError):
    return None
  return pid if _start_time(pid) == started else None


def _exit_code(files: Files) -> int | None:
  try:
    return int(open(files.exit).read())
  except (OSError, ValueError):
    return None


def _describe_exit(code: int | None) -> str:
  if code is None:
    return "not running (how it ended was not recorded: its supervisor was killed)"
  if code == 0:
    return "exited 0"
  if code < 0:
    try:
      name = signal.Signals(-code).name
    except ValueError:
      name = f"signal {-code}"
    return f"ended by {name} (exit {128 - code})"
  return f"failed (exit {code})"


def _log_tail(files: Files, size: int = 1 << 20) -> bytes:
  try:
    with open(files.log, "rb") as f:
      f.seek(max(0, os.path.getsize(files.log) - size))
      return f.read()
  except OSError:
    return b""


def diagnose(log: bytes) -> list[str]:
  """What the end of a log says about how the run went: its last trainer line, and, if JAX's
  coordination service lost other processes, which."""
  lines = []
  train_lines = _TRAIN_LINE.findall(log)
  if train_lines:
    lines.append(train_lines[-1].decode(errors="replace"))
  lost = set()
  for pattern in _LOST:
    for match in pattern.finditer(log):
      lost.update(int(n) for n in re.findall(rb"\d+", match[1]))
  if lost:
    names = ", ".join(str(n) for n in sorted(lost))
    lines.append(
      f"lost contact with process {names} (its heartbeats stopped: it died or hangs; its "
      f"worker's log says why)"
    )
  elif _COORDINATOR_LOST.search(log):
    lines.append(
      "lost contact with the coordination service of process 0 (it died or hangs; worker 0's "
      "log says why)"
    )
  return lines


def cmd_check(args, files: Files) -> int:
  pid = running_pid(files)
  if pid is not None:
    print(f"{_host()}: a run is going (pid {pid})", flush=True)
    return 1
  print(f"{_host()}: no run going", flush=True)
  return 0


def _supervise(command: list[str], files: Files, report_fd: int) -> None:
  """In the supervisor process: start the trainer, record its PID, wait, record its exit code."""
  log = open(files.log, "ab", buffering=0)
  env = dict(os.environ, PYTHONUNBUFFERED="1")  # the log shows each line as it is printed
  try:
    proc = subprocess.Popen(
      command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
    )
  except OSError as e:
    log.write(f"[worker] could not start {shlex.join(command)}: {e}\n".encode())
    _write_atomic(files.exit, "127")
    os.write(report_fd, b"0")
    return
  _write_atomic(files.pid, f"{proc.pid} {_start_time(proc.pid)}\n")
  os.write(report_fd, str(proc.pid).encode())
  os.close(report_fd)
  # The supervisor outlives signals meant for the run (`stop` signals the trainer itself).
  for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
  code = proc.wait()
  _write_atomic(files.exit, f"{code}\n")


def cmd_start(args, files: Files) -> int:
  if not args.command:
    print("error: start needs the command after --, e.g. -- -m mav_jax.train ...", file=sys.stderr)
    return 2
  pid = running_pid(files)
  if pid is not None:
    print(
      f"{_host()}: a run is already going (pid {pid}): stop it first (launch/tpu.py stop)",
      flush=True,
    )
    return 1
  os.makedirs(files.dir, exist_ok=True)
  if os.path.exists(files.log):  # keep the previous run's log
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(files.log)))
    kept, n = os.path.join(files.dir, f"train.{stamp}.log"), 1
    while os.path.exists(kept):
      kept, n = os.path.join(files.dir, f"train.{stamp}-{n}.log"), n + 1
    os.replace(files.log, kept)
  for path in (files.exit, files.pid):
    if os.path.exists(path):
      os.remove(path)
  command = [sys.executable, *args.command]
  with open(files.log, "wb") as log:
    log.write(f"[worker] {_host()} {time.strftime('%F %T')}: {shlex.join(command)}\n".encode())
  sys.stdout.flush()
  read_fd, write_fd = os.pipe()
  child = os.fork()
  if child == 0:  # detach: a new session, then fork again so the supervisor is no session leader
    os.close(read_fd)
    os.setsid()
    if os.fork():
      os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
      os.dup2(null, fd)
    try:
      _supervise(command, files, write_fd)
    finally:
      os._exit(0)
  os.close(write_fd)
  os.waitpid(child, 0)
  with os.fdopen(read_fd, "rb") as report:
    pid = int(report.read() or b"0")
  time.sleep(SETTLE_SECONDS)
  if not pid or running_pid(files) is None:
    print(f"{_host()}: the run ended at once: {_describe_exit(_exit_code(files))}; its log ends:")
    for line in _log_tail(files, 4096).decode(errors="replace").splitlines()[-10:]:
      print(f"  {line}")
    return 1
  print(f"{_host()}: started (pid {pid}), log {files.log}", flush=True)
  return 0


def cmd_status(args, files: Files) -> int:
  pid = running_pid(files)
  if pid is not None:
    state = f"running (pid {pid})"
  elif os.path.exists(files.pid) or os.path.exists(files.exit):
    state = _describe_exit(_exit_code(files))
  else:
    state = "no run started"
  print(f"{_host()}: {state}")
  for line in diagnose(_log_tail(files)) if state != "no run started" else []:
    if pid is None or line.startswith("[train]"):
      print(f"  {line}")
  sys.stdout.flush()
  return 0


def cmd_stop(args, files: Files) -> int:
  pid = running_pid(files)
  if pid is None:
    print(f"{_host()}: no run to stop", flush=True)
    return 0
  # SIGTERM: the trainer saves a checkpoint and exits 0 (with several hosts, JAX's preemption
  # service makes them all stop at the same step).
  os.kill(pid, signal.SIGTERM)
  deadline = time.monotonic() + STOP_WAIT_SECONDS
  while running_pid(files) is not None and time.monotonic() < deadline:
    time.sleep(0.5)
  if running_pid(files) is not None:
    print(
      f"{_host()}: still running {STOP_WAIT_SECONDS} s after SIGTERM (pid {pid}); stop again to "
      f"wait longer, or `kill -9 {pid}` on this worker (no checkpoint)",
      flush=True,
    )
    return 1
  for _ in range(20):  # the supervisor records the exit code just after the trainer ends
    if _exit_code(files) is not None:
      break
    time.sleep(0.1)
  code = _exit_code(files)
  print(f"{_host()}: stopped (pid {pid}): {_describe_exit(code)}")
  for line in diagnose(_log_tail(files)):
    print(f"  {line}")
  sys.stdout.flush()
  return 0 if code == 0 else 1


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="launch/worker.py",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  sub = parser.add_subparsers(dest="action", required=True)
  sub.add_parser("check", help="exit 1 if a run is going on this host")
  p = sub.add_parser("start", help="start the command after -- detached, unless a run is going")
  p.add_argument("command", nargs=argparse.REMAINDER, help="after --: the interpreter's arguments")
  sub.add_parser("status", help="running or how it ended, and the last trainer line")
  sub.add_parser("stop", help="SIGTERM the run and wait (600 s) for it to checkpoint and end")
  args = parser.parse_args(argv)
  if getattr(args, "command", None) and args.command[0] == "--":
    args.command = args.command[1:]
  files = Files(LOG_DIR)
  return {"check": cmd_check, "start": cmd_start, "status": cmd_status, "stop": cmd_stop}[
    args.action
  ](args, files)


if __name__ == "__main__":
  sys.exit(main())
