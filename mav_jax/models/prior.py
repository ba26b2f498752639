"""The diffusion prior P (DALL-E 2 style): CLIP text -> CLIP image embedding.

A transformer reads the sequence [caption token features (from CLIP's text tower), the text
embedding, the diffusion time, the noisy image embedding, a learned query] and the query's output is
the prediction (of the clean image embedding, DALL-E 2's choice, or of any `diffusion.target`).
Padding tokens are masked out of attention; the condition is the tokens and the text embedding
together, dropped together for classifier-free guidance.
"""

import flax.linen as nn
import jax.numpy as jnp

from mav_jax import errors
from mav_jax.models import axes
from mav_jax.models.clip import Block, TowerConfig
from mav_jax.models.common import Array, Dtype, dense, layer_norm
from mav_jax.models.embeddings import EmbeddingMLP, sinusoidal_embedding

TIME_SCALE = 1000.0


class DiffusionPrior(nn.Module):
  """Predicts the image embedding from its noisy version and the caption.

  Attributes:
    embed_dim: CLIP's joint embedding width (input and output of the prior).
    width: transformer width.
    layers: transformer blocks.
    heads: attention heads.
    max_tokens: caption length (positions are learned for max_tokens + 4 entries).
    activation: MLP activation ("gelu" or "quick_gelu").
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  embed_dim: int
  width: int = 512
  layers: int = 6
  heads: int = 8
  max_tokens: int = 77
  activation: str = "gelu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    z: Array,
    t: Array,
    text_embedding: Array,
    token_features: Array,
    token_mask: Array,
  ) -> Array:
    """z [b, d] noisy image embeddings, t [b] times, text_embedding [b, d], token_features
    [b, l, w_text], token_mask [b, l] (True for real tokens) -> prediction [b, d] (float32)."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, length = token_features.shape[:2]
    if length > self.max_tokens:
      raise errors.UserError(
        f"{length} caption tokens exceed the prior's max_tokens {self.max_tokens}"
      )
    w = self.width
    tokens = dense(w, axes.CHANNELS_IN, axes.CHANNELS_OUT, name="token_proj", **kw)(token_features)
    text = dense(w, axes.CONTEXT, axes.CHANNELS_OUT, name="text_proj", **kw)(text_embedding)
    time = EmbeddingMLP(w, name="time_mlp", **kw)(sinusoidal_embedding(t * TIME_SCALE, w))
    noisy = dense(w, axes.CONTEXT, axes.CHANNELS_OUT, name="noisy_proj", **kw)(z)
    query = self.param(
      "query",
      axes.partitioned(nn.initializers.normal(0.02), axes.CHANNELS_OUT),
      (w,),
      self.param_dtype,
    )
    extras = jnp.stack([text, time.astype(text.dtype), noisy, jnp.broadcast_to(query, (b, w))], 1)
    x = jnp.concatenate([tokens.astype(self.dtype), extras.astype(self.dtype)], axis=1)
    pos = self.param(
      "positional_embedding",
      axes.partitioned(nn.initializers.normal(0.01), axes.POSITION, axes.CHANNELS_OUT),
      (self.max_tokens + 4, w),
      self.param_dtype,
    )
    x = x + jnp.concatenate([pos[:length], pos[-4:]]).astype(self.dtype)
    valid = jnp.concatenate([token_mask.astype(bool), jnp.ones((b, 4), bool)], axis=1)
    bias = jnp.where(valid, 0.0, -1e9)[:, None, None, :].astype(jnp.float32)
    tower = TowerConfig(w, self.layers, self.heads)
    for i in range(self.layers):
      x = Block(tower, self.activation, name=f"block_{i}", **kw)(x, bias)
    x = layer_norm("ln_final", **kw)(x[:, -1])
    out = dense(self.embed_dim, axes.CHANNELS_IN, axes.CONTEXT, name="out_proj", **kw)(x)
    return out.astype(jnp.float32)
