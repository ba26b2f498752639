#!/usr/bin/env python3
"""A stand-in for the `gcloud compute tpus` commands launch/tpu.py runs, for tests: the TPU VMs are
folders on this machine and their commands really run.

- Every call is appended to $FAKE_GCLOUD_ROOT/calls.jsonl (its argv).
- `tpu-vm create` / `queued-resources create` make the resource (state READY / ACTIVE) and a home
  folder per worker of each slice: workers/<node>/w<i> (v4 and v5p-N: N/8 workers; v5e and v6e-N:
  one up to 8 chips, N/4 above). `describe` answers in gcloud's YAML; `delete` removes the
  resource and its workers' disks (queued resources only with --force, as gcloud).
- `ssh NAME --worker=all|I [--node=all|J] --command=CMD` runs CMD with `bash -c` once per selected
  worker, all at once, as an ssh login would: HOME is the worker's folder, the environment is a
  bare one (PATH=/usr/local/bin:/usr/bin:/bin, plus $FAKE_GCLOUD_ROOT/worker_env.json), the
  hostname is the worker's own (a UTS namespace: t1v-n-NAME-w-I, or NAME-J-w-I for slice J of a
  queued resource) and resolves (a mount namespace whose /etc/hosts names it), and when the command returns its session's processes get SIGHUP, as when sshd
  closes a session. The exit code is the first non-zero one.
- `scp SRC NAME:PATH` copies a local file into each selected worker; `scp NAME:PATH DEST` copies
  one worker's file here.
Anything else is refused with exit 2.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

ROOT = os.environ["FAKE_GCLOUD_ROOT"]
STATE = os.path.join(ROOT, "state.json")


def workers_per_slice(accelerator_type: str) -> int:
  generation, n = accelerator_type.rsplit("-", 1)
  if generation in ("v4", "v5p"):
    return max(1, int(n) // 8)
  return 1 if int(n) <= 8 else int(n) // 4


def _load() -> dict:
  try:
    return json.load(open(STATE))
  except FileNotFoundError:
    return {}


def _save(state: dict) -> None:
  json.dump(state, open(STATE, "w"), indent=1)


def _fail(message: str, code: int = 1) -> int:
  print(f"ERROR: (gcloud) {message}", file=sys.stderr)
  return code


def _split(args: list[str]) -> tuple[list[str], dict[str, str]]:
  positional, flags = [], {}
  for a in args:
    if a.startswith("--"):
      key, _, value = a[2:].partition("=")
      flags[key] = value
    else:
      positional.append(a)
  return positional, flags


def _home(node: str, worker: int) -> str:
  return os.path.join(ROOT, "workers", node, f"w{worker}")


def _select(resource: dict, flags: dict, queued: bool) -> list[tuple[str, int]]:
  nodes = resource["nodes"]
  if queued and flags.get("node", "all") != "all":
    nodes = [nodes[int(flags["node"])]]
  worker = flags.get("worker", "0")
  selected = []
  for node in nodes:
    for i in range(resource["workers"]):
      if worker == "all" or int(worker) == i:
        selected.append((node, i))
  if not selected:
    raise IndexError(f"no worker {worker} (the slice has {resource['workers']})")
  return selected


def _hostname(resource_name: str, node: str, worker: int, queued: bool) -> str:
  return f"{node}-w-{worker}" if queued else f"t1v-n-{resource_name}-w-{worker}"


def _ssh(resource: dict, name: str, flags: dict, queued: bool) -> int:
  command = flags["command"]
  env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "USER": "tpu"}
  extra = os.path.join(ROOT, "worker_env.json")
  if os.path.exists(extra):
    env.update(json.load(open(extra)))
  procs = []
  for node, i in _select(resource, flags, queued):
    host = _hostname(name, node, i, queued)
    hosts = os.path.join(ROOT, "workers", node, f"w{i}.hosts")  # the VM's /etc/hosts
    with open(hosts, "w") as f:
      f.write(f"127.0.0.1 localhost\n127.0.0.1 {host}\n")
    # Its own hostname (a UTS namespace) that resolves (a mount namespace with its /etc/hosts).
    boot = 'hostname "$1" && mount --bind "$2" /etc/hosts && exec bash -c "$3"'
    procs.append(
      subprocess.Popen(
        ["unshare", "--uts", "--mount", "--", "bash", "-c", boot, "sh", host, hosts, command],
        cwd=_home(node, i),
        env={**env, "HOME": _home(node, i)},
        start_new_session=True,  # a session per ssh login
      )
    )
  codes = [p.wait() for p in procs]
  for p in procs:  # sshd closes the session: what is left in it gets SIGHUP
    try:
      os.killpg(p.pid, signal.SIGHUP)
    except ProcessLookupError:
      pass
  return next((c for c in codes if c), 0)


def _scp(resource: dict, name: str, src: str, dest: str, flags: dict, queued: bool) -> int:
  def remote(path: str, node: str, i: int) -> str:
    path = path.split(":", 1)[1]
    return os.path.join(_home(node, i), path[2:] if path.startswith("~/") else path)

  selected = _select(resource, flags, queued)
  if dest.startswith(f"{name}:"):
    for node, i in selected:
      shutil.copy(src, remote(dest, node, i))
    return 0
  if src.startswith(f"{name}:"):
    if len(selected) != 1:
      return _fail("copying from workers needs one --worker")
    node, i = selected[0]
    if not os.path.exists(remote(src, node, i)):
      return _fail(f"scp: {src}: No such file or directory")
    shutil.copy(remote(src, node, i), dest)
    return 0
  return _fail(f"scp: neither {src} nor {dest} is on {name}")


def main(argv: list[str]) -> int:
  os.makedirs(ROOT, exist_ok=True)
  with open(os.path.join(ROOT, "calls.jsonl"), "a") as f:
    f.write(json.dumps(argv) + "\n")
  group = argv[2] if len(argv) > 4 else None
  if argv[:2] != ["compute", "tpus"] or group not in ("tpu-vm", "queued-resources"):
    return _fail(f"the stand-in does not do: gcloud {' '.join(argv)}", 2)
  queued = argv[2] == "queued-resources"
  verb = argv[3]
  positional, flags = _split(argv[4:])
  if "zone" not in flags or "project" not in flags:
    return _fail("give --zone and --project", 2)
  if not queued and "node" in flags:
    return _fail("unrecognized arguments: --node (tpu-vm has one node)", 2)
  if verb == "scp":  # SRC DEST, one of them NAME:PATH
    name = next((p.split(":", 1)[0] for p in positional if ":" in p), "")
  else:
    name = positional[0]
  state = _load()
  resource = state.get(name)
  kind = "queued-resources" if queued else "tpu-vm"
  if verb == "create":
    if resource:
      return _fail(f"ALREADY_EXISTS: {name}")
    count = int(flags.get("node-count", 1))
    nodes = [f"{flags['node-prefix']}-{j}" for j in range(count)] if count > 1 else [name]
    resource = {
      "kind": kind,
      "accelerator_type": flags["accelerator-type"],
      "workers": workers_per_slice(flags["accelerator-type"]),
      "nodes": nodes,
      "state": "ACTIVE" if queued else "READY",
    }
    for node in nodes:
      for i in range(resource["workers"]):
        os.makedirs(_home(node, i))
    state[name] = resource
    _save(state)
    print(f"Created {kind} [{name}].", file=sys.stderr)
    return 0
  if not resource or resource["kind"] != kind:
    return _fail(f"NOT_FOUND: projects/{flags['project']}/locations/{flags['zone']}/nodes/{name}")
  if verb == "describe":
    if queued:
      print(f"name: {name}\nstate:\n  state: {resource['state']}")
    else:
      print(f"acceleratorType: {resource['accelerator_type']}\nname: {name}\nstate: READY")
    return 0
  if verb == "delete":
    if queued and "force" not in flags:
      return _fail(f"FAILED_PRECONDITION: {name} has nodes; delete them or use --force")
    for node in resource["nodes"]:
      shutil.rmtree(os.path.join(ROOT, "workers", node), ignore_errors=True)
    del state[name]
    _save(state)
    print(f"Deleted {kind} [{name}].", file=sys.stderr)
    return 0
  try:
    if verb == "ssh":
      return _ssh(resource, name, flags, queued)
    if verb == "scp":
      return _scp(resource, name, *positional, flags, queued)
  except IndexError as e:
    return _fail(str(e))
  return _fail(f"the stand-in does not do: gcloud {' '.join(argv)}", 2)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
