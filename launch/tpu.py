#!/usr/bin/env python3
r"""Cloud TPU launcher: create a TPU VM or queued resource (multi-slice too), put the code and its
requirements on every worker, start `mav_jax.train` on all workers, follow logs, check, stop, delete.

Every subcommand prints the gcloud commands it runs ("+ gcloud ..."); with --dry_run it prints them
and runs nothing. Only the Python standard library and the gcloud CLI are needed on your machine.

  export MAV_TPU_PROJECT=my-project MAV_TPU_ZONE=us-east5-a MAV_TPU_NAME=mav-decoder
  python launch/tpu.py create --accelerator_type v5p-128 --queued --spot
  python launch/tpu.py setup                       # copy this checkout (git HEAD) + pip install
  python launch/tpu.py train --config configs/decoder.py:paper --workdir gs://BUCKET/decoder \
      -- --config.train.num_steps=200000          # anything after -- goes to mav_jax.train
  python launch/tpu.py logs --follow               # worker 0; --fetch DIR copies every worker's
  python launch/tpu.py status                      # per worker: running, finished, failed (why)
  python launch/tpu.py stop                        # SIGTERM: every worker checkpoints and exits
  python launch/tpu.py delete

On each worker, `train`, `status` and `stop` run launch/worker.py (shipped by `setup`): it starts the
trainer detached and knows it by a PID file, so a second `train` is refused while a run is going and
`stop` signals exactly the trainers. Multi-slice: `create --num_slices 2` asks for a queued resource
of two slices (nodes NAME-0, NAME-1); `train` then runs on every worker of every slice and sets the
mesh's cross-slice (dcn) axis. Run `python launch/tpu.py SUBCOMMAND --help` for each subcommand's
options.
"""

import argparse
import concurrent.futures
import dataclasses
import functools
import os
import re
import shlex
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR = "~/mav_jax"  # the code on each worker
REMOTE_VENV = "~/mav_jax_venv"
REMOTE_LOG = "~/mav_jax_logs/train.log"
# Default TPU VM images per generation (Cloud TPU docs, "TPU software versions").
RUNTIME_VERSIONS = {
  "v4": "tpu-ubuntu2204-base",
  "v5litepod": "v2-alpha-tpuv5-lite",
  "v5p": "v2-alpha-tpuv5",
  "v6e": "v2-alpha-tpuv6e",
}
_ACCELERATOR = re.compile(r"^(v4|v5p|v5litepod|v5e|v6e)-(\d+)$")


class LaunchError(Exception):
  """A problem with the arguments, said so the user can fix it."""


@dataclasses.dataclass
class Step:
  """One step of a subcommand: a command, or several run at once (one per worker).

  `error` is said when it fails; `note` is printed before it runs."""

  commands: list[str] | list[list[str]]
  error: str = ""
  note: str | None = None

  def __post_init__(self):
    if self.commands and isinstance(self.commands[0], str):
      self.commands = [self.commands]


def parse_accelerator(accelerator_type: str) -> tuple[str, int]:
  """ "v5p-128" -> ("v5p", 128); v5e-N is spelled v5litepod-N by gcloud."""
  match = _ACCELERATOR.match(accelerator_type or "")
  if not match:
    raise LaunchError(
      f"accelerator type {accelerator_type!r} is not one of v4-N, v5p-N, v5litepod-N (v5e), "
      f"v6e-N (e.g. v5p-128, v6e-256, v5litepod-16)"
    )
  generation = "v5litepod" if match[1] == "v5e" else match[1]
  return generation, int(match[2])


def num_workers(accelerator_type: str) -> int:
  """TPU VM hosts in one slice of `accelerator_type`.

  v4 and v5p count TensorCores (2 per chip, 4 chips per host); v5e and v6e count chips (a slice of
  up to 8 chips is one host, larger slices have 4 chips per host).
  """
  generation, n = parse_accelerator(accelerator_type)
  if generation in ("v4", "v5p"):
    return max(1, n // 8)
  return 1 if n <= 8 else n // 4


# ---------------------------------------------------------------------------------------------
# The resource and how to reach its workers.
# ---------------------------------------------------------------------------------------------


class Resource:
  """A TPU VM (one slice, created directly) or a queued resource (one or more slices)."""

  def __init__(self, args):
    self.name = args.name
    self.zone = args.zone
    self.project = args.project
    self.num_slices = args.num_slices
    self.queued = args.queued or args.num_slices > 1
    missing = [f"--{k}" for k in ("project", "zone", "name") if not getattr(args, k)]
    if missing:
      raise LaunchError(
        f"give {', '.join(missing)} (or set MAV_TPU_PROJECT, MAV_TPU_ZONE, MAV_TPU_NAME)"
      )
    if args.accelerator_type:
      parse_accelerator(args.accelerator_type)  # a typo is named before anything runs

  def _where(self) -> list[str]:
    return [f"--zone={self.zone}", f"--project={self.project}"]

  def group(self) -> list[str]:
    return ["gcloud", "compute", "tpus"] + (["queued-resources"] if self.queued else ["tpu-vm"])

  def node_names(self) -> list[str]:
    if self.num_slices > 1:
      return [f"{self.name}-{i}" for i in range(self.num_slices)]
    return [self.name]

  def create(self, accelerator_type, runtime_version, spot, extra) -> list[str]:
    cmd = self.group() + ["create", self.name] + self._where()
    cmd += [f"--accelerator-type={accelerator_type}"]
    cmd += [
      f"--runtime-version={runtime_version}" if self.queued else f"--version={runtime_version}"
    ]
    if self.queued:
      if self.num_slices > 1:
        cmd += [f"--node-count={self.num_slices}", f"--node-prefix={self.name}"]
      else:
        cmd += [f"--node-id={self.name}"]
    if spot:
      cmd.append("--spot")
    return cmd + list(extra)

  def _hosts(self, worker: str, node: str) -> list[str]:
    """Which workers (and, for queued resources, which slices) a command reaches."""
    return [f"--worker={worker}"] + ([f"--node={node}"] if self.queued else [])

  def ssh(self, command: str, worker: str = "all", node: str = "all") -> list[str]:
    where = self._where() + self._hosts(worker, node)
    return self.group() + ["ssh", self.name] + where + [f"--command={command}"]

  def ssh_one(self, node: int, worker: int):
    """ssh to one worker of one slice: a function of the command."""
    return functools.partial(self.ssh, worker=str(worker), node=str(node))

  def scp(self, source: str, dest: str, worker: str = "all", node: str = "all") -> list[str]:
    return self.group() + ["scp", source, dest] + self._where() + self._hosts(worker, node)

  def describe(self) -> list[str]:
    return self.group() + ["describe", self.name] + self._where()

  def delete(self) -> list[str]:
    cmd = self.group() + ["delete", self.name] + self._where() + ["--quiet"]
    if self.queued:
      cmd.append("--force")  # also deletes the TPU VMs it made
    return cmd


# ---------------------------------------------------------------------------------------------
# Subcommands: each returns its steps (the commands to run).
# ---------------------------------------------------------------------------------------------


def cmd_create(args, res: Resource) -> list[Step]:
  if not args.accelerator_type:
    raise LaunchError("create needs --accelerator_type (e.g. v5p-128, v6e-256)")
  generation, _ = parse_accelerator(args.accelerator_type)
  accelerator = args.accelerator_type.replace("v5e-", "v5litepod-")
  version = args.runtime_version or RUNTIME_VERSIONS[generation]
  return [Step(res.create(accelerator, version, args.spot, args.create_flag))]


def _requirements_line() -> str:
  # An existing venv is kept (re-running setup updates the code and the pinned packages only).
  return (
    f"cd {REMOTE_DIR} && (test -x {REMOTE_VENV}/bin/python || python3 -m venv {REMOTE_VENV}) && "
    f"{REMOTE_VENV}/bin/pip install -q --upgrade pip && "
    f"{REMOTE_VENV}/bin/pip install -q -r requirements.txt -r requirements-tpu.txt && "
    f"{REMOTE_VENV}/bin/python -c 'import jax; print(jax.process_index(), jax.device_count())'"
  )


def _uncommitted_note() -> str | None:
  """A note if the checkout has changes that `git archive HEAD` leaves out."""
  try:
    changed = subprocess.run(
      ["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
      capture_output=True,
      text=True,
      check=True,
    ).stdout.splitlines()
  except (OSError, subprocess.CalledProcessError):
    return None
  if not changed:
    return None
  return (
    f"note: {len(changed)} changed file(s) are not committed and stay behind (setup copies git "
    f"HEAD): {', '.join(line[3:] for line in changed[:5])}{' ...' if len(changed) > 5 else ''}"
  )


def cmd_setup(args, res: Resource) -> list[Step]:
  steps = []
  if args.source == "copy":
    archive = os.path.join(tempfile.gettempdir(), f"mav_jax_{res.name}.tar.gz")
    # The committed tree (git HEAD): what every worker runs is a known commit.
    steps.append(
      Step(
        ["git", "-C", REPO, "archive", "--format=tar.gz", f"--output={archive}", "HEAD"],
        note=_uncommitted_note(),
      )
    )
    steps.append(Step(res.scp(archive, f"{res.name}:~/mav_jax.tar.gz")))
    unpack = (
      f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && tar -xzf ~/mav_jax.tar.gz -C {REMOTE_DIR}"
    )
    steps.append(Step(res.ssh(unpack)))
  else:
    if not args.repo_url:
      raise LaunchError("--source=git needs --repo_url (and optionally --ref)")
    # A fresh clone unless ~/mav_jax is one already; then the ref as fetched now (a branch's
    # latest commit, not a stale local branch), detached.
    clone = (
      f"(test -d {REMOTE_DIR}/.git || (rm -rf {REMOTE_DIR} && "
      f"git clone -q {shlex.quote(args.repo_url)} {REMOTE_DIR})) && "
      f"git -C {REMOTE_DIR} remote set-url origin {shlex.quote(args.repo_url)} && "
      f"git -C {REMOTE_DIR} fetch -q origin {shlex.quote(args.ref)} && "
      f"git -C {REMOTE_DIR} checkout -q --detach FETCH_HEAD && "
      f"echo \"$(hostname): $(git -C {REMOTE_DIR} log -1 --format='%h %s')\""
    )
    steps.append(Step(res.ssh(clone)))
  steps.append(Step(res.ssh(_requirements_line())))
  return steps


def _worker(action: str) -> str:
  """The shell line that runs launch/worker.py ACTION on a worker."""
  return (
    f"cd {REMOTE_DIR} 2>/dev/null && test -f launch/worker.py -a -x {REMOTE_VENV}/bin/python || "
    f'{{ echo "$(hostname): no code (or an older one) in {REMOTE_DIR}, or no {REMOTE_VENV}: run '
    f"'launch/tpu.py setup'\"; exit 1; }}; {REMOTE_VENV}/bin/python launch/worker.py {action}"
  )


def _hosts_per_slice(args) -> int | None:
  return num_workers(args.accelerator_type) if args.accelerator_type else None


def train_args(args, res: Resource, process_id: int | None = None) -> list[str]:
  """The interpreter's arguments on one worker (`process_id`: its index when the launcher names
  the coordinator itself; None: every worker finds its peers through the TPU runtime)."""
  overrides = list(args.overrides)
  if res.num_slices > 1 and not any(o.startswith("--config.mesh.dcn") for o in overrides):
    overrides.append(f"--config.mesh.dcn=({res.num_slices},1,1,1)")  # data parallel across slices
  if process_id is None:
    join = ["--multihost"]
  else:
    join = [
      f"--coordinator_address={args.coordinator_address}",
      f"--num_processes={_hosts_per_slice(args) * res.num_slices}",
      f"--process_id={process_id}",
    ]
  return ["-m", "mav_jax.train", f"--config={args.config}", f"--workdir={args.workdir}", *join,
          *overrides]  # fmt: skip


def cmd_train(args, res: Resource) -> list[Step]:
  if not args.config or not args.workdir:
    raise LaunchError("train needs --config (e.g. configs/decoder.py:paper) and --workdir")
  hosts = _hosts_per_slice(args)
  one_host = hosts == 1 and res.num_slices == 1
  if not args.workdir.startswith("gs://") and not (args.shared_workdir or one_host):
    raise LaunchError(
      f"--workdir {args.workdir!r} is not on GCS and the workers do not share a disk: use "
      f"gs://BUCKET/PATH, or --shared_workdir if every worker sees that path as the same folder "
      f"(an NFS / Filestore mount)"
    )
  if args.coordinator_address and not hosts:
    raise LaunchError("--coordinator_address needs --accelerator_type (to count the processes)")
  # The workers are checked first, so that a run going on some of them stops the launch before
  # any other starts (a half-started job would wait for its missing processes).
  check = Step(
    res.ssh(_worker("check")),
    error="nothing was started: a run is going on the worker(s) above (`launch/tpu.py stop` it, or "
    "wait for it to end: `launch/tpu.py status`), or they are not set up (`launch/tpu.py setup`)",
  )
  if args.coordinator_address:  # one command per worker, each with its process index
    workers = [(n, w) for n in range(res.num_slices) for w in range(hosts)]
    per_worker = [
      (res.ssh_one(n, w), train_args(args, res, process_id=n * hosts + w)) for n, w in workers
    ]
  else:
    per_worker = [(res.ssh, train_args(args, res))]
  if args.foreground:  # attached: every worker's output streams here until the run ends
    line = f"cd {REMOTE_DIR} && PYTHONUNBUFFERED=1 {REMOTE_VENV}/bin/python "
    start = Step([ssh(line + shlex.join(a)) for ssh, a in per_worker])
  else:
    start = Step(
      [ssh(_worker("start -- " + shlex.join(a))) for ssh, a in per_worker],
      error="the run did not start on the worker(s) above (their log lines are printed); "
      "`launch/tpu.py stop` the others before trying again",
    )
  return [check, start]


def cmd_logs(args, res: Resource) -> list[Step]:
  if args.fetch:
    if not args.accelerator_type:
      raise LaunchError("--fetch needs --accelerator_type to know how many workers there are")
    steps = [Step(["mkdir", "-p", args.fetch])]
    for node_index, node in enumerate(res.node_names()):
      for worker in range(num_workers(args.accelerator_type)):
        local = os.path.join(args.fetch, f"{node}-worker{worker}.log")
        steps.append(
          Step(res.scp(f"{res.name}:{REMOTE_LOG}", local, worker=str(worker), node=str(node_index)))
        )
    return steps
  tail = f"tail -n {args.lines}" + (" -F" if args.follow else "")
  return [Step(res.ssh(f"{tail} {REMOTE_LOG}", worker=args.worker, node=args.node))]


def cmd_status(args, res: Resource) -> list[Step]:
  return [Step(res.describe()), Step(res.ssh(_worker("status")))]


def cmd_stop(args, res: Resource) -> list[Step]:
  # SIGTERM to each worker's trainer (by its PID file): it saves a checkpoint and exits 0; with
  # several hosts, JAX's preemption service makes them agree on the step to stop at.
  return [
    Step(
      res.ssh(_worker("stop")),
      error="the run did not stop cleanly on the worker(s) above",
    )
  ]


def cmd_delete(args, res: Resource) -> list[Step]:
  return [Step(res.delete())]


SUBCOMMANDS = {
  "create": (cmd_create, "create the TPU VM or queued resource"),
  "setup": (cmd_setup, "put the code on every worker and install the requirements"),
  "train": (cmd_train, "start mav_jax.train on every worker"),
  "logs": (cmd_logs, "show, follow or fetch the training log"),
  "status": (cmd_status, "the resource's state and whether the run is going"),
  "stop": (cmd_stop, "stop the run on every worker (SIGTERM: it checkpoints first)"),
  "delete": (cmd_delete, "delete the resource"),
}


def build_parser() -> argparse.ArgumentParser:
  env = os.environ.get
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument(
    "--name", default=env("MAV_TPU_NAME"), help="TPU / queued resource name ($MAV_TPU_NAME)"
  )
  common.add_argument(
    "--zone", default=env("MAV_TPU_ZONE"), help="zone, e.g. us-east5-a ($MAV_TPU_ZONE)"
  )
  common.add_argument(
    "--project",
    default=env("MAV_TPU_PROJECT"),
    help="GCP project ($MAV_TPU_PROJECT)",
  )
  common.add_argument(
    "--accelerator_type",
    default=env("MAV_TPU_TYPE"),
    help="e.g. v5p-128, v6e-256, v5litepod-16 ($MAV_TPU_TYPE)",
  )
  common.add_argument(
    "--num_slices",
    type=int,
    default=int(env("MAV_TPU_SLICES", "1")),
    help="slices (> 1: multi-slice, a queued resource) ($MAV_TPU_SLICES)",
  )
  common.add_argument(
    "--queued",
    action="store_true",
    default=env("MAV_TPU_QUEUED") == "1",
    help="use a queued resource ($MAV_TPU_QUEUED=1)",
  )
  common.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")

  parser = argparse.ArgumentParser(
    prog="launch/tpu.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  sub = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
  parsers = {
    name: sub.add_parser(name, parents=[common], help=text, description=text)
    for name, (_, text) in SUBCOMMANDS.items()
  }
  p = parsers["create"]
  p.add_argument(
    "--runtime_version",
    help="TPU VM image (default per generation: "
    + ", ".join(f"{k}: {v}" for k, v in RUNTIME_VERSIONS.items())
    + ")",
  )
  p.add_argument(
    "--spot", action="store_true", help="Spot capacity (preemptible; the trainer resumes)"
  )
  p.add_argument(
    "--create_flag",
    action="append",
    default=[],
    help="extra flag for gcloud's create, e.g. --create_flag=--reserved (repeatable)",
  )
  p = parsers["setup"]
  p.add_argument(
    "--source",
    choices=("copy", "git"),
    default="copy",
    help="copy this checkout's git HEAD, or git clone on each worker",
  )
  p.add_argument("--repo_url", help="repository to clone (--source=git)")
  p.add_argument("--ref", default="main", help="branch, tag or commit to check out (--source=git)")
  p = parsers["train"]
  p.add_argument("--config", help="stage config, e.g. configs/decoder.py:paper")
  p.add_argument(
    "--workdir", help="run folder on GCS (gs://BUCKET/PATH): checkpoints, logs, samples"
  )
  p.add_argument(
    "--foreground", action="store_true", help="stay attached and stream every worker's output"
  )
  p.add_argument(
    "--shared_workdir",
    action="store_true",
    help="the (non-GCS) workdir is one folder that every worker sees, e.g. an NFS / Filestore "
    "mount (a one-host slice needs no flag)",
  )
  p.add_argument(
    "--coordinator_address",
    metavar="HOST:PORT",
    help="name process 0's address and give each worker its process index (needs "
    "--accelerator_type), for workers whose runtime does not find its peers itself; on TPU VMs "
    "leave it out (the TPU runtime finds them)",
  )
  p.add_argument(
    "overrides", nargs="*", help="after --: flags for mav_jax.train, e.g. --config.batch_size=512"
  )
  p = parsers["logs"]
  p.add_argument("--follow", action="store_true", help="keep following (tail -F)")
  p.add_argument("--lines", type=int, default=100, help="lines to show")
  p.add_argument("--worker", default="0", help="worker index or 'all'")
  p.add_argument("--node", default="0", help="slice (node) index or 'all' (multi-slice)")
  p.add_argument("--fetch", metavar="DIR", help="copy every worker's log into DIR instead")
  return parser


def run(steps: list[Step], dry_run: bool) -> int:
  """Runs the steps in order (the commands of one step at once); stops at the first failure."""
  for step in steps:
    if step.note:
      print(step.note, file=sys.stderr, flush=True)
    for cmd in step.commands:
      print("+ " + shlex.join(cmd), flush=True)
    if dry_run:
      continue
    try:
      with concurrent.futures.ThreadPoolExecutor(len(step.commands)) as pool:
        codes = list(pool.map(subprocess.call, step.commands))
    except FileNotFoundError as e:
      print(
        f"error: {e.filename} is not installed (https://cloud.google.com/sdk/docs/install)",
        file=sys.stderr,
      )
      return 1
    code = next((c for c in codes if c), 0)
    if code:
      print(
        f"error: {step.error or f'the command above exited with {code}'}",
        file=sys.stderr,
        flush=True,
      )
      return 1
  return 0


def main(argv=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    if args.num_slices < 1:
      raise LaunchError(f"--num_slices must be >= 1, got {args.num_slices}")
    resource = Resource(args)
    steps = SUBCOMMANDS[args.subcommand][0](args, resource)
  except LaunchError as e:
    parser.exit(1, f"error: {e}\n")
  return run(steps, args.dry_run)


if __name__ == "__main__":
  sys.exit(main())
