"""Device meshes from a config: axis sizes inside a slice (ici) and across slices (dcn).

`mesh.axes` names the axes, e.g. ("data", "fsdp", "fsdp_transpose", "tensor"); `mesh.ici` and
`mesh.dcn` give their sizes within one slice and across slices, each allowing one -1 to be inferred
from the device count. Within a slice "fsdp" and "fsdp_transpose" may both be -1: together they
take the devices left, split between them as `split_fsdp` chooses (the trainer and the benchmark
choose the split that divides the model's train state most evenly).
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


def _resolve_ici(names, ici, total: int, split_fsdp) -> tuple[int, ...]:
  """`resolve_sizes` for `mesh.ici`, where "fsdp" and "fsdp_transpose" may both be -1."""
  pair = [names.index(a) for a in ("fsdp", "fsdp_transpose") if a in names]
  if len(pair) == 2 and all(ici[i] == -1 for i in pair):
    f, t = pair
    sizes = resolve_sizes([1 if i == t else s for i, s in enumerate(ici)], total, "mesh.ici")
    fsdp, transpose = split_fsdp(sizes[f]) if split_fsdp else (sizes[f], 1)
    return tuple(fsdp if i == f else transpose if i == t else s for i, s in enumerate(sizes))
  return resolve_sizes(ici, total, "mesh.ici")


def create_mesh(mesh_config, devices: Sequence | None = None, split_fsdp=None) -> jax.sharding.Mesh:
  """The mesh of a config's `mesh` section (`axes`, `ici`, `dcn`) over `devices`.

  `split_fsdp(n) -> (fsdp, fsdp_transpose)` splits the n devices of the two FSDP axes when both
  are -1 in `mesh.ici` (without it, all go to "fsdp")."""
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(mesh_config.axes)
  ici, dcn = tuple(mesh_config.ici), tuple(mesh_config.dcn)
  if not len(names) == len(ici) == len(dcn):
    raise errors.UserError(
      f"mesh.axes {names}, mesh.ici {ici} and mesh.dcn {dcn} need equal lengths (an older "
      f"config's three sizes (data, fsdp, tensor) become four: (data, fsdp, fsdp_transpose, "
      f"tensor), e.g. --config.mesh.ici='(1,-1,-1,1)')"
    )
  slices = num_slices(devices)
  dcn = resolve_sizes(dcn, slices, "mesh.dcn")
  ici = _resolve_ici(names, ici, len(devices) // slices, split_fsdp)
  if slices > 1:
    array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
  elif devices[0].platform == "tpu":
    array = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
  else:
    array = np.asarray(devices).reshape(ici)
  return jax.sharding.Mesh(array, names)
