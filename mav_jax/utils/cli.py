"""What the user-facing entrypoints share: quiet library logs, user errors as one line and exit 1."""

import sys
from collections.abc import Callable

from absl import flags


def run_user_command(fn: Callable[[], object]) -> None:
  """Runs `fn` with library INFO logs off (unless --verbosity was given: they would bury the
  progress lines); a user error (bad input, missing or mismatched file or checkpoint) is printed as
  `error: ...` and exits with status 1."""
  from absl import logging

  from mav_jax import sample_lib

  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    fn()
  except (ValueError, FileNotFoundError, FileExistsError, sample_lib.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
