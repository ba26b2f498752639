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


class PointwiseConv(nn.Module):
  """A 1x1 conv over the last axis [..., c] as one matmul, with nn.Conv's parameters (kernel
  [1, 1, in, out], bias [out]): checkpoints interchange. XLA's CPU backend ran a 1x1 conv's forward
  + backward 5-8x slower than the same matmul (docs/benchmarks.md); on TPU and GPU the two compile
  to the same dot.

  Attributes:
    features: output channels.
    kernel_init: kernel initialiser.
    bias_init: bias initialiser.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  features: int
  kernel_init: Any
  bias_init: Any
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    shape = (1, 1, x.shape[-1], self.features)
    kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return jnp.einsum("...c,cd->...d", x, kernel[0, 0]) + bias


def spatial_conv(
  features: int,
  *,
  name: str,
  dtype: Dtype,
  param_dtype: Dtype,
  kernel_size: int = 3,
  strides: int = 1,
  zero_init: bool = False,
) -> nn.Module:
  """A 2D convolution applied to every frame (leading axes are batch axes), 'SAME' padding; a
  stride-1 1x1 conv is a PointwiseConv (the same parameters)."""
  init = nn.initializers.zeros if zero_init else default_kernel_init
  inits = dict(
    kernel_init=axes.partitioned(
      init, axes.CONV_H, axes.CONV_W, axes.CHANNELS_IN, axes.CHANNELS_OUT
    ),
    bias_init=axes.partitioned(nn.initializers.zeros, axes.CHANNELS_OUT),
  )
  if strides == 1 and kernel_size == 1:
    return PointwiseConv(features, dtype=dtype, param_dtype=param_dtype, name=name, **inits)
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
