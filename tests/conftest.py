"""Test set-up: 8 fake CPU devices (set before JAX is imported anywhere) and shared helpers."""

import os

# XLA's compile time dominates the suite. Its newer CPU fusion emitters compile a tiny train step
# (~3,000 fusions, most of them per-parameter optimizer updates) about 20% slower than the classic
# ones (35 vs 43 s on a 2-core Zen 1 host); every process of the suite uses the classic ones.
TEST_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + f" {TEST_XLA_FLAGS} --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# With libtpu installed (requirements-tpu.txt), every JAX process on this TPU-less machine probes it;
# its lockfile admits one process at a time, so a test that compiles for a TPU topology would make
# later subprocesses (the CLIs under test) fail their probe. Let them all load it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

# Tests compare float32 results with tight tolerances; keep matmuls exact on every backend.
jax.config.update("jax_default_matmul_precision", "highest")
# Tiny models: XLA's compile time dominates the suite, and its optimisations buy little at these sizes.
jax.config.update("jax_disable_most_optimizations", True)

# Libraries that read absl flags (Grain's worker processes) need them parsed; pytest does not.
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
  """With `--dist loadgroup` (pyproject.toml), tests that share a module-scoped fixture run on one
  worker, so the fixture (a compiled benchmark grid, a trained cascade) is built once; every other
  test goes to whichever worker is free, so one long file no longer holds one worker. The grouped
  tests (the largest units of work) are handed out first, the single tests fill in at the end."""
  for item in items:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
      continue
    if any(
      d.scope == "module" and getattr(d.func, "__module__", None) == item.module.__name__
      for name in item.fixturenames
      for d in info.name2fixturedefs.get(name, ())
    ):
      item.add_marker(pytest.mark.xdist_group(f"{item.module.__name__}-shared-fixtures"))
  items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)
