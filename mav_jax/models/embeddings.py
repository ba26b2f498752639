"""Conditioning embeddings: diffusion time, scalar conditions (fps, frame skip, noise level), vectors.

All of them map into one `[batch, embed_dim]` vector that residual blocks turn into scale and shift.
"""

import math

import flax.linen as nn
import jax.numpy as jnp

from mav_jax import errors
from mav_jax.models import axes
from mav_jax.models.common import Array, Dtype, dense, layer_norm


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


class UnclipProjection(nn.Module):
  """unCLIP's (Karlo's) decoder conditioning, diffusers' `UnCLIPTextProjModel`: from the raw CLIP
  image embedding, the raw CLIP text embedding and the text tower's token features, (1) a vector
  added to the time embedding, `text_time_proj(text) + image_time_proj(image)`, and (2) the
  context tokens the attention blocks read: 4 tokens projected from the image embedding (token k,
  channel c = `image_tokens_proj(image)[c * 4 + k]`: diffusers' channel-major reshape) followed by
  `context_norm(context_proj(tokens))`, with the mask extended by 4 valid entries.

  Rows whose `drop_image` is True use the learned `null_image_embedding` instead of the image
  embedding (the unconditional branch of classifier-free guidance; Karlo's
  `learned_classifier_free_guidance_embeddings`).

  Attributes:
    embed_dim: width of the time embedding the first output is added to.
    context_dim: width of the output context tokens (the attention blocks' context width).
    image_tokens: tokens projected from the image embedding (4 in Karlo).
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  embed_dim: int
  context_dim: int
  image_tokens: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    image_embedding: Array,
    text_embedding: Array,
    tokens: Array,
    token_mask: Array | None,
    drop_image: Array | None = None,
  ) -> tuple[Array, Array, Array]:
    """image_embedding [b, d], text_embedding [b, d], tokens [b, s, w], token_mask [b, s] (True =
    valid; None: all valid), drop_image [b] bool -> (time addition [b, embed_dim], context
    [b, image_tokens + s, context_dim], context mask [b, image_tokens + s])."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, d = image_embedding.shape
    null = self.param(
      "null_image_embedding",
      axes.partitioned(nn.initializers.zeros, axes.CONTEXT),
      (d,),
      self.param_dtype,
    )
    if drop_image is not None:
      image_embedding = jnp.where(
        drop_image[:, None], null[None].astype(jnp.float32), image_embedding
      )
    image = image_embedding.astype(self.dtype)
    text = text_embedding.astype(self.dtype)
    add = dense(self.embed_dim, axes.CONTEXT, axes.EMBED, name="text_time_proj", **kw)(text)
    add = add + dense(self.embed_dim, axes.CONTEXT, axes.EMBED, name="image_time_proj", **kw)(image)
    extra = dense(
      self.image_tokens * self.context_dim, axes.CONTEXT, axes.MLP, name="image_tokens_proj", **kw
    )(image)
    extra = extra.reshape(b, self.context_dim, self.image_tokens).swapaxes(1, 2)
    ctx = dense(self.context_dim, axes.CONTEXT, axes.CHANNELS_OUT, name="context_proj", **kw)(
      tokens.astype(self.dtype)
    )
    ctx = layer_norm("context_norm", **kw)(ctx)
    if token_mask is None:
      token_mask = jnp.ones(tokens.shape[:2], bool)
    mask = jnp.concatenate([jnp.ones((b, self.image_tokens), bool), token_mask.astype(bool)], 1)
    return add, jnp.concatenate([extra, ctx.astype(extra.dtype)], axis=1), mask
