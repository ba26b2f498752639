"""Device meshes from a config: axis sizes inside a slice (ici) and across slices (dcn).

`mesh.axes` names the axes, e.g. ("data", "fsdp", "tensor"); `mesh.ici` and `mesh.dcn` give their
sizes within one slice and across slices, each allowing one -1 to be inferred from the device count.
One slice gives a plain device mesh; several (multi-slice TPU) a hybrid mesh whose dcn axes cross
the slower data-centre network. Devices are `jax.devices()` or, for ahead-of-time compilation,
those of a TPU topology.
"""

import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils

from mav_jax import errors


def fake_cpu_devices(count: int) -> None:
  """Makes the CPU backend offer `count` devices (try meshes on a laptop). Call before JAX's first
  use of a device: the flag is read when the backend starts."""
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"
  )


def resolve_sizes(sizes: Sequence[int], total: int, what: str) -> tuple[int, ...]:
  """Replaces at most one -1 in `sizes` so that their product is `total`."""
  sizes = [int(s) for s in sizes]
  if sizes.count(-1) > 1:
    raise errors.UserError(f"{what} sizes {sizes}: at most one axis may be -1 (inferred)")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes) or total % known:
    raise errors.UserError(f"{what} sizes {sizes} do not divide the {total} devices available")
  if -1 in sizes:
    sizes[sizes.index(-1)] = total // known
  if math.prod(sizes) != total:
    raise errors.UserError(
      f"{what} sizes {sizes} multiply to {math.prod(sizes)}, not the {total} "
      f"devices available; set one axis to -1 to infer it"
    )
  return tuple(sizes)


def num_slices(devices: Sequence) -> int:
  """Number of TPU slices among `devices` (1 on CPU / GPU)."""
  return 1 + max(int(getattr(d, "slice_index", 0) or 0) for d in devices)


def create_mesh(mesh_config, devices: Sequence | None = None) -> jax.sharding.Mesh:
  """The mesh of a config's `mesh` section (`axes`, `ici`, `dcn`) over `devices`."""
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(mesh_config.axes)
  ici, dcn = tuple(mesh_config.ici), tuple(mesh_config.dcn)
  if not len(names) == len(ici) == len(dcn):
    raise errors.UserError(
      f"mesh.axes {names}, mesh.ici {ici} and mesh.dcn {dcn} need equal lengths"
    )
  slices = num_slices(devices)
  dcn = resolve_sizes(dcn, slices, "mesh.dcn")
  ici = resolve_sizes(ici, len(devices) // slices, "mesh.ici")
  if slices > 1:
    array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
  elif devices[0].platform == "tpu":
    array = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
  else:
    array = np.asarray(devices).reshape(ici)
  return jax.sharding.Mesh(array, names)
