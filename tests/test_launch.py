"""launch/: the Cloud TPU launcher's gcloud commands (dry runs, single host and multi-slice), its
errors, and the local multi-host runner training a tiny stage with two processes."""

import importlib.util
import os
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
  spec = importlib.util.spec_from_file_location(
    f"launch_{name}", os.path.join(REPO, "launch", f"{name}.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


tpu = _load("tpu")
local = _load("local")

SINGLE = ["--name=mav-1", "--zone=us-east5-a", "--project=proj", "--accelerator_type=v5p-8"]
MULTI = [
  "--name=mav-ms",
  "--zone=us-east5-a",
  "--project=proj",
  "--accelerator_type=v5p-128",
  "--num_slices=2",
]


def _commands(capsys, *argv) -> list[list[str]]:
  """The commands a dry run prints (each '+ ' line, split like a shell would)."""
  for var in ("MAV_TPU_NAME", "MAV_TPU_ZONE", "MAV_TPU_PROJECT", "MAV_TPU_TYPE", "MAV_TPU_SLICES"):
    os.environ.pop(var, None)
  assert tpu.main([argv[0], "--dry_run", *argv[1:]]) == 0  # before any "--"
  out = capsys.readouterr().out
  return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


def test_single_host_commands(capsys):
  [create] = _commands(capsys, "create", *SINGLE, "--spot")
  assert create == [
    "gcloud", "compute", "tpus", "tpu-vm", "create", "mav-1", "--zone=us-east5-a",
    "--project=proj", "--accelerator-type=v5p-8", "--version=v2-alpha-tpuv5", "--spot",
  ]  # fmt: skip
  archive, copy, unpack, install = _commands(capsys, "setup", *SINGLE)
  assert archive[:3] == ["git", "-C", REPO] and archive[-1] == "HEAD"
  assert copy[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert copy[6] == "mav-1:~/mav_jax.tar.gz" and "--worker=all" in copy
  assert unpack[4:6] == ["ssh", "mav-1"] and "--worker=all" in unpack
  assert "pip install -q -r requirements.txt -r requirements-tpu.txt" in install[-1]
  [train] = _commands(
    capsys, "train", *SINGLE, "--config=configs/decoder.py:paper", "--workdir=gs://b/run",
    "--", "--config.batch_size=64",
  )  # fmt: skip
  assert train[:9] == [
    "gcloud", "compute", "tpus", "tpu-vm", "ssh", "mav-1", "--zone=us-east5-a", "--project=proj",
    "--worker=all",
  ]  # fmt: skip
  remote = train[9].removeprefix("--command=")
  assert (
    "~/mav_jax_venv/bin/python -m mav_jax.train --config=configs/decoder.py:paper "
    "--workdir=gs://b/run --multihost --config.batch_size=64 > ~/mav_jax_logs/train.log" in remote
  )
  assert "setsid nohup" in remote and "mesh.dcn" not in remote
  [logs] = _commands(capsys, "logs", *SINGLE, "--follow")
  assert logs[-2:] == ["--worker=0", "--command=tail -n 100 -F ~/mav_jax_logs/train.log"]
  describe, check = _commands(capsys, "status", *SINGLE)
  assert describe[4:6] == ["describe", "mav-1"] and "pgrep" in check[-1]
  [delete] = _commands(capsys, "delete", *SINGLE)
  assert delete == [
    "gcloud", "compute", "tpus", "tpu-vm", "delete", "mav-1", "--zone=us-east5-a",
    "--project=proj", "--quiet",
  ]  # fmt: skip


def test_multi_host_multi_slice_commands(capsys):
  [create] = _commands(capsys, "create", *MULTI, "--runtime_version=v2-alpha-tpuv5")
  assert create == [
    "gcloud", "compute", "tpus", "queued-resources", "create", "mav-ms", "--zone=us-east5-a",
    "--project=proj", "--accelerator-type=v5p-128", "--runtime-version=v2-alpha-tpuv5",
    "--node-count=2", "--node-prefix=mav-ms",
  ]  # fmt: skip
  for cmd in _commands(capsys, "setup", *MULTI)[1:]:  # every worker of every slice
    assert cmd[3] == "queued-resources" and "--worker=all" in cmd and "--node=all" in cmd
  [train] = _commands(
    capsys, "train", *MULTI, "--config=configs/sr_low.py:paper", "--workdir=gs://b/sr"
  )
  assert "--worker=all" in train and "--node=all" in train
  remote = train[-1].removeprefix("--command=")
  assert "--multihost '--config.mesh.dcn=(2,1,1)'" in remote  # data parallel across the 2 slices
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


@pytest.mark.parametrize(
  "argv,message",
  [
    (["create", "--zone=z", "--accelerator_type=v5p-8"], "give --name and --zone"),
    (["create", "--name=n", "--zone=z", "--accelerator_type=v9-8"], "is not one of"),
    (["train", "--name=n", "--zone=z", "--config=c", "--workdir=/tmp/w"], "is not on GCS"),
    (["logs", "--name=n", "--zone=z", "--fetch=d"], "--fetch needs --accelerator_type"),
    (["setup", "--name=n", "--zone=z", "--source=git"], "--source=git needs --repo_url"),
  ],
)
def test_errors_name_the_fix_and_run_nothing(argv, message, capsys):
  for var in ("MAV_TPU_NAME", "MAV_TPU_ZONE"):
    os.environ.pop(var, None)
  with pytest.raises(SystemExit) as exit_info:
    tpu.main([argv[0], "--dry_run", *argv[1:]])
  assert exit_info.value.code == 2
  captured = capsys.readouterr()
  assert message in captured.err and "+ " not in captured.out


def test_help_of_every_script_and_subcommand():
  for argv in (["launch/tpu.py"], ["launch/local.py"]) + tuple(
    ["launch/tpu.py", name] for name in tpu.SUBCOMMANDS
  ):
    out = subprocess.run(
      [sys.executable, *argv, "--help"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert "--dry_run" in out, argv


def test_local_runner_trains_a_tiny_stage_with_two_processes(tmp_path):
  """Two processes of 4 fake devices train, checkpoint and resume together."""
  from test_train import _SUBPROCESS_ENV, _SUBPROCESS_OVERRIDES, _flags

  def run(num_steps):
    args = [
      "--num_processes=2",
      "--cpu_devices=4",
      "--",
      "--config=configs/decoder.py:tiny",
      f"--workdir={tmp_path}",
      *_flags(_SUBPROCESS_OVERRIDES),
      f"--config.train.num_steps={num_steps}",
    ]
    done = subprocess.run(
      [sys.executable, "launch/local.py", *args],
      cwd=REPO,
      env={**os.environ, **_SUBPROCESS_ENV},
      capture_output=True,
      text=True,
      timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout

  out = run(2)
  assert "[process 0] [train] decoder (tiny, video)" in out
  assert "[process 1] [train] decoder (tiny, video)" in out
  assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1}" in out
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
  out = run(4)
  assert "[process 0]" in out and out.count("resumed at step 2") == 2
  assert "4" in os.listdir(tmp_path / "checkpoints")


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
