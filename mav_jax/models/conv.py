"""Pseudo-3D convolution: a 2D conv on every frame, then a 1D conv over time initialised to identity.

Conv_P3D(h) = Conv1D_time(Conv2D_space(h)) (Make-A-Video, Sec. 3.2). The spatial conv is the one an
image model already has; the temporal conv is new, and starts as a dirac kernel with zero bias so the
video model initially equals the image model applied frame by frame.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mav_jax.models import axes
from mav_jax.models.common import Array, Dtype, spatial_conv


def dirac_init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> Array:
  """Identity kernel of shape [taps, in, out]: the centre tap is the identity matrix."""
  del key
  taps, c_in, c_out = shape
  if c_in != c_out:
    raise ValueError(f"a dirac (identity) kernel needs in == out channels, got {c_in} != {c_out}")
  return jnp.zeros(shape, dtype).at[taps // 2].set(jnp.eye(c_in, dtype=dtype))


TEMPORAL_CONV_IMPLEMENTATIONS = ("conv", "matmul")


class TemporalConv(nn.Module):
  """1D convolution over the frame axis of a [batch, frames, height, width, channels] video.

  The kernel is stored as [taps, channels_in, channels_out] and initialised to the identity. Two
  implementations of the same function (same parameters, checkpoints interchange):
    "conv": a (taps, 1, 1) 3D conv, no transposes (what accelerators compile well);
    "matmul": one channel matmul per tap on the frame-shifted input, summed. XLA's CPU backend has
      no fast 3D conv: at the throughput benchmark's shapes this is 1.3-1.9x faster there, forward
      and backward (README, performance section).

  Attributes:
    kernel_size: number of temporal taps (odd).
    implementation: "conv" or "matmul".
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  kernel_size: int = 3
  implementation: str = "conv"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.kernel_size % 2 != 1:
      raise ValueError(
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
    if self.implementation == "matmul":
      f, pad = x.shape[1], self.kernel_size // 2
      padded = jnp.pad(x, ((0, 0), (pad, pad)) + ((0, 0),) * (x.ndim - 2))
      y = sum(
        jnp.einsum("bfhwc,cd->bfhwd", padded[:, i : i + f], kernel[i])
        for i in range(self.kernel_size)
      )
    elif self.implementation == "conv":
      y = jax.lax.conv_general_dilated(
        x,
        kernel[:, None, None],
        window_strides=(1, 1, 1),
        padding="SAME",
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
      )
    else:
      raise ValueError(
        f"unknown temporal conv implementation {self.implementation!r}; choose one of "
        f"{TEMPORAL_CONV_IMPLEMENTATIONS}"
      )
    return y + bias.astype(self.dtype)


class Pseudo3DConv(nn.Module):
  """Spatial 2D conv per frame followed (in video mode) by the identity-initialised temporal conv.

  Attributes:
    features: output channels.
    kernel_size: spatial kernel size.
    temporal_kernel_size: temporal taps.
    temporal_conv: the temporal conv's implementation ("conv" or "matmul", TemporalConv).
    spatial_conv: the spatial conv's implementation (common.SPATIAL_CONV_IMPLEMENTATIONS).
    image_mode: skip the temporal conv (frames are independent images).
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  features: int
  kernel_size: int = 3
  temporal_kernel_size: int = 3
  temporal_conv: str = "conv"
  spatial_conv: str = "conv"
  image_mode: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps [b, f, h, w, c_in] to [b, f, h, w, features]."""
    y = spatial_conv(
      self.features,
      kernel_size=self.kernel_size,
      implementation=self.spatial_conv,
      name="spatial",
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )(x)
    if self.image_mode:
      return y
    return TemporalConv(
      self.temporal_kernel_size,
      self.temporal_conv,
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
  """Doubles height and width (nearest neighbour) then applies a spatial conv (`spatial_conv`: its
  implementation, common.SPATIAL_CONV_IMPLEMENTATIONS)."""

  features: int
  spatial_conv: str = "conv"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=-3), 2, axis=-2)
    return spatial_conv(
      self.features,
      implementation=self.spatial_conv,
      name="conv",
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )(x)


class TemporalDownsample(nn.Module):
  """Halves the frames: each pair of frames, side by side in channels, through a learned
  projection that starts as their mean (so a model gaining it starts out close to one without)."""

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, f, h, w, c = x.shape
    pairs = x.reshape(b, f // 2, 2, h, w, c)
    pairs = jnp.moveaxis(pairs, 2, -2).reshape(b, f // 2, h, w, 2 * c)

    def mean_init(key, shape, dtype):
      del key
      return jnp.concatenate([jnp.eye(c), jnp.eye(c)], axis=0).astype(dtype) / 2

    return nn.Dense(
      c,
      kernel_init=axes.partitioned(mean_init, axes.CHANNELS_IN, axes.CHANNELS_OUT),
      bias_init=axes.partitioned(nn.initializers.zeros, axes.CHANNELS_OUT),
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="proj",
    )(pairs)


class TemporalUpsample(nn.Module):
  """Doubles the frames: a learned projection to two frames' channels that starts as a repeat."""

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, f, h, w, c = x.shape

    def repeat_init(key, shape, dtype):
      del key
      return jnp.concatenate([jnp.eye(c), jnp.eye(c)], axis=1).astype(dtype)

    y = nn.Dense(
      2 * c,
      kernel_init=axes.partitioned(repeat_init, axes.CHANNELS_IN, axes.CHANNELS_OUT),
      bias_init=axes.partitioned(nn.initializers.zeros, axes.CHANNELS_OUT),
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="proj",
    )(x)
    y = jnp.moveaxis(y.reshape(b, f, h, w, 2, c), 4, 2)
    return y.reshape(b, 2 * f, h, w, c)
