r"""Trains a cascade stage: `python -m mav_jax.train --config configs/<stage>.py:<variant> --workdir DIR`.

  python -m mav_jax.train --config configs/decoder.py:tiny --workdir workdirs/tiny
  python -m mav_jax.train --config configs/decoder.py:tiny --workdir workdirs/tiny \
      --config.sharding.strategy=data_parallel --config.train.num_steps=500

Re-running the same command resumes from the workdir's latest checkpoint. Several processes (one
per host) train together when `--num_processes` > 1 (with --coordinator_address and --process_id),
or with --multihost / automatically on a Cloud TPU pod slice (see launch/tpu.py).
"""

import os

from absl import flags, logging
from ml_collections import config_flags

from mav_jax import errors
from mav_jax.utils import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config, e.g. decoder.py:tiny.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (local or gs://): checkpoints, logs.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_MULTIHOST = flags.DEFINE_bool(
  "multihost",
  False,
  "Join the other hosts with jax.distributed.initialize() and its cluster auto-detection (Cloud "
  "TPU pods and multi-slice; launch/tpu.py sets it). Pod slices are detected without it.",
)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
  "heartbeat_timeout",
  100,
  "Several processes: seconds without a heartbeat after which JAX's coordination service declares "
  "a process lost and stops the others (default: JAX's 100).",
)
_FORCE_UNLOCK = flags.DEFINE_bool(
  "force_unlock",
  False,
  "Take the workdir over from the run that holds its lease (mav_jax/lease.py): that run stops "
  "without saving. Only when you are sure it should not go on.",
)
_CPU_DEVICES = flags.DEFINE_integer(
  "cpu_devices", None, "Fake this many CPU devices per process (for trying sharding on a laptop)."
)


def _is_tpu_pod() -> bool:
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def main(argv):
  del argv  # cli.main rejects positional arguments
  if _CONFIG.value is None or not _WORKDIR.value:
    raise errors.UserError("pass --config (e.g. configs/decoder.py:tiny) and --workdir")
  if _CPU_DEVICES.value:
    from mav_jax.parallel import mesh

    mesh.fake_cpu_devices(_CPU_DEVICES.value)
  import jax

  if (_NUM_PROCESSES.value or 1) > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      _COORDINATOR.value,
      _NUM_PROCESSES.value,
      _PROCESS_ID.value,
      heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value,
    )
  elif _MULTIHOST.value or _is_tpu_pod():
    jax.distributed.initialize(heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value)
  logging.info(
    "process %d of %d, %d devices", jax.process_index(), jax.process_count(), jax.device_count()
  )

  from mav_jax import train_lib

  try:
    train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value, force_unlock=_FORCE_UNLOCK.value)
  except (errors.UserError, errors.CheckpointWriteError):
    raise  # one `error:` line (cli.main)
  except Exception as e:
    if jax.process_count() > 1:
      # A failed collective usually means another process died; JAX's coordination service names
      # it once its heartbeats stop, then ends this process too.
      first = (str(e).strip().splitlines() or [""])[0][:300].rstrip(".")
      train_lib.say(
        f"[train] error: process {jax.process_index()} of {jax.process_count()} stopped: "
        f"{type(e).__name__}: {first}. If another process died, the coordination service names "
        f"it within --heartbeat_timeout={_HEARTBEAT_TIMEOUT.value} s and this process then ends; "
        f"rerun the same command to resume from the last complete checkpoint.",
      )
    raise


if __name__ == "__main__":
  cli.main(main)
