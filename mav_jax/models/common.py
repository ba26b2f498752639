"""Small building blocks shared by the UNet modules: typed aliases, norms and initialisers.

Every helper takes a compute `dtype` and a parameter `param_dtype` and names its parameter axes with
the constants of `mav_jax.models.axes`.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mav_jax.models import axes

Dtype = Any
Array = jax.Array

default_kernel_init = nn.initializers.lecun_normal()


def num_groups_for(channels: int, max_groups: int = 32) -> int:
  """The largest group count <= `max_groups` that divides `channels` (GroupNorm needs a divisor)."""
  return math.gcd(channels, max_groups)


class FrameGroupNorm(nn.Module):
  """GroupNorm with statistics per frame: a video model then equals its image model frame by frame.

  Attributes:
    max_groups: upper bound on the group count (the largest divisor of the channels is used).
    dtype: compute dtype; statistics are computed in float32 regardless.
    param_dtype: dtype of the scale and bias.
  """

  max_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Normalises `x` of shape [..., height, width, channels] over each image's (h, w, group)."""
    lead, (h, w, c) = x.shape[:-3], x.shape[-3:]
    y = nn.GroupNorm(
      num_groups=num_groups_for(c, self.max_groups),
      epsilon=1e-5,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      scale_init=axes.partitioned(nn.initializers.ones, axes.NORM),
      bias_init=axes.partitioned(nn.initializers.zeros, axes.NORM),
      name="norm",
    )(x.reshape((-1, h, w, c)))
    return y.reshape(lead + (h, w, c))


def layer_norm(name: str, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
  """A LayerNorm over the last axis whose scale and bias carry the NORM axis name."""
  return nn.LayerNorm(
    epsilon=1e-5,
    dtype=dtype,
    param_dtype=param_dtype,
    scale_init=axes.partitioned(nn.initializers.ones, axes.NORM),
    bias_init=axes.partitioned(nn.initializers.zeros, axes.NORM),
    name=name,
  )


def dense(
  features: int,
  in_axis: str,
  out_axis: str,
  *,
  name: str,
  dtype: Dtype,
  param_dtype: Dtype,
  zero_init: bool = False,
) -> nn.Dense:
  """A Dense layer with logically named kernel (in_axis, out_axis) and bias (out_axis)."""
  init = nn.initializers.zeros if zero_init else default_kernel_init
  return nn.Dense(
    features,
    dtype=dtype,
    param_dtype=param_dtype,
    kernel_init=axes.partitioned(init, in_axis, out_axis),
    bias_init=axes.partitioned(nn.initializers.zeros, out_axis),
    name=name,
  )


# Spatial conv implementations (stride 1, kernel > 1; strided convs ignore this, and 1x1 convs are
# always a matmul: XLA's CPU backend runs a 1x1 conv's forward + backward 5-8x slower than it):
#   "conv": nn.Conv;
#   "im2col": the k*k shifted copies of the input side by side in channels, then one matmul;
#   "auto": im2col on frames of at most IM2COL_MAX_PIXELS pixels, nn.Conv on larger ones.
# On XLA's CPU backend a 3x3 conv's forward + backward takes 1.0-1.1x im2col's time at 8x8 and
# 1.8-3.5x at 4x4, the same at 16x16, and 0.55x at 32x32 (README, performance).
SPATIAL_CONV_IMPLEMENTATIONS = ("conv", "im2col", "auto")
IM2COL_MAX_PIXELS = 64


class Im2colConv(nn.Module):
  """A stride-1 'SAME' 2D conv over the last three axes [..., h, w, c] as one matmul of the k*k
  shifted inputs side by side in channels (for k = 1, the input itself), with nn.Conv's parameters
  (kernel [k, k, in, out], bias [out]): checkpoints interchange.

  Attributes:
    features: output channels.
    kernel_size: odd spatial kernel size.
    kernel_init: kernel initialiser.
    bias_init: bias initialiser.
    max_pixels: if set, frames of more pixels (h * w) run as XLA's conv instead (same result).
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  features: int
  kernel_size: int
  kernel_init: Any
  bias_init: Any
  max_pixels: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = self.kernel_size
    if k % 2 != 1:
      raise ValueError(f"im2col conv needs an odd kernel size for 'SAME' padding, got {k}")
    shape = (k, k, x.shape[-1], self.features)
    kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    h, w, pad = x.shape[-3], x.shape[-2], k // 2
    if self.max_pixels is not None and h * w > self.max_pixels:
      flat = x.reshape((-1,) + x.shape[-3:])
      y = jax.lax.conv_general_dilated(
        flat, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
      )
      return y.reshape(x.shape[:-1] + (self.features,)) + bias
    padded = jnp.pad(x, ((0, 0),) * (x.ndim - 3) + ((pad, pad), (pad, pad), (0, 0)))
    shifted = [padded[..., i : i + h, j : j + w, :] for i in range(k) for j in range(k)]
    columns = shifted[0] if k == 1 else jnp.concatenate(shifted, axis=-1)
    return jnp.einsum("...c,cd->...d", columns, kernel.reshape(-1, self.features)) + bias


def spatial_conv(
  features: int,
  *,
  name: str,
  dtype: Dtype,
  param_dtype: Dtype,
  kernel_size: int = 3,
  strides: int = 1,
  zero_init: bool = False,
  implementation: str = "conv",
) -> nn.Module:
  """A 2D convolution applied to every frame (leading axes are batch axes), 'SAME' padding.
  `implementation` is one of SPATIAL_CONV_IMPLEMENTATIONS (same parameters for all)."""
  if implementation not in SPATIAL_CONV_IMPLEMENTATIONS:
    raise ValueError(
      f"unknown spatial conv implementation {implementation!r}; choose one of "
      f"{SPATIAL_CONV_IMPLEMENTATIONS}"
    )
  init = nn.initializers.zeros if zero_init else default_kernel_init
  inits = dict(
    kernel_init=axes.partitioned(
      init, axes.CONV_H, axes.CONV_W, axes.CHANNELS_IN, axes.CHANNELS_OUT
    ),
    bias_init=axes.partitioned(nn.initializers.zeros, axes.CHANNELS_OUT),
  )
  if strides == 1 and (kernel_size == 1 or implementation != "conv"):
    max_pixels = IM2COL_MAX_PIXELS if implementation == "auto" and kernel_size > 1 else None
    kw = dict(max_pixels=max_pixels, dtype=dtype, param_dtype=param_dtype, name=name)
    return Im2colConv(features, kernel_size, **kw, **inits)
  return nn.Conv(
    features,
    (kernel_size, kernel_size),
    strides=(strides, strides),
    padding="SAME",
    dtype=dtype,
    param_dtype=param_dtype,
    name=name,
    **inits,
  )
