"""One writer per workdir: a lease file with the holder and a heartbeat, local or on gs://.

A run takes `<workdir>/lease.json` before it saves anything and rewrites its heartbeat every
`HEARTBEAT_S` seconds. A second run on the same workdir stops at once with a message naming the
holder. A lease is taken over, with a warning, when its heartbeat is older than `STALE_S` seconds
or its holder is a process of this machine that no longer exists (a run killed with SIGKILL); with
`--force_unlock` it is taken over at once, and the run that held it stops at its next heartbeat
without saving.

Object stores have no atomic "create if absent" that etils.epath exposes, so taking the lease is
write, wait `SETTLE_S`, read back: of two runs that write at nearly the same moment, the later
write stays and only its writer finds its own token when it reads back.
"""

import json
import os
import socket
import threading
import time
import uuid

from absl import logging
from etils import epath

from mav_jax import errors

LEASE_FILE = "lease.json"
HEARTBEAT_S = 15.0
STALE_S = 120.0
SETTLE_S = 1.0


class WorkdirInUseError(errors.UserError):
  """Another run holds the workdir's lease."""


def _boot_id() -> str:
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip()
  except OSError:
    return ""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def describe(info: dict, now: float | None = None) -> str:
  """'host H, pid P, started at T, last heartbeat N s ago' for a lease's contents."""
  now = time.time() if now is None else now
  started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.get("started", 0)))
  return (
    f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, started {started}, last "
    f"heartbeat {max(0.0, now - info.get('heartbeat', 0)):.0f} s ago"
  )


class Lease:
  """The lease on `workdir`; `acquire()` takes it (or raises WorkdirInUseError), `check()` raises
  once another run took it over, `release()` removes it if it is still this run's."""

  def __init__(self, workdir: str, force: bool = False, log=logging.warning):
    text = str(workdir)
    self.path = epath.Path(text if "://" in text else os.path.abspath(text)) / LEASE_FILE
    self.force = force
    self.log = log
    self.token = uuid.uuid4().hex
    self.info = {
      "token": self.token,
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "boot_id": _boot_id(),
      "started": time.time(),
    }
    self.lost_to: dict | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def read(self) -> dict | None:
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (ValueError, OSError):  # half-written or unreadable: treated as no holder
      return {}

  def _taken_by(self) -> dict | None:
    """The lease's contents if another run holds it now, else None."""
    holder = self.read()
    return holder if holder and holder.get("token") != self.token else None

  def _write(self) -> None:
    self.path.write_text(json.dumps({**self.info, "heartbeat": time.time()}))

  def _stale_reason(self, holder: dict, now: float) -> str | None:
    if not holder:
      return "unreadable lease"
    if now - holder.get("heartbeat", 0) > STALE_S:
      return f"no heartbeat for over {STALE_S:.0f} s"
    same_machine = (
      holder.get("host") == self.info["host"] and holder.get("boot_id") == (self.info["boot_id"])
    )
    if same_machine and not _pid_alive(int(holder.get("pid", -1))):
      return "its process no longer exists"
    return None

  def acquire(self) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    holder = self.read()
    if holder is not None and holder.get("token") != self.token:
      now = time.time()
      stale = self._stale_reason(holder, now)
      if stale is None and not self.force:
        raise WorkdirInUseError(
          f"{self.path.parent} is in use by another run ({describe(holder, now)}). Stop that run, "
          f"or wait: its lease goes stale {STALE_S:.0f} s after its last heartbeat; or pass "
          f"--force_unlock to take the workdir over (the other run then stops without saving)"
        )
      why = "--force_unlock" if stale is None else stale
      self.log(f"taking over the lease on {self.path.parent} ({why}) from {describe(holder, now)}")
    self._write()
    time.sleep(SETTLE_S)
    holder = self.read()
    if not holder or holder.get("token") != self.token:
      raise WorkdirInUseError(
        f"{self.path.parent}: another run took its lease at the same moment "
        f"({describe(holder or {})}); only one run may write a workdir"
      )
    self._thread = threading.Thread(target=self._heartbeat, name="workdir-lease", daemon=True)
    self._thread.start()

  def _heartbeat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      if (holder := self._taken_by()) is not None:
        self.lost_to = holder
        return
      try:
        self._write()
      except OSError as e:  # a full disk must not end the run here: the checkpoint says so
        self.log(f"could not renew the lease {self.path}: {e}")

  def check(self) -> None:
    """Raises WorkdirInUseError if another run has taken this run's workdir over (read afresh:
    called before every checkpoint save)."""
    if self.lost_to is None:
      self.lost_to = self._taken_by()
    if self.lost_to is not None:
      raise WorkdirInUseError(
        f"another run took over {self.path.parent} ({describe(self.lost_to)}); this run stops "
        f"without saving so that the two never write the same checkpoints"
      )

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    holder = self.read()
    if holder and holder.get("token") == self.token:
      self.path.unlink(missing_ok=True)
