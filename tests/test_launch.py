"""launch/: the Cloud TPU launcher run against a stand-in gcloud (tests/fake_gcloud.py) whose
TPU VM workers are folders on this machine: a run's whole life on 2 simulated workers forming one JAX
job, a lost worker, setup's copy; the commands of a 2-slice queued resource (dry run: a multi-slice
mesh cannot form on CPU); errors; and the local multi-host runner."""

import glob
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
from conftest import TEST_XLA_FLAGS
from test_train import _SUBPROCESS_ENV, _SUBPROCESS_OVERRIDES, _flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = sys.prefix  # the venv running the tests: the workers' pre-built venv


def _load(name):
  spec = importlib.util.spec_from_file_location(
    f"launch_{name}", os.path.join(REPO, "launch", f"{name}.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


tpu = _load("tpu")
local = _load("local")
worker = _load("worker")

MULTI = [
  "--name=mav-ms",
  "--zone=us-east5-a",
  "--project=proj",
  "--accelerator_type=v5p-128",
  "--num_slices=2",
]
_MAV_VARS = ("MAV_TPU_NAME", "MAV_TPU_ZONE", "MAV_TPU_PROJECT", "MAV_TPU_TYPE", "MAV_TPU_SLICES")
# How long JAX's coordination service waits for a lost process's heartbeats in these tests (its
# default is 100 s; MAV_TEST_HEARTBEAT_TIMEOUT=100 measures that).
HEARTBEAT = int(os.environ.get("MAV_TEST_HEARTBEAT_TIMEOUT", "10"))


def _commands(capsys, *argv) -> list[list[str]]:
  """The commands a dry run prints (each '+ ' line, split like a shell would)."""
  for var in _MAV_VARS:
    os.environ.pop(var, None)
  assert tpu.main([argv[0], "--dry_run", *argv[1:]]) == 0  # before any "--"
  out = capsys.readouterr().out
  return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


# ---------------------------------------------------------------------------------------------
# The launcher executed against the stand-in gcloud.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def source_repo(tmp_path_factory):
  """This checkout's files (committed or not, as the tests see them) as one commit of a git
  repository: what `setup --source=git` clones on the workers."""
  repo = tmp_path_factory.mktemp("source")
  files = subprocess.run(
    ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
    cwd=REPO, capture_output=True, check=True,
  ).stdout.decode().split("\0")  # fmt: skip
  for name in filter(None, files):
    if os.path.isfile(os.path.join(REPO, name)):  # deleted but not yet committed: left out
      os.makedirs(repo / os.path.dirname(name), exist_ok=True)
      os.link(os.path.join(REPO, name), repo / name)
  git = ["git", "-C", str(repo), "-c", "user.name=test", "-c", "user.email=test@example.com"]
  subprocess.run(git + ["init", "-q", "-b", "main"], check=True)
  subprocess.run(git + ["add", "-A"], check=True)
  subprocess.run(git + ["commit", "-q", "-m", "the tree under test"], check=True)
  return str(repo)


class FakeCloud:
  """launch/tpu.py run with tests/fake_gcloud.py as `gcloud` (one TPU VM, MAV_TPU_* set)."""

  def __init__(self, root, name: str, accelerator_type: str):
    self.root, self.name = str(root), name
    bin_dir = os.path.join(self.root, "bin")
    os.makedirs(bin_dir)
    with open(os.path.join(bin_dir, "gcloud"), "w") as f:
      f.write(f'#!/bin/sh\nexec {sys.executable} {REPO}/tests/fake_gcloud.py "$@"\n')
    os.chmod(os.path.join(bin_dir, "gcloud"), 0o755)
    # The workers' own environment (ssh does not carry ours): this machine has no package index,
    # and every JAX process of the suite compiles the same way, into one cache.
    with open(os.path.join(self.root, "worker_env.json"), "w") as f:
      json.dump(
        {
          **_SUBPROCESS_ENV,
          "XLA_FLAGS": TEST_XLA_FLAGS,
          "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
          "PIP_NO_INDEX": "1",
          "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        },
        f,
      )
    self.env = {k: v for k, v in os.environ.items() if k not in _MAV_VARS}
    self.env.update(
      PATH=f"{bin_dir}:{os.environ['PATH']}",
      FAKE_GCLOUD_ROOT=self.root,
      MAV_TPU_PROJECT="proj",
      MAV_TPU_ZONE="us-east5-a",
      MAV_TPU_NAME=name,
      MAV_TPU_TYPE=accelerator_type,
    )

  def launch(self, *argv, check=True, timeout=300) -> str:
    """Runs launch/tpu.py; returns its stdout and stderr together."""
    done = subprocess.run(
      [sys.executable, "launch/tpu.py", *argv],
      cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    out = done.stdout + done.stderr
    if check:
      assert done.returncode == 0, out
    self.returncode = done.returncode
    return out

  def home(self, i: int) -> str:
    return os.path.join(self.root, "workers", self.name, f"w{i}")

  def files(self, i: int):
    return worker.Files(os.path.join(self.home(i), "mav_jax_logs"))

  def log(self, i: int) -> str:
    with open(self.files(i).log, errors="replace") as f:
      return f.read()

  def steps(self, i: int) -> int:
    found = re.findall(r"^\[train\] step (\d+)/", self.log(i), re.M)
    return int(found[-1]) if found else 0

  def wait(self, condition, what: str, timeout: float = 240) -> float:
    start = time.monotonic()
    while not condition():
      assert time.monotonic() - start < timeout, f"{what}: not within {timeout} s\n" + "\n".join(
        self.log(i)[-3000:] for i in (0, 1)
      )
      time.sleep(0.2)
    return time.monotonic() - start

  def calls(self) -> list[list[str]]:
    with open(os.path.join(self.root, "calls.jsonl")) as f:
      return [json.loads(line) for line in f]

  def kill_runs(self):
    """Leaves no trainer behind (a failed test may)."""
    for logs in glob.glob(os.path.join(self.root, "workers", "*", "*", "mav_jax_logs")):
      pid = worker.running_pid(worker.Files(logs))
      if pid:
        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def make_cloud(tmp_path):
  clouds = []

  def make(name, accelerator_type="v5p-16"):
    clouds.append(FakeCloud(tmp_path / f"cloud_{name}", name, accelerator_type))
    return clouds[-1]

  yield make
  for cloud in clouds:
    cloud.kill_runs()


def _up(cloud, source_repo) -> None:
  """create -> (the pre-built venv on each worker) -> setup from the tree under test."""
  cloud.launch("create")
  for i in range(2):
    os.symlink(VENV, os.path.join(cloud.home(i), "mav_jax_venv"))
  out = cloud.launch("setup", "--source=git", f"--repo_url={source_repo}")
  commit = subprocess.run(
    ["git", "-C", source_repo, "log", "-1", "--format=%h"], capture_output=True, text=True
  ).stdout.strip()
  assert out.count(f": {commit} the tree under test") == 2, out  # each worker says what it has


def _train_flags(workdir, num_steps, launcher=(), trainer=()) -> list[str]:
  """`train` for the 2 simulated workers: a workdir both see, process 0's address (they are not
  TPU VMs, whose runtime finds the peers), a tiny decoder on 2 fake CPU devices each."""
  return [
    "--config=configs/decoder.py:tiny",
    f"--workdir={workdir}",
    "--shared_workdir",
    f"--coordinator_address=127.0.0.1:{local.free_port()}",
    *launcher,
    "--",
    "--cpu_devices=2",
    f"--heartbeat_timeout={HEARTBEAT}",
    *_flags(_SUBPROCESS_OVERRIDES),
    f"--config.train.num_steps={num_steps}",
    *trainer,
  ]


def _checkpoints(workdir) -> list[int]:
  """The complete checkpoints' steps (Orbax renames a step's folder to its number once written)."""
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def _lose(cloud, lost: int) -> str:
  """Kills process `lost`'s trainer; returns `status` once the other process has ended."""
  other = 1 - lost
  os.kill(worker.running_pid(cloud.files(lost)), signal.SIGKILL)
  noticed = cloud.wait(lambda: worker.running_pid(cloud.files(other)) is None, "the other", 600)
  print(f"process {other} ended {noticed:.1f} s after process {lost} was killed")
  assert noticed < 2 * HEARTBEAT + 30, noticed  # bounded: JAX's heartbeat timeout, and margin
  out = cloud.launch("status")
  assert f"t1v-n-mav-w-{lost}: ended by SIGKILL" in out, out
  # JAX aborts it (SIGABRT; once, tearing down after process 0 was lost, a SIGSEGV was seen).
  assert re.search(rf"t1v-n-mav-w-{other}: ended by SIG(ABRT|SEGV)", out), out
  return out


@pytest.mark.long
def test_life_of_a_run_on_two_workers(make_cloud, source_repo, tmp_path):
  """create -> setup -> train (2 processes, one JAX job) -> status -> a second train refused ->
  stop (both checkpoint, exit 0) -> train resumes -> one worker's trainer is killed: the other
  ends within the heartbeat timeout and `status` names the lost process -> train (attached,
  --foreground) resumes from the last complete checkpoint and finishes -> train, and
  process 0, which also hosts JAX's coordination service, is lost -> logs --fetch -> delete.
  (One test: each `train` here is two trainer starts, the suite's dearest step.)"""
  cloud = make_cloud("mav")
  _up(cloud, source_repo)
  workdir = tmp_path / "run"
  checkpoint_often = ["--config.train.checkpoint_every=2"]

  out = cloud.launch("train", *_train_flags(workdir, 10_000))
  assert out.count(": started (pid") == 2, out
  out = cloud.launch("status")
  assert "state: READY" in out and out.count(": running (pid") == 2, out
  pids = [worker.running_pid(cloud.files(i)) for i in (0, 1)]

  out = cloud.launch("train", *_train_flags(workdir, 10_000), check=False)  # refused: busy
  assert cloud.returncode == 1, out
  assert out.count(": a run is going (pid") == 2 and "error: nothing was started" in out, out
  assert [worker.running_pid(cloud.files(i)) for i in (0, 1)] == pids

  cloud.wait(lambda: min(cloud.steps(0), cloud.steps(1)) >= 3, "3 steps on both workers")
  out = cloud.launch("stop")
  stopped = re.findall(r"\[train\] preempted at step (\d+): checkpoint saved", out)
  assert out.count(": stopped (pid") == 2 and out.count("exited 0") == 2, out
  assert len(stopped) == 2 and stopped[0] == stopped[1], out  # both stopped at the same step
  step = int(stopped[0])
  assert _checkpoints(workdir)[-1] == step
  out = cloud.launch("stop")
  assert out.count(": no run to stop") == 2, out

  cloud.launch("train", *_train_flags(workdir, 10_000, trainer=checkpoint_often))
  cloud.wait(lambda: min(cloud.steps(0), cloud.steps(1)) >= step + 3, "3 more steps on both")
  for i in (0, 1):
    assert cloud.log(i).count(f"resumed at step {step}") == 1  # one JAX job: both resumed
  assert "process 1 of 2, 4 devices" in cloud.log(1)
  out = _lose(cloud, 1)
  assert "lost contact with process 1 (its heartbeats stopped" in out, out
  # The survivor's log says why it ended: its own error line when the failed collective reaches
  # Python first, or (when JAX's coordination service aborts it first: metrics are read only on
  # logging steps, so nothing may be waiting on the device) JAX's own line naming the lost process.
  survivor = cloud.log(0)
  assert "[train] error: process 0 of 2 stopped" in survivor or any(
    line.startswith("lost contact with process 1") for line in worker.diagnose(survivor.encode())
  ), survivor[-3000:]

  last = _checkpoints(workdir)[-1]
  out = cloud.launch("train", *_train_flags(workdir, last + 1, launcher=["--foreground"]))
  assert out.count(f"resumed at step {last}") == 2, out
  assert out.count(f"[train] finished at step {last + 1} (checkpoint saved)") == 2, out

  cloud.launch("train", *_train_flags(workdir, 10_000, trainer=checkpoint_often))
  cloud.wait(lambda: min(cloud.steps(0), cloud.steps(1)) > last + 2, "2 more steps on both")
  out = _lose(cloud, 0)
  assert "lost contact with the coordination service of process 0" in out, out

  out = cloud.launch("logs", f"--fetch={tmp_path / 'logs'}")
  for i in (0, 1):
    with open(tmp_path / "logs" / f"mav-worker{i}.log") as f:
      fetched = f.read()
    assert fetched == cloud.log(i) and fetched.startswith(f"[worker] t1v-n-mav-w-{i} ")
  out = cloud.launch("logs", "--lines=1")  # worker 0's last line
  assert out.strip().endswith(cloud.log(0).strip().splitlines()[-1])

  cloud.launch("delete")
  out = cloud.launch("status", check=False)
  assert cloud.returncode == 1 and "NOT_FOUND" in out
  verbs = [call[3] for call in cloud.calls()]
  assert verbs[:3] == ["create", "ssh", "ssh"] and verbs[-2:] == ["delete", "describe"]


def test_setup_copies_the_committed_tree_and_installs(make_cloud):
  """`setup` (default: git HEAD copied) gives every worker the committed tree and a venv."""
  cloud = make_cloud("copy")
  cloud.launch("create")
  for i in range(2):
    os.symlink(VENV, os.path.join(cloud.home(i), "mav_jax_venv"))
  out = cloud.launch("setup")
  assert re.findall(r"^0 1$", out, re.M) == ["0 1"] * 2, out  # jax imports: process 0, 1 device
  committed = subprocess.run(
    ["git", "ls-tree", "-r", "--name-only", "HEAD"], cwd=REPO, capture_output=True, text=True
  ).stdout.split()
  for i in range(2):
    copied = subprocess.run(
      ["find", ".", "-type", "f"], cwd=os.path.join(cloud.home(i), "mav_jax"),
      capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    assert sorted(p[2:] for p in copied) == sorted(committed)
  out = cloud.launch("status")  # set up, nothing run yet
  assert out.count(": no run started") == 2, out


def test_multi_host_multi_slice_commands(capsys):
  [create] = _commands(capsys, "create", *MULTI, "--runtime_version=v2-alpha-tpuv5")
  assert create == [
    "gcloud", "compute", "tpus", "queued-resources", "create", "mav-ms", "--zone=us-east5-a",
    "--project=proj", "--accelerator-type=v5p-128", "--runtime-version=v2-alpha-tpuv5",
    "--node-count=2", "--node-prefix=mav-ms",
  ]  # fmt: skip
  for cmd in _commands(capsys, "setup", *MULTI)[1:]:  # every worker of every slice
    assert cmd[3] == "queued-resources" and "--worker=all" in cmd and "--node=all" in cmd
  check, train = _commands(
    capsys, "train", *MULTI, "--config=configs/sr_low.py:paper", "--workdir=gs://b/sr"
  )
  for cmd in (check, train):
    assert "--worker=all" in cmd and "--node=all" in cmd
  assert check[-1].endswith("launch/worker.py check")
  remote = train[-1].removeprefix("--command=")
  assert "--multihost '--config.mesh.dcn=(2,1,1,1)'" in remote  # data parallel across the 2 slices
  fetch = _commands(capsys, "logs", *MULTI, "--fetch=logs")
  assert fetch[0] == ["mkdir", "-p", "logs"]
  # v5p-128: 64 chips, 16 hosts per slice; 2 slices.
  assert len(fetch) == 1 + 2 * 16
  assert fetch[-1][5:7] == ["mav-ms:~/mav_jax_logs/train.log", "logs/mav-ms-1-worker15.log"]
  assert fetch[-1][-2:] == ["--worker=15", "--node=1"]
  [delete] = _commands(capsys, "delete", *MULTI)
  assert delete[3:6] == ["queued-resources", "delete", "mav-ms"] and "--force" in delete


@pytest.mark.parametrize(
  "accelerator,hosts", [("v5p-8", 1), ("v5p-128", 16), ("v4-32", 4), ("v5litepod-8", 1),
                        ("v5litepod-16", 4), ("v6e-256", 64), ("v6e-4", 1)]
)  # fmt: skip
def test_workers_per_slice(accelerator, hosts):
  assert tpu.num_workers(accelerator) == hosts


W = ["--name=n", "--zone=z", "--project=p"]  # where


@pytest.mark.parametrize(
  "argv,message",
  [
    (["create", "--zone=z", "--project=p", "--accelerator_type=v5p-8"], "give --name (or set"),
    (["status", "--name=n", "--zone=z"], "give --project (or set"),
    (["create", *W, "--accelerator_type=v9-8"], "'v9-8' is not one of v4-N, v5p-N"),
    (["train", *W, "--config=c", "--workdir=/tmp/w"], "is not on GCS and the workers do not"),
    (["train", *W, "--accelerator_type=v5p-16", "--config=c", "--workdir=w"], "--shared_workdir"),
    (["train", *W, "--config=c", "--workdir=gs://b/w", "--coordinator_address=h:1"],
     "--coordinator_address needs --accelerator_type"),
    (["logs", *W, "--fetch=d"], "--fetch needs --accelerator_type"),
    (["setup", *W, "--source=git"], "--source=git needs --repo_url"),
  ],
)  # fmt: skip
def test_errors_name_the_fix_and_run_nothing(argv, message, capsys):
  for var in _MAV_VARS:
    os.environ.pop(var, None)
  with pytest.raises(SystemExit) as exit_info:
    tpu.main([argv[0], "--dry_run", *argv[1:]])
  assert exit_info.value.code == 1
  captured = capsys.readouterr()
  assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
  assert message in captured.err and "+ " not in captured.out


def test_a_one_host_slice_may_use_a_local_workdir(capsys):
  _, start = _commands(capsys, "train", *W, "--accelerator_type=v5p-8", "--config=c", "--workdir=w")
  assert "--workdir=w --multihost" in start[-1]


def test_help_of_every_script_and_subcommand():
  for argv in (["launch/tpu.py"], ["launch/local.py"], ["launch/worker.py"]) + tuple(
    ["launch/tpu.py", name] for name in tpu.SUBCOMMANDS
  ):
    out = subprocess.run(
      [sys.executable, *argv, "--help"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert "--dry_run" in out or argv[0] == "launch/worker.py", argv
    assert "usage:" in out


_TWO_HOSTS_JOB = """
import argparse, os
p = argparse.ArgumentParser()
for name in ("coordinator_address", "num_processes", "process_id", "cpu_devices"):
  p.add_argument("--" + name)
a = p.parse_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={a.cpu_devices}"
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(a.coordinator_address, int(a.num_processes), int(a.process_id))
mesh = jax.make_mesh((jax.device_count(),), ("d",))
sharding = jax.NamedSharding(mesh, jax.P("d"))
local = np.full((len(jax.local_devices()),), jax.process_index() + 1.0, np.float32)
x = jax.make_array_from_process_local_data(sharding, local)
print("devices", jax.device_count(), "sum", float(jax.jit(jnp.sum)(x)), flush=True)
"""


def test_local_runner_joins_its_processes_into_one_jax_job(tmp_path):
  """launch/local.py starts N processes with the flags that join them (process 0's address, the
  count, each index, fake devices) and prefixes their output; here 2 x 2 devices sum one array."""
  (tmp_path / "two_hosts_job.py").write_text(_TWO_HOSTS_JOB)
  done = subprocess.run(
    [sys.executable, "launch/local.py", "--num_processes=2", "--cpu_devices=2"]
    + ["--module=two_hosts_job"],
    cwd=REPO, env={**os.environ, "PYTHONPATH": str(tmp_path)},
    capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert done.returncode == 0, done.stdout + done.stderr
  for i in (0, 1):  # 2 devices holding 1.0 (process 0) and 2 holding 2.0 (process 1)
    assert f"[process {i}] devices 4 sum 6.0" in done.stdout, done.stdout


def test_local_runner_stops_the_others_when_one_fails(tmp_path):
  code = local.run(
    [
      [sys.executable, "-c", "import sys; sys.exit(3)"],
      [sys.executable, "-c", "import time; time.sleep(60)"],
    ],
    out=open(tmp_path / "log", "w"),
  )
  assert code == 3
  assert "process 0 exited with 3: stopping the others" in (tmp_path / "log").read_text()
