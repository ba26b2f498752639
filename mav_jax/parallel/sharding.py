"""Sharding strategies as tables of logical-axis rules, and the shardings they give a train state.

A strategy maps the logical names of `mav_jax.models.axes` to mesh axes; rules are tried in order
and the first whose mesh axis is still free *and divides the dimension* wins, so a 3-channel RGB
kernel is simply left unsplit where its 256-channel neighbours are split. The batch is always split
over ("data", "fsdp").

  data_parallel: parameters and optimizer state replicated; the batch split over every device.
  fsdp:          every parameter and its optimizer state split over "fsdp" along one large axis.
  tensor:        attention heads, MLP hidden units and conv output channels split over "tensor".
  fsdp_tensor:   tensor parallel first, then FSDP over the remaining axes.
"""

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mav_jax import errors
from mav_jax.models import axes

BATCH_AXES = ("data", "fsdp")

_FSDP = [
  (axes.CHANNELS_IN, "fsdp"),
  (axes.CHANNELS_OUT, "fsdp"),
  (axes.MLP, "fsdp"),
  (axes.EMBED, "fsdp"),
  (axes.CONTEXT, "fsdp"),
  (axes.EMBED_IN, "fsdp"),
  (axes.HEADS, "fsdp"),
  (axes.HEAD_DIM, "fsdp"),
]
_TENSOR = [(axes.HEADS, "tensor"), (axes.MLP, "tensor"), (axes.CHANNELS_OUT, "tensor")]
STRATEGIES = {
  "data_parallel": [],
  "fsdp": _FSDP,
  "tensor": _TENSOR,
  "fsdp_tensor": _TENSOR + _FSDP,
}
# Activations: the batch over the data-parallel axes; everything else as the compiler likes.
ACTIVATION_RULES = [(axes.ACT_BATCH, BATCH_AXES)]

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def strategy_rules(name: str) -> list:
  """The parameter rules of strategy `name`."""
  if name not in STRATEGIES:
    raise errors.UserError(
      f"unknown sharding strategy {name!r}; choose one of {sorted(STRATEGIES)}"
    )
  return list(STRATEGIES[name])


def _mesh_size(mesh: jax.sharding.Mesh, mesh_axes) -> int:
  mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
  return math.prod(mesh.shape[a] for a in mesh_axes if a in mesh.shape)


def spec_for(
  names: Sequence[str | None], shape: Sequence[int], rules: Rules, mesh: jax.sharding.Mesh
) -> PartitionSpec:
  """The PartitionSpec of one parameter: rules in order; a mesh axis is used once and only where
  it divides the dimension (else the next rule, or no split)."""
  spec: list[Any] = [None] * len(names)
  used: set[str] = set()
  for logical, mesh_axes in rules:
    if mesh_axes is None:
      continue
    group = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    if any(a not in mesh.shape for a in group) or used & set(group):
      continue
    size = _mesh_size(mesh, group)
    for i, name in enumerate(names):
      if name == logical and spec[i] is None and size > 1 and shape[i] % size == 0:
        spec[i] = mesh_axes
        used |= set(group)
        break
  return PartitionSpec(*spec)


def tree_shardings(abstract_boxed: Any, rules: Rules, mesh: jax.sharding.Mesh) -> Any:
  """NamedShardings for every leaf of an (unboxed) tree, from its boxed abstract version.

  Leaves boxed in `nn.Partitioned` (parameters, and the optimizer moments that mirror them) are
  split by `rules`; anything else (step counters, RNG keys, scalars) is replicated.
  """

  def one(leaf):
    if isinstance(leaf, nn.Partitioned):
      return NamedSharding(mesh, spec_for(leaf.names, leaf.value.shape, rules, mesh))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(one, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data-parallel mesh axes present in `mesh`."""
  present = tuple(a for a in BATCH_AXES if a in mesh.shape)
  return NamedSharding(mesh, PartitionSpec(present))


def batch_shards(mesh: jax.sharding.Mesh) -> int:
  """Into how many pieces `batch_sharding(mesh)` splits the batch (the data x fsdp devices)."""
  return math.prod(mesh.shape[a] for a in batch_sharding(mesh).spec[0])


def activation_rules() -> list:
  """Rules for `nn.with_logical_constraint` inside the model (use with `nn.logical_axis_rules`)."""
  return list(ACTIVATION_RULES)


def place_host_tree(host_tree: Any, shardings: Any) -> Any:
  """Host numpy arrays -> global jax.Arrays with `shardings`, each process writing only the
  slices its devices hold (nothing is gathered or broadcast)."""

  def place(array, target):
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, target, lambda index: array[index])

  return jax.tree.map(place, host_tree, shardings)
