"""Joining the other processes of a job: the flags every entrypoint that runs on several hosts
shares (mav_jax.train, mav_jax.sample, mav_jax.evaluate), and `start`, which reads them.

Several processes join one JAX job when --num_processes > 1 (with --coordinator_address and
--process_id, as launch/local.py passes them), or with --multihost / automatically on a Cloud TPU
pod slice (jax.distributed's cluster auto-detection).
"""

import os

from absl import flags, logging

COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts).")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
MULTIHOST = flags.DEFINE_bool(
  "multihost",
  False,
  "Join the other hosts with jax.distributed.initialize() and its cluster auto-detection (Cloud "
  "TPU pods and multi-slice; launch/tpu.py sets it). Pod slices are detected without it.",
)
HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
  "heartbeat_timeout",
  100,
  "Several processes: seconds without a heartbeat after which JAX's coordination service declares "
  "a process lost and stops the others (default: JAX's 100).",
)
CPU_DEVICES = flags.DEFINE_integer(
  "cpu_devices", None, "Fake this many CPU devices per process (for trying sharding on a laptop)."
)


def _is_tpu_pod() -> bool:
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def start() -> None:
  """Fakes --cpu_devices and joins the job's other processes, if the flags (or a pod) say so.
  Call before JAX's first use of a device."""
  if CPU_DEVICES.value:
    from mav_jax.parallel import mesh

    mesh.fake_cpu_devices(CPU_DEVICES.value)
  import jax

  if (NUM_PROCESSES.value or 1) > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      COORDINATOR.value,
      NUM_PROCESSES.value,
      PROCESS_ID.value,
      heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT.value,
    )
  elif MULTIHOST.value or _is_tpu_pod():
    jax.distributed.initialize(heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT.value)
  logging.info(
    "process %d of %d, %d devices", jax.process_index(), jax.process_count(), jax.device_count()
  )
