"""Errors by kind: what the user can fix (one `error:` line) and what broke (a traceback).

Every check of user input in mav_jax (flags, config values, files, checkpoints) raises a
`UserError`; the entrypoints print it as one `error: ...` line and exit 1, before any model loads
where the check allows. Anything else (a JAX shape or sharding error, a bug, a failed disk) keeps
its traceback: it is a fault to report, not a mistake to correct.
"""


class UserError(ValueError):
  """Input the user can correct; the message says what is wrong and how to fix it."""


class UserFileNotFoundError(UserError, FileNotFoundError):
  """A file or folder the user named (or a default path) does not exist."""


class UserFileExistsError(UserError, FileExistsError):
  """An output the user named exists and would be replaced."""


class CheckpointWriteError(RuntimeError):
  """A checkpoint could not be written (full disk, permissions, storage outage): the run stops at
  once with one line naming the cause and the path, so no steps are trained past it unsaved."""
