r"""Trains a cascade stage: `python -m mav_jax.train --config configs/<stage>.py:<variant> --workdir DIR`.

  python -m mav_jax.train --config configs/decoder.py:tiny --workdir workdirs/tiny
  python -m mav_jax.train --config configs/decoder.py:tiny --workdir workdirs/tiny \
      --config.sharding.strategy=data_parallel --config.train.num_steps=500

Re-running the same command resumes from the workdir's latest checkpoint. Several processes (one
per host) train together when `--num_processes` > 1 (with --coordinator_address and --process_id),
or with --multihost / automatically on a Cloud TPU pod slice (see launch/tpu.py).
"""

from absl import flags
from ml_collections import config_flags

from mav_jax import errors
from mav_jax.utils import cli, distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config, e.g. decoder.py:tiny.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (local or gs://): checkpoints, logs.")
_FORCE_UNLOCK = flags.DEFINE_bool(
  "force_unlock",
  False,
  "Take the workdir over from the run that holds its lease (mav_jax/lease.py): that run stops "
  "without saving. Only when you are sure it should not go on.",
)


def main(argv):
  del argv  # cli.main rejects positional arguments
  if _CONFIG.value is None or not _WORKDIR.value:
    raise errors.UserError("pass --config (e.g. configs/decoder.py:tiny) and --workdir")
  distributed.start()
  import jax

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
      timeout = distributed.HEARTBEAT_TIMEOUT.value
      train_lib.say(
        f"[train] error: process {jax.process_index()} of {jax.process_count()} stopped: "
        f"{type(e).__name__}: {first}. If another process died, the coordination service names "
        f"it within --heartbeat_timeout={timeout} s and this process then ends; "
        f"rerun the same command to resume from the last complete checkpoint.",
      )
    raise


if __name__ == "__main__":
  cli.main(main)
