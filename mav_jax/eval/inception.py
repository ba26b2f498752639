"""InceptionV3 as FID and the Inception Score use it: a Flax port of pytorch-fid's FID Inception.

pytorch-fid's `fid_inception_v3()` is torchvision's Inception3 with 1008 classes and four patched
block types, so that its weights file (`pt_inception-2015-12-05-6726825d.pth`, a port of the
TensorFlow graph `inception-2015-12-05` behind the original FID and Inception Score code) gives the
TF network's outputs:

  FIDInceptionA, FIDInceptionC: the pool branch averages without counting the zero padding;
  FIDInceptionE_1 (Mixed_7b): the same;
  FIDInceptionE_2 (Mixed_7c): the pool branch takes a max instead of an average.

Inference only: batch norm (eps 0.001) uses the running statistics. Layout is NHWC; parameters are
float32, the compute dtype a field. The weights are never downloaded: `load_pt_inception` reads a
local copy of the .pth file (torch is imported only there) and `convert_state_dict` maps any
name -> array mapping of it onto our variables.
"""

import functools
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mav_jax import errors
from mav_jax.models.common import Array, Dtype

IMAGE_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
BN_EPSILON = 1e-3  # torchvision's BasicConv2d: BatchNorm2d(eps=0.001)
# The smallest input that still leaves a 1 x 1 map for the final average pool.
MIN_PIXELS = 75

# Our leaf names -> torch's: Conv kernel and BatchNorm scale are both torch's `weight`.
_TORCH_LEAF = {
  "kernel": "weight",
  "scale": "weight",
  "bias": "bias",
  "mean": "running_mean",
  "var": "running_var",
}


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


def resize_bilinear(images: Array, size: tuple[int, int]) -> Array:
  """torch's F.interpolate(mode="bilinear", align_corners=False) on [n, h, w, c].

  Half-pixel centres, edge samples clamped and no antialiasing when shrinking (jax.image.resize's
  default antialiasing would blur downscaled images, unlike pytorch-fid).

  Args:
    images: [n, h, w, c] floats.
    size: the (height, width) to resize to.

  Returns:
    [n, size[0], size[1], c] in float32.
  """
  n, _, _, c = images.shape
  shape = (n, *size, c)
  return jax.image.resize(images.astype(jnp.float32), shape, method="bilinear", antialias=False)


def _avg_pool_3x3(x: Array) -> Array:
  # The FID blocks' patch: TF's average pool leaves the padded zeros out of the mean.
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: Array, stride: int) -> Array:
  padding = ((1, 1), (1, 1)) if stride == 1 else "VALID"
  return nn.max_pool(x, (3, 3), (stride, stride), padding=padding)


class BasicConv2d(nn.Module):
  """torchvision's BasicConv2d: Conv2d (no bias), batch norm (running statistics), ReLU.

  Attributes:
    features: output channels.
    kernel: (h, w) kernel size.
    strides: (h, w) strides.
    padding: (h, w) zero padding on each side, as torch's Conv2d `padding`.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    precision: precision of the convolution.
  """

  features: int
  kernel: tuple[int, int] = (1, 1)
  strides: tuple[int, int] = (1, 1)
  padding: tuple[int, int] = (0, 0)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    ph, pw = self.padding
    x = nn.Conv(
      self.features,
      self.kernel,
      self.strides,
      padding=((ph, ph), (pw, pw)),
      use_bias=False,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      precision=self.precision,
      name="conv",
    )(x)
    x = nn.BatchNorm(
      use_running_average=True,
      epsilon=BN_EPSILON,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="bn",
    )(x)
    return nn.relu(x)


def _conv(
  parent: nn.Module,
  name: str,
  features: int,
  kernel: int | tuple[int, int] = 1,
  padding: int | tuple[int, int] = 0,
  strides: int = 1,
) -> BasicConv2d:
  """A BasicConv2d child of `parent` (called inside its compact method), with its dtypes."""
  return BasicConv2d(
    features,
    _pair(kernel),
    _pair(strides),
    _pair(padding),
    dtype=parent.dtype,
    param_dtype=parent.param_dtype,
    precision=parent.precision,
    name=name,
  )


class InceptionA(nn.Module):
  """pytorch-fid's FIDInceptionA (Mixed_5b-d): 1x1; 1x1-5x5; 1x1-3x3-3x3; avg pool-1x1.

  Attributes:
    pool_features: output channels of the pool branch.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    precision: precision of the convolutions.
  """

  pool_features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(_conv, self)
    b1 = conv("branch1x1", 64)(x)
    b5 = conv("branch5x5_2", 64, 5, padding=2)(conv("branch5x5_1", 48)(x))
    b3 = conv("branch3x3dbl_1", 64)(x)
    b3 = conv("branch3x3dbl_2", 96, 3, padding=1)(b3)
    b3 = conv("branch3x3dbl_3", 96, 3, padding=1)(b3)
    bp = conv("branch_pool", self.pool_features)(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """torchvision's InceptionB (Mixed_6a, a stride-2 reduction): 3x3; 1x1-3x3-3x3; max pool.

  Attributes:
    dtype: compute dtype.
    param_dtype: parameter dtype.
    precision: precision of the convolutions.
  """

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(_conv, self)
    b3 = conv("branch3x3", 384, 3, strides=2)(x)
    bd = conv("branch3x3dbl_1", 64)(x)
    bd = conv("branch3x3dbl_2", 96, 3, padding=1)(bd)
    bd = conv("branch3x3dbl_3", 96, 3, strides=2)(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2)], axis=-1)


class InceptionC(nn.Module):
  """pytorch-fid's FIDInceptionC (Mixed_6b-e): factorised 7x7 branches and an avg pool-1x1.

  Attributes:
    channels_7x7: width inside the 7x7 branches.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    precision: precision of the convolutions.
  """

  channels_7x7: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(_conv, self)
    c7 = self.channels_7x7
    row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) of a 1x7 and a 7x1 conv
    b1 = conv("branch1x1", 192)(x)
    b7 = conv("branch7x7_1", c7)(x)
    b7 = conv("branch7x7_2", c7, *row)(b7)
    b7 = conv("branch7x7_3", 192, *col)(b7)
    bd = conv("branch7x7dbl_1", c7)(x)
    bd = conv("branch7x7dbl_2", c7, *col)(bd)
    bd = conv("branch7x7dbl_3", c7, *row)(bd)
    bd = conv("branch7x7dbl_4", c7, *col)(bd)
    bd = conv("branch7x7dbl_5", 192, *row)(bd)
    bp = conv("branch_pool", 192)(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """torchvision's InceptionD (Mixed_7a, a stride-2 reduction): 1x1-3x3; 1x1-1x7-7x1-3x3; max pool.

  Attributes:
    dtype: compute dtype.
    param_dtype: parameter dtype.
    precision: precision of the convolutions.
  """

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(_conv, self)
    b3 = conv("branch3x3_2", 320, 3, strides=2)(conv("branch3x3_1", 192)(x))
    b7 = conv("branch7x7x3_1", 192)(x)
    b7 = conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
    b7 = conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
    b7 = conv("branch7x7x3_4", 192, 3, strides=2)(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class InceptionE(nn.Module):
  """pytorch-fid's FIDInceptionE_1 (pool="avg", Mixed_7b) or FIDInceptionE_2 (pool="max", Mixed_7c).

  Attributes:
    pool: "avg" (padding left out of the mean) or "max", the pool before the pool branch's 1x1.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    precision: precision of the convolutions.
  """

  pool: str
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.pool not in ("avg", "max"):
      raise errors.UserError(f'pool must be "avg" or "max", got {self.pool!r}')
    conv = functools.partial(_conv, self)
    row, col = ((1, 3), (0, 1)), ((3, 1), (1, 0))  # (kernel, padding) of a 1x3 and a 3x1 conv
    b1 = conv("branch1x1", 320)(x)
    b3 = conv("branch3x3_1", 384)(x)
    b3 = [conv("branch3x3_2a", 384, *row)(b3), conv("branch3x3_2b", 384, *col)(b3)]
    bd = conv("branch3x3dbl_1", 448)(x)
    bd = conv("branch3x3dbl_2", 384, 3, padding=1)(bd)
    bd = [conv("branch3x3dbl_3a", 384, *row)(bd), conv("branch3x3dbl_3b", 384, *col)(bd)]
    pooled = _avg_pool_3x3(x) if self.pool == "avg" else _max_pool_3x3(x, 1)
    bp = conv("branch_pool", 192)(pooled)
    return jnp.concatenate([b1, *b3, *bd, bp], axis=-1)


class Logits(nn.Module):
  """torchvision's `fc` (a Linear layer), returning its output both without and with the bias.

  Attributes:
    num_classes: output size.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    precision: precision of the matrix product.
  """

  num_classes: int = NUM_CLASSES
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    shape = (x.shape[-1], self.num_classes)
    kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.num_classes,), self.param_dtype)
    unbiased = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype), precision=self.precision)
    return unbiased, unbiased + bias.astype(self.dtype)


class InceptionV3(nn.Module):
  """pytorch-fid's FID InceptionV3 (inference only), with torchvision's parameter names.

  Images in [0, 1] are resized to `image_size` as pytorch-fid does (torch's bilinear
  F.interpolate with align_corners=False, no antialiasing) and scaled to [-1, 1]. (torch-fidelity
  resizes like TF1's resize_bilinear instead, so its features of resized images differ slightly.)

  The 1008 classes are those of the TF graph: outputs 1-1000 are the ImageNet-2012 classes in the
  graph's own synset order, 0 is a background class and 1001-1007 are unused. The Inception Score
  is a softmax over all 1008; the original code (and torch-fidelity's `logits_unbiased`, which
  torchmetrics uses too) leaves out the fc bias, so feed `logits_unbiased` to
  `mav_jax.eval.scores.InceptionScore` to match them.

  Attributes:
    num_classes: size of the fc layer (1008 for the FID weights).
    image_size: images are resized to image_size x image_size; None feeds them as they are (at
      least 75 x 75).
    dtype: compute dtype (e.g. bfloat16); outputs are float32.
    param_dtype: parameter dtype.
    precision: precision of the convolutions; HIGHEST keeps float32 features float32-accurate on
      TPUs, whose default precision rounds the operands to bfloat16.
  """

  num_classes: int = NUM_CLASSES
  image_size: int | None = IMAGE_SIZE
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, images: Array) -> dict[str, Array]:
    """Features of a batch of images.

    Args:
      images: [n, h, w, 3] RGB in [0, 1], any size.

    Returns:
      'pool': [n, 2048] pool3, the global average of the last block (FID's features).
      'logits': [n, num_classes] the fc layer, pool @ W + b (torchvision's forward).
      'logits_unbiased': [n, num_classes] pool @ W, what the reference Inception Score takes.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
      raise errors.UserError(f"images must be [n, h, w, 3], got shape {tuple(images.shape)}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise errors.UserError(
        f"images must be floats in [0, 1] (divide uint8 by 255), got {images.dtype}"
      )
    x = images.astype(jnp.float32)
    size = (self.image_size, self.image_size)
    if self.image_size is not None and x.shape[1:3] != size:
      x = resize_bilinear(x, size)
    if min(x.shape[1:3]) < MIN_PIXELS:
      raise errors.UserError(
        f"InceptionV3 needs images of at least {MIN_PIXELS} x {MIN_PIXELS} pixels after "
        f"resizing, got {x.shape[1]} x {x.shape[2]}"
      )
    x = (2.0 * x - 1.0).astype(self.dtype)  # pytorch-fid's normalize_input

    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    conv = functools.partial(_conv, self)
    x = conv("Conv2d_1a_3x3", 32, 3, strides=2)(x)
    x = conv("Conv2d_2a_3x3", 32, 3)(x)
    x = conv("Conv2d_2b_3x3", 64, 3, padding=1)(x)
    x = _max_pool_3x3(x, 2)
    x = conv("Conv2d_3b_1x1", 80)(x)
    x = conv("Conv2d_4a_3x3", 192, 3)(x)
    x = _max_pool_3x3(x, 2)
    for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = InceptionA(pool_features, **kw, name=name)(x)
    x = InceptionB(**kw, name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, **kw, name=name)(x)
    x = InceptionD(**kw, name="Mixed_7a")(x)
    x = InceptionE("avg", **kw, name="Mixed_7b")(x)
    x = InceptionE("max", **kw, name="Mixed_7c")(x)

    pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # AdaptiveAvgPool2d((1, 1))
    unbiased, logits = Logits(self.num_classes, **kw, name="fc")(pool)
    return {
      "pool": pool,
      "logits": logits.astype(jnp.float32),
      "logits_unbiased": unbiased.astype(jnp.float32),
    }


@functools.cache
def _torch_layout() -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """torch key -> (our variable path, torch shape), read off the module's abstract variables."""
  shapes = jax.eval_shape(
    InceptionV3(image_size=None).init,
    jax.random.key(0),
    jax.ShapeDtypeStruct((1, MIN_PIXELS, MIN_PIXELS, 3), jnp.float32),
  )
  layout = {}
  for path, leaf in traverse_util.flatten_dict(shapes).items():
    _, *modules, name = path  # (collection, module names..., leaf)
    shape = leaf.shape
    if name == "kernel" and len(shape) == 4:  # Conv: ours [h, w, in, out], torch's [out, in, h, w]
      shape = (shape[3], shape[2], shape[0], shape[1])
    elif name == "kernel":  # Linear: ours [in, out], torch's [out, in]
      shape = shape[::-1]
    layout[".".join([*modules, _TORCH_LEAF[name]])] = (path, shape)
  return layout


def torch_parameter_shapes() -> dict[str, tuple[int, ...]]:
  """The tensors `convert_state_dict` expects: torch name -> shape (num_batches_tracked aside)."""
  return {key: shape for key, (_, shape) in _torch_layout().items()}


def _ignored(key: str) -> bool:
  # BatchNorm's step counter, and the auxiliary classifier that FID's network leaves out.
  return key.endswith("num_batches_tracked") or key.startswith("AuxLogits.")


def convert_state_dict(state_dict: Mapping[str, Any]) -> dict[str, dict]:
  """Maps pytorch-fid's FID Inception state dict onto the variables of `InceptionV3`.

  Args:
    state_dict: name -> tensor (numpy arrays or torch tensors) with torchvision's names, e.g.
      `Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`, `fc.weight`: the
      contents of pt_inception-2015-12-05-6726825d.pth. num_batches_tracked and AuxLogits.* are
      ignored.

  Returns:
    {'params': ..., 'batch_stats': ...} of float32 numpy arrays, for `InceptionV3().apply`.

  Raises:
    ValueError: naming the missing and unexpected tensors, or a tensor of the wrong shape.
  """
  state = {k: v for k, v in state_dict.items() if not _ignored(k)}
  layout = _torch_layout()
  missing = [k for k in layout if k not in state]
  unexpected = sorted(set(state) - set(layout))
  if missing or unexpected:

    def names(keys: list[str]) -> str:
      return f"{keys[:8]}{' ...' if len(keys) > 8 else ''} ({len(keys)} in all)"

    raise errors.UserError(
      f"not pytorch-fid's FID Inception state dict: missing {names(missing)}, "
      f"unexpected {names(unexpected)}"
    )

  flat = {}
  for key, (path, shape) in layout.items():
    value = state[key]
    if hasattr(value, "detach"):  # a torch tensor; numpy() needs float32 on the CPU
      value = value.detach().float().cpu().numpy()
    value = np.asarray(value, np.float32)
    if value.shape != shape:
      raise errors.UserError(f"{key} has shape {value.shape}, expected {shape}")
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)
    elif value.ndim == 2:
      value = value.T
    flat[path] = np.ascontiguousarray(value)
  return traverse_util.unflatten_dict(flat)


def load_pt_inception(path: str) -> dict[str, dict]:
  """Reads pytorch-fid's FID Inception weights from a local file.

  Args:
    path: a local copy of pt_inception-2015-12-05-6726825d.pth (nothing is downloaded).

  Returns:
    {'params': ..., 'batch_stats': ...} for `InceptionV3().apply` (or mav_jax.eval.extractors).
  """
  if not os.path.isfile(path):
    raise errors.UserFileNotFoundError(
      f"no Inception weights at {path} (pytorch-fid's pt_inception-2015-12-05-6726825d.pth)"
    )
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      f"reading {path} needs PyTorch (pip install torch); or pass its tensors as numpy arrays to "
      "convert_state_dict"
    ) from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(state, Mapping):
    raise errors.UserError(f"{path} holds a {type(state).__name__}, not a state dict")
  return convert_state_dict(state)
