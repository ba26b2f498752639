"""Conditioning embeddings: diffusion time, scalar conditions (fps, frame skip, noise level), vectors.

All of them map into one `[batch, embed_dim]` vector that residual blocks turn into scale and shift.
"""

import math

import flax.linen as nn
import jax.numpy as jnp

from mav_jax import errors
from mav_jax.models import axes
from mav_jax.models.common import Array, Dtype, dense


def sinusoidal_embedding(x: Array, dim: int, max_period: float = 10_000.0) -> Array:
  """Transformer-style sinusoidal features of an array of scalars [...] -> [..., dim]."""
  if dim % 2:
    raise errors.UserError(f"sinusoidal embedding dim must be even, got {dim}")
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = x.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class EmbeddingMLP(nn.Module):
  """Two-layer SiLU MLP into the conditioning embedding width (hidden axis MLP, output EMBED).

  Attributes:
    features: output width (the UNet's embedding width).
    in_axis: logical name of the input axis.
    zero_init_out: zero-initialise the last layer, so adding this condition to a trained model
      leaves its output unchanged until training moves it (used for fps, frame skip, ...).
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  features: int
  in_axis: str = axes.EMBED_IN
  zero_init_out: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = dense(self.features, self.in_axis, axes.MLP, name="fc1", **kw)(x)
    h = nn.silu(h)
    return dense(
      self.features, axes.MLP, axes.EMBED, name="fc2", zero_init=self.zero_init_out, **kw
    )(h)


def space_time_features(frames: int, height: int, width: int, octaves: int = 4) -> Array:
  """Sinusoidal features of absolute (y, x, frame) positions, each scaled to [0, 1]:
  [height, width, frames, 3 * 2 * octaves] (sin and cos at `octaves` doubling frequencies)."""
  grid = jnp.stack(
    jnp.meshgrid(
      jnp.linspace(0.0, 1.0, height),
      jnp.linspace(0.0, 1.0, width),
      jnp.linspace(0.0, 1.0, frames),
      indexing="ij",
    ),
    axis=-1,
  )
  angles = grid[..., None] * (jnp.pi * 2.0 ** jnp.arange(octaves))  # [h, w, f, 3, octaves]
  features = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return features.reshape(height, width, frames, 3 * 2 * octaves)
