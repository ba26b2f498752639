"""Pseudo-3D convolution: a 2D conv on every frame, then a 1D conv over time initialised to identity.

Conv_P3D(h) = Conv1D_time(Conv2D_space(h)) (Make-A-Video, Sec. 3.2). The spatial conv is the one an
image model already has; the temporal conv is new, and starts as a dirac kernel with zero bias so the
video model initially equals the image model applied frame by frame.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mav_jax import errors
from mav_jax.models import axes
from mav_jax.models.common import Array, Dtype, spatial_conv


def dirac_init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> Array:
  """Identity kernel of shape [taps, in, out]: the centre tap is the identity matrix."""
  del key
  taps, c_in, c_out = shape
  if c_in != c_out:
    raise errors.UserError(
      f"a dirac (identity) kernel needs in == out channels, got {c_in} != {c_out}"
    )
  return jnp.zeros(shape, dtype).at[taps // 2].set(jnp.eye(c_in, dtype=dtype))


class TemporalConv(nn.Module):
  """1D convolution over the frame axis of a [batch, frames, height, width, channels] video.

  The kernel is stored as [taps, channels_in, channels_out] and initialised to the identity. It runs
  as a 1D conv over the frames of [batch * height * width, frames, channels] (frames moved next to
  the channels): the TPU compiler's estimate for a paper-width ResBlock's forward + backward is
  4-14% below one matmul per tap on the zero-padded frames at D^t's 64x64-8x8 levels and 25% below
  at SR_l^t's 256x256, and below a (taps, 1, 1) 3D conv, which it lays out with copies around it
  (scripts/op_variants.py temporal_conv, docs/benchmarks.md "Per op").

  Attributes:
    kernel_size: number of temporal taps (odd).
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  kernel_size: int = 3
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.kernel_size % 2 != 1:
      raise errors.UserError(
        f"temporal kernel_size must be odd to keep frames aligned, got {self.kernel_size}"
      )
    c = x.shape[-1]
    kernel = self.param(
      "kernel",
      axes.partitioned(dirac_init, axes.CONV_T, axes.CHANNELS_IN, axes.CHANNELS_OUT),
      (self.kernel_size, c, c),
      self.param_dtype,
    )
    bias = self.param(
      "bias", axes.partitioned(nn.initializers.zeros, axes.CHANNELS_OUT), (c,), self.param_dtype
    )
    y = self.convolve(x.astype(self.dtype), kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)

  def convolve(self, x: Array, kernel: Array) -> Array:
    """The convolution without its bias (scripts/op_variants.py swaps in the variants it was
    measured against)."""
    # [b, f, *space, c] -> [b * prod(space), f, c]: the batch stays the major axis (the only one the
    # sharding strategies split besides the channels), so the merge needs no communication.
    moved = jnp.moveaxis(x, 1, -2)
    frames = moved.reshape((-1,) + x.shape[1:2] + x.shape[-1:])
    y = jax.lax.conv_general_dilated(
      frames, kernel, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")
    )
    return jnp.moveaxis(y.reshape(moved.shape), -2, 1)


class Pseudo3DConv(nn.Module):
  """Spatial 2D conv per frame followed (in video mode) by the identity-initialised temporal conv.

  Attributes:
    features: output channels.
    kernel_size: spatial kernel size.
    temporal_kernel_size: temporal taps.
    image_mode: skip the temporal conv (frames are independent images).
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  features: int
  kernel_size: int = 3
  temporal_kernel_size: int = 3
  image_mode: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps [b, f, h, w, c_in] to [b, f, h, w, features]."""
    y = spatial_conv(
      self.features,
      kernel_size=self.kernel_size,
      name="spatial",
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )(x)
    if self.image_mode:
      return y
    return TemporalConv(
      self.temporal_kernel_size,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="temporal_conv",
    )(y)


class Downsample(nn.Module):
  """Halves height and width with a stride-2 spatial conv (frames are kept)."""

  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return spatial_conv(
      self.features, strides=2, name="conv", dtype=self.dtype, param_dtype=self.param_dtype
    )(x)


class Upsample(nn.Module):
  """Doubles height and width (nearest neighbour) then applies a spatial conv."""

  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=-3), 2, axis=-2)
    return spatial_conv(self.features, name="conv", dtype=self.dtype, param_dtype=self.param_dtype)(
      x
    )
