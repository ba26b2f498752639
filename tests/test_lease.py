"""The workdir lease (mav_jax.lease): a live holder stops a second run, a stale or dead one is taken
over with a warning, --force_unlock takes it at once and the old holder finds out. The two-process
case (real trainers) is tests/test_train.py::test_one_writer_per_workdir."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from mav_jax import lease


@pytest.fixture(autouse=True)
def _quick(monkeypatch):
  monkeypatch.setattr(lease, "SETTLE_S", 0.01)


def _write(workdir, **fields):
  info = {
    "token": "other",
    "host": "other-host",
    "pid": 1,
    "boot_id": "x",
    "started": time.time() - 60,
    "heartbeat": time.time(),
    **fields,
  }
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, lease.LEASE_FILE), "w") as f:
    json.dump(info, f)


def test_a_live_holder_stops_a_second_run_and_names_itself(tmp_path):
  first = lease.Lease(tmp_path)
  first.acquire()
  try:
    with pytest.raises(lease.WorkdirInUseError) as e:
      lease.Lease(tmp_path).acquire()
    message = str(e.value)
    assert f"pid {os.getpid()}" in message and socket.gethostname() in message
    assert "--force_unlock" in message and f"{lease.STALE_S:.0f} s" in message
    first.check()  # still its own
  finally:
    first.release()
  assert not (tmp_path / lease.LEASE_FILE).exists()
  again = lease.Lease(tmp_path)  # released: free for the next run
  again.acquire()
  again.release()


def test_stale_unreadable_and_dead_holders_are_taken_over_with_a_warning(tmp_path):
  said = []
  _write(tmp_path, heartbeat=time.time() - lease.STALE_S - 5)
  held = lease.Lease(tmp_path, log=said.append)
  held.acquire()
  held.release()
  assert "no heartbeat for over" in said[-1] and "other-host" in said[-1]

  # A process of this machine that is gone (a run killed with SIGKILL): no need to wait.
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  _write(tmp_path, host=socket.gethostname(), boot_id=lease._boot_id(), pid=dead.pid)
  held = lease.Lease(tmp_path, log=said.append)
  held.acquire()
  held.release()
  assert "its process no longer exists" in said[-1]

  (tmp_path / lease.LEASE_FILE).write_text("{half a")
  held = lease.Lease(tmp_path, log=said.append)
  held.acquire()
  held.release()
  assert "unreadable lease" in said[-1]


def test_force_unlock_takes_over_and_the_old_holder_stops(tmp_path):
  old = lease.Lease(tmp_path)
  old.acquire()
  said = []
  new = lease.Lease(tmp_path, force=True, log=said.append)
  new.acquire()
  assert "--force_unlock" in said[-1]
  with pytest.raises(lease.WorkdirInUseError, match="another run took over"):
    old.check()
  old.release()  # not its lease any more: left in place
  assert json.loads((tmp_path / lease.LEASE_FILE).read_text())["token"] == new.token
  new.check()
  new.release()
