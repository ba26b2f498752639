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
  as one matmul per tap on the zero-padded frames, summed: the channels stay the minor axis, so no
  transposes. A (taps, 1, 1) 3D conv computes the same; the TPU compiler lays it out with copies
  around it and estimates a paper-width ResBlock's forward + backward 2-20% slower at 64x64-16x16
  and at SR_l^t's 256x256 (16% faster at 8x8, the smallest level; scripts/op_variants.py).

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
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    frames, pad = x.shape[1], self.kernel_size // 2
    padded = jnp.pad(x, ((0, 0), (pad, pad)) + ((0, 0),) * (x.ndim - 2))
    y = sum(
      jnp.einsum("bf...c,cd->bf...d", padded[:, tap : tap + frames], kernel[tap])
      for tap in range(self.kernel_size)
    )
    return y + bias.astype(self.dtype)


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
