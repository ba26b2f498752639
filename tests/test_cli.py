"""`mav_jax.utils.cli.main`: a user error is one `error:` line; anything else keeps its traceback."""

import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A CLI whose main raises (in a worker thread the main thread joins, as the trainer's and Orbax's
# threads do) what `sys.argv[1]` names.
_PROGRAM = textwrap.dedent(
  """
  import sys
  from concurrent import futures

  from mav_jax import errors
  from mav_jax.utils import cli

  KIND = sys.argv.pop(1)

  def work():
    if KIND == "fault":
      raise RuntimeError("the disk caught fire")
    raise errors.UserFileNotFoundError("no captions at x.csv; pass --captions=FILE")

  def main(argv):
    del argv
    with futures.ThreadPoolExecutor(2) as pool:
      for future in [pool.submit(work), pool.submit(work)]:
        future.result()

  cli.main(main)
  """
)


def _run(kind: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-c", _PROGRAM, kind],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )


@pytest.mark.parametrize("kind", ["fault", "user"])
def test_faults_keep_one_traceback_user_errors_are_one_line(kind):
  """A fault (not a UserError) raised in two worker threads: exit non-zero with one traceback
  naming it. A UserError: exit 1, one `error:` line with the fix, no traceback."""
  proc = _run(kind)
  out = proc.stdout + proc.stderr
  if kind == "fault":
    assert proc.returncode != 0, out
    assert out.count("Traceback (most recent call last)") == 1, out
    assert "RuntimeError: the disk caught fire" in out, out
    assert not [line for line in out.splitlines() if line.startswith("error:")], out
  else:
    assert proc.returncode == 1, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines == ["error: no captions at x.csv; pass --captions=FILE"], out
