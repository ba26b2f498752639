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
# The CLIs that tests start (mav_jax.sample, mav_jax.evaluate, ...) compile with most XLA
# optimisations off too, as the in-process tests do below: tiny models, and compiles dominate
# (the main-job and MSR-VTT CLI tests took 102 and 158 s with them on, 52 and 69 s off, one core).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")
# With libtpu installed (requirements-tpu.txt), every JAX process on this TPU-less machine probes it;
# its lockfile admits one process at a time, so a test that compiles for a TPU topology would make
# later subprocesses (the CLIs under test) fail their probe. Let them all load it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

# Tests compare float32 results with tight tolerances; keep matmuls exact on every backend.
jax.config.update("jax_default_matmul_precision", "highest")
# Tiny models: XLA's compile time dominates the suite, and its optimisations buy little at these sizes.
jax.config.update("jax_disable_most_optimizations", True)

# Libraries that read absl flags (Grain's worker processes) need them parsed; pytest does not.
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()


def pytest_collection_modifyitems(config, items):
  """Tests that build a module-scoped fixture of their own file (a compiled benchmark grid, a
  trained cascade) are the largest units of work, then those marked `long`: they run first, so the
  two workers of `--dist load` (pyproject.toml) end close together. (Each worker builds such a
  fixture for its own tests of that file; pytest-xdist's `loadgroup`, which could keep them on one
  worker, assigns no groups with this pytest/xdist pair.)"""

  def builds_module_fixture(item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    return info is not None and any(
      d.scope == "module" and getattr(d.func, "__module__", None) == item.module.__name__
      for name in item.fixturenames
      for d in info.name2fixturedefs.get(name, ())
    )

  items.sort(
    key=lambda item: (not builds_module_fixture(item), item.get_closest_marker("long") is None)
  )
