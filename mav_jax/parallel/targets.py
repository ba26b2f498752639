"""Where a program is compiled for: this machine's devices, or a Cloud TPU topology compiled for
ahead of time (`jax.experimental.topologies` with the `libtpu` wheel; no TPU needed).

A target names its chip's HBM per device and bf16 peak FLOP/s (public spec-sheet figures), which
turn the compiler's memory and cost analyses into "does it fit" and "FLOPs utilisation".
"""

import dataclasses
import os
import re

import jax

from mav_jax import errors

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  """A chip's per-device figures (bf16 dense peak; None where unknown, e.g. a CPU)."""

  name: str
  hbm_bytes: int | None
  peak_flops: float | None


# Cloud TPU spec sheets (per chip) and NVIDIA's (dense bf16, SXM parts).
CHIPS = {
  "v4": Chip("TPU v4", 32 * GiB, 275e12),
  "v5e": Chip("TPU v5e", 16 * GiB, 197e12),
  "v5p": Chip("TPU v5p", 95 * GiB, 459e12),
  "v6e": Chip("TPU v6e", 32 * GiB, 918e12),
  "h100": Chip("NVIDIA H100", 80 * 10**9, 989e12),
  "h200": Chip("NVIDIA H200", 141 * 10**9, 989e12),
}
# What `device_kind` says, for TPUs and GPUs met as local devices.
_KIND_TO_CHIP = {
  "TPU v4": "v4",
  "TPU v5 lite": "v5e",
  "TPU v5e": "v5e",
  "TPU v5": "v5p",
  "TPU v5p": "v5p",
  "TPU v6 lite": "v6e",
  "TPU v6e": "v6e",
}
_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):\d+(x\d+){1,2}$")


@dataclasses.dataclass(frozen=True)
class Target:
  """Devices to compile for.

  Attributes:
    name: "local" or the topology name (e.g. "v5p:4x4x4").
    devices: the devices (TPU topology devices cannot run anything: compile only).
    chip: per-device figures.
    runnable: the devices are this machine's, so steps can be timed.
    num_slices: TPU slices (multi-slice topologies are > 1).
  """

  name: str
  devices: tuple
  chip: Chip
  runnable: bool
  num_slices: int = 1

  @property
  def num_devices(self) -> int:
    return len(self.devices)


def local_chip(device) -> Chip:
  """The figures of a local device (from its `device_kind`; memory from the runtime if it says)."""
  kind = str(getattr(device, "device_kind", ""))
  chip = CHIPS.get(_KIND_TO_CHIP.get(kind, ""))
  if chip is None:
    for key in ("h100", "h200"):
      if key.upper() in kind.upper():
        chip = CHIPS[key]
  limit = None
  try:
    limit = (device.memory_stats() or {}).get("bytes_limit")
  except Exception:  # noqa: BLE001 - CPUs and some runtimes have no memory stats
    limit = None
  if chip is None:
    return Chip(kind or device.platform, limit, None)
  return dataclasses.replace(chip, hbm_bytes=limit or chip.hbm_bytes)


def get_target(name: str, num_slices: int = 1) -> Target:
  """ "local" (this process's devices) or a TPU topology such as "v5e:4x4", "v5p:4x4x4", "v6e:16x16"
  (chips per side; compiled for ahead of time, which needs the `libtpu` wheel:
  `pip install -r requirements-tpu.txt`)."""
  if name == "local":
    if num_slices != 1:
      raise errors.UserError("--num_slices applies to TPU topologies, not to local devices")
    devices = tuple(jax.devices())
    return Target("local", devices, local_chip(devices[0]), runnable=True)
  if not _TOPOLOGY.match(name):
    raise errors.UserError(
      f"unknown target {name!r}: use 'local' or a TPU topology <generation>:<chips per side>, "
      f"e.g. v5e:4x4, v5p:4x4x4, v6e:16x16 (generations: v4, v5e, v5p, v6e)"
    )
  try:
    import libtpu  # noqa: F401
  except ImportError:
    raise RuntimeError(
      f"compiling for {name} needs the libtpu wheel (the TPU compiler; it runs on this CPU): "
      f"pip install -r requirements-tpu.txt"
    ) from None
  # Compiling only (no TPU is opened): let several processes load libtpu at once (its lockfile
  # otherwise allows one, and a second benchmark or test would fail).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  try:
    topology = topologies.get_topology_desc(
      topology_name=name, platform="tpu", num_slices=num_slices
    )
  except Exception as e:  # noqa: BLE001 - libtpu's errors are plain RuntimeErrors / XlaRuntimeErrors
    raise errors.UserError(
      f"libtpu cannot make the topology {name!r} ({num_slices} slices): {e}"
    ) from e
  chip = CHIPS[name.split(":")[0]]
  return Target(name, tuple(topology.devices), chip, runnable=False, num_slices=num_slices)
