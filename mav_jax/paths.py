"""Where the repository's shipped files are, so defaults work from any working directory."""

import os

# The repository root (the folder holding `mav_jax/`, `configs/` and `checkpoints/`).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve(path: str) -> str:
  """`path` as given if it exists (or is absolute or remote), else relative to the repository root.

  Lets config defaults such as "checkpoints/tiny/clip" name the shipped checkpoints wherever the
  command runs from; a path that exists nowhere is returned as given, so errors name it as typed.
  """
  if not path or os.path.isabs(path) or "://" in path or os.path.exists(path):
    return path
  candidate = os.path.join(REPO_ROOT, path)
  return candidate if os.path.exists(candidate) else path
