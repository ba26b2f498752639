"""The code stays lint-clean and formatted (ruff, configured in pyproject.toml)."""

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUFF = shutil.which("ruff", path=os.path.dirname(sys.executable)) or shutil.which("ruff")


@pytest.mark.skipif(RUFF is None, reason="ruff is not installed (pip install -r requirements.txt)")
@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]])
def test_ruff(args):
  proc = subprocess.run([RUFF, *args], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_relative_link_in_the_readme_and_docs_resolves():
  """Markdown links and images of README.md and docs/*.md that point into the repository name
  files that exist (anchors are not checked)."""
  import glob
  import re

  pages = [os.path.join(REPO, "README.md")] + glob.glob(os.path.join(REPO, "docs", "*.md"))
  broken = []
  for page in pages:
    text = open(page, encoding="utf-8").read()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
      path = target.split("#", 1)[0]
      if not path or "://" in path or path.startswith("mailto:"):
        continue
      if not os.path.exists(os.path.join(os.path.dirname(page), path)):
        broken.append(f"{os.path.relpath(page, REPO)}: {target}")
  assert len(pages) > 1 and not broken, broken
