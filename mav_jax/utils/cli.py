"""What the user-facing entrypoints share: flag mistakes and user errors as one `error:` line.

    if __name__ == "__main__":
      cli.main(main)            # instead of app.run(main)

A mistake the user can fix (an unknown or malformed flag, an unknown `--config.` field, a bad value,
a missing or mismatched file or checkpoint: `mav_jax.errors.UserError`) prints `error: ...` and
exits 1, before any model loads where the check allows. A failed checkpoint write prints one line
too. Anything else keeps its traceback and exits 1: it is a fault, not a mistake.
"""

import difflib
import re
import sys
from collections.abc import Callable

from absl import app, flags

from mav_jax import errors


def fail(message: str) -> None:
  """Prints `error: message` (one line) and exits 1."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(1)


def _config_field_error(argv: list[str], e: Exception) -> str | None:
  """'--config.model.chanels: no such field (did you mean model.channels?)' for an unknown
  `--config.` override; None if no override names a missing field."""
  for arg in argv[1:]:
    m = re.match(r"--(\w+)\.([\w.]+)(=|$)", arg)
    if not m or m.group(1) not in flags.FLAGS:
      continue
    config = _config_file(argv, m.group(1))
    if config is None:
      continue
    node, parts = config, m.group(2).split(".")
    for i, part in enumerate(parts):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if part not in keys:
        where = ".".join(parts[:i]) or "the config"
        close = difflib.get_close_matches(part, keys, n=1)
        hint = f"; did you mean {'.'.join(parts[:i] + close)}?" if close else ""
        return f"--{m.group(1)}.{m.group(2)}: {where} has no field {part!r}{hint}"
      node = node[part]
  del e
  return None


def _config_file(argv: list[str], name: str):
  """The config that `--name=path` (or `--name path`) in argv loads, or None."""
  flag = flags.FLAGS[name]
  if flag.value is not None:
    return flag.value
  for i, arg in enumerate(argv):
    path = arg.split("=", 1)[1] if arg.startswith(f"--{name}=") else None
    if arg == f"--{name}" and i + 1 < len(argv):
      path = argv[i + 1]
    if path:
      try:
        return flag.parser.parse(path)
      except Exception:  # the file itself is the problem: absl's message says so
        return None
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with its mistakes as one `error:` line (for app.run's flags_parser)."""
  try:
    return flags.FLAGS(argv)
  except flags.UnrecognizedFlagError as e:
    fail(_config_field_error(argv, e) or str(e))
  except flags.Error as e:
    fail(str(e))
  except (AttributeError, KeyError) as e:  # ml_collections: overriding a field that is not there
    message = _config_field_error(argv, e)
    if message is None:
      raise
    fail(message)
  return []


def run_user_command(fn: Callable[[], object]) -> None:
  """Runs `fn` with library INFO logs off (unless --verbosity was given: they would bury the
  progress lines). Its user errors reach `main`, which prints them as one line."""
  from absl import logging

  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  fn()


def main(main_fn: Callable[[list[str]], object]) -> None:
  """app.run(main_fn) with flag mistakes, user errors and unexpected arguments as one line."""

  def wrapped(argv):
    if len(argv) > 1:
      fail(f"unexpected arguments: {argv[1:]} (flags are --name=value)")
    try:
      return main_fn(argv)
    except (errors.UserError, errors.CheckpointWriteError) as e:
      fail(str(e))

  app.run(wrapped, flags_parser=parse_flags)
