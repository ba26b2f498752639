"""Sharding strategies as tables of logical-axis rules, and the shardings they give a train state.

A strategy maps the logical names of `mav_jax.models.axes` to mesh axes; rules are tried in order
and the first whose mesh axes are still free *and divide the dimension* wins, so a 3-channel RGB
kernel is simply left unsplit where its 256-channel neighbours are split. The batch is always split
over ("data", "fsdp", "fsdp_transpose").

  data_parallel: parameters and optimizer state replicated; the batch split over every device.
  fsdp:          every parameter and its optimizer state split over the two FSDP axes: over their
                 product along one dimension where it divides, else "fsdp" along one dimension and
                 "fsdp_transpose" along another (MaxText's fsdp_transpose). Two axes are what keep
                 the split even on hundreds of chips: the paper UNets' widths are 320·k, which no
                 power of two above 64 divides, so one 256-way axis would leave them whole.
  tensor:        attention heads, MLP hidden units and conv output channels split over "tensor".
  fsdp_tensor:   tensor parallel first, then FSDP over the remaining axes.

`best_fsdp_split` chooses the sizes of the two FSDP axes for a model (both -1 in `mesh.ici`) from
the shardings alone, and `state_report` says how evenly a state is split, naming what is not.
"""

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mav_jax import errors
from mav_jax.models import axes

FSDP_AXES = ("fsdp", "fsdp_transpose")
BATCH_AXES = ("data", *FSDP_AXES)

# The dimensions FSDP may split, in order of preference.
_FSDP_NAMES = (
  axes.CHANNELS_IN,
  axes.CHANNELS_OUT,
  axes.MLP,
  axes.EMBED,
  axes.CONTEXT,
  axes.EMBED_IN,
  axes.HEADS,
  axes.HEAD_DIM,
  axes.NORM,  # norm scales and biases: ~11% of the paper D^t's state would stay whole at 512
  # Kernel taps, last: only a patch embedding's (CLIP's 32x32) ever divide; 3x3 taps never do.
  axes.CONV_H,
  axes.CONV_W,
)
# Both FSDP axes along one dimension where their product divides it; then each along its own.
_FSDP = (
  [(name, FSDP_AXES) for name in _FSDP_NAMES]
  + [(name, "fsdp") for name in _FSDP_NAMES]
  + [(name, "fsdp_transpose") for name in _FSDP_NAMES]
)
_TENSOR = [(axes.HEADS, "tensor"), (axes.MLP, "tensor"), (axes.CHANNELS_OUT, "tensor")]
STRATEGIES = {
  "data_parallel": [],
  "fsdp": _FSDP,
  "tensor": _TENSOR,
  "fsdp_tensor": _TENSOR + _FSDP,
}
# Activations: the batch over the data-parallel axes; under the tensor strategies also the
# channels over "tensor", as the convolutions' output channels are (an axis no rule names is
# pinned unsplit by nn.with_logical_constraint, which gathered the channels at every attention
# block). Heads are split inside attention by its projections' shardings.
ACTIVATION_RULES = [(axes.ACT_BATCH, BATCH_AXES)]
TENSOR_ACTIVATION_RULES = [(axes.ACT_CHANNELS, "tensor")]

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def strategy_rules(name: str) -> list:
  """The parameter rules of strategy `name`."""
  if name not in STRATEGIES:
    raise errors.UserError(
      f"unknown sharding strategy {name!r}; choose one of {sorted(STRATEGIES)}"
    )
  return list(STRATEGIES[name])


MeshLike = jax.sharding.Mesh | Mapping[str, int]


def _sizes(mesh: MeshLike) -> Mapping[str, int]:
  """Axis sizes of a mesh, or the mapping itself (plans need no devices)."""
  return mesh.shape if isinstance(mesh, jax.sharding.Mesh) else mesh


def _mesh_size(mesh: MeshLike, mesh_axes) -> int:
  mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
  return math.prod(_sizes(mesh)[a] for a in mesh_axes if a in _sizes(mesh))


def spec_for(
  names: Sequence[str | None], shape: Sequence[int], rules: Rules, mesh: MeshLike
) -> PartitionSpec:
  """The PartitionSpec of one parameter: rules in order; a mesh axis is used once and only where
  it divides the dimension (else the next rule, or no split). Axes of size 1 are skipped."""
  sizes = _sizes(mesh)
  spec: list[Any] = [None] * len(names)
  used: set[str] = set()
  for logical, mesh_axes in rules:
    if mesh_axes is None:
      continue
    group = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    if any(a not in sizes for a in group) or used & set(group):
      continue
    group = tuple(a for a in group if sizes[a] > 1)
    size = _mesh_size(sizes, group)
    for i, name in enumerate(names):
      if name == logical and spec[i] is None and size > 1 and shape[i] % size == 0:
        spec[i] = group[0] if len(group) == 1 else group
        used |= set(group)
        break
  return PartitionSpec(*spec)


def _leaf_bytes(leaf, spec_sizes: Callable[[Any], int]) -> int:
  value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
  return math.prod(value.shape) * np.dtype(value.dtype).itemsize // spec_sizes(leaf)


def _split(leaf, rules: Rules, sizes: Mapping[str, int]) -> int:
  """Into how many pieces `rules` split one (boxed) leaf on a mesh of `sizes`."""
  if not isinstance(leaf, nn.Partitioned):
    return 1
  spec = spec_for(leaf.names, leaf.value.shape, rules, sizes)
  return math.prod(_mesh_size(sizes, s) for s in spec if s is not None)


def _is_boxed(x) -> bool:
  return isinstance(x, nn.Partitioned)


def best_fsdp_split(
  abstract_boxed: Any, rules: Rules, sizes: Mapping[str, int], devices: int
) -> tuple[int, int]:
  """(fsdp, fsdp_transpose) sizes, multiplying to `devices`, that leave the fewest state bytes on
  a device (ties: the larger "fsdp", the simpler collectives). `sizes`: the other mesh axes."""
  leaves = jax.tree.leaves(abstract_boxed, is_leaf=_is_boxed)
  best = None
  for fsdp in sorted((d for d in range(1, devices + 1) if devices % d == 0), reverse=True):
    plan = {**sizes, "fsdp": fsdp, "fsdp_transpose": devices // fsdp}
    held = sum(_leaf_bytes(leaf, lambda x, plan=plan: _split(x, rules, plan)) for leaf in leaves)
    if best is None or held < best[0] * 0.999:
      best = (held, (fsdp, devices // fsdp))
  return best[1]


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
  """Into how many pieces `batch_sharding(mesh)` splits the batch (the data x FSDP devices)."""
  axes = batch_sharding(mesh).spec[0]
  axes = (axes,) if isinstance(axes, str) else (axes or ())
  return math.prod(mesh.shape[a] for a in axes)


def activation_rules(strategy: str = "fsdp") -> list:
  """Rules for `nn.with_logical_constraint` inside the model under `strategy` (use with
  `nn.logical_axis_rules`)."""
  strategy_rules(strategy)  # unknown names fail here
  return list(ACTIVATION_RULES) + (list(TENSOR_ACTIVATION_RULES) if "tensor" in strategy else [])


def place_host_tree(host_tree: Any, shardings: Any) -> Any:
  """Host numpy arrays -> global jax.Arrays with `shardings`, each process writing only the
  slices its devices hold (nothing is gathered or broadcast)."""

  def place(array, target):
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, target, lambda index: array[index])

  return jax.tree.map(place, host_tree, shardings)


def state_report(abstract: Any, shardings: Any, strategy: str, mesh: MeshLike, top: int = 5):
  """How evenly a state is split: (bytes on the busiest device, an even share, their ratio, the
  `top` largest arrays held whole on every device as (path, bytes)).

  The even share is the state over the devices the strategy splits parameters over (its rules'
  mesh axes: none for data_parallel, which replicates by design), so 1.0 is a perfect split."""
  sizes = _sizes(mesh)
  split_axes = {a for _, m in strategy_rules(strategy) for a in ((m,) if isinstance(m, str) else m)}
  devices = math.prod(sizes[a] for a in split_axes if a in sizes)
  held, total, whole = 0, 0, []
  flat = jax.tree_util.tree_leaves_with_path(abstract)
  for (path, leaf), target in zip(flat, jax.tree.leaves(shardings), strict=True):
    size = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    total += size
    held += math.prod(target.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    if devices > 1 and target.is_fully_replicated and size:
      whole.append((jax.tree_util.keystr(path, simple=True, separator="/"), size))
  even = total / devices
  whole.sort(key=lambda x: -x[1])
  return held, even, held / even if even else 1.0, whole[:top]


def describe_whole(whole) -> str:
  """`state_report`'s arrays left whole, for a log line: "path (size), ..." or "none"."""

  def size(n):
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"

  return ", ".join(f"{path} ({size(n)})" for path, n in whole) or "none"
