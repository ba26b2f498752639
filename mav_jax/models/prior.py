"""The diffusion prior P (DALL-E 2 style): CLIP text -> CLIP image embedding.

A transformer reads the sequence [caption token features (from CLIP's text tower), the text
embedding, the diffusion time, the noisy image embedding, a learned query] and the query's output is
the prediction (of the clean image embedding, DALL-E 2's choice, or of any `diffusion.target`).
Padding tokens are masked out of attention; the condition is the tokens and the text embedding
together, dropped together for classifier-free guidance.

With `causal=True`, `time_scale=1`, `activation="gelu_exact"` and `clip_stats=True` it is diffusers'
`PriorTransformer` (Kakao Brain's Karlo prior; `mav_jax.convert.karlo_prior` maps its weights): a
causal mask over the whole sequence, integer timesteps, and the CLIP image embedding's mean and
standard deviation, in whose normalised space (`normalise_embedding`) that prior works.
"""

import flax.linen as nn
import jax.numpy as jnp

from mav_jax import errors
from mav_jax.models import axes
from mav_jax.models.clip import Block, TowerConfig
from mav_jax.models.common import Array, Dtype, dense, layer_norm
from mav_jax.models.embeddings import EmbeddingMLP, sinusoidal_embedding

TIME_SCALE = 1000.0  # the default time_scale: continuous t in [0, 1] -> [0, 1000]


class DiffusionPrior(nn.Module):
  """Predicts the image embedding from its noisy version and the caption.

  Attributes:
    embed_dim: CLIP's joint embedding width (input and output of the prior).
    width: transformer width.
    layers: transformer blocks.
    heads: attention heads.
    max_tokens: caption length (positions are learned for max_tokens + 4 entries).
    activation: MLP activation ("gelu" (tanh approximation), "gelu_exact" (erf, torch's
      nn.GELU(), Karlo) or "quick_gelu").
    causal: also mask attention causally over the whole sequence (tokens, then the 4 extras), on
      top of the padding mask, as diffusers' PriorTransformer does (Karlo).
    time_scale: factor on t before its sinusoidal features: 1000 for continuous t in [0, 1], 1 for
      integer timesteps that go in as they are (Karlo).
    clip_stats: hold parameters `clip_mean` and `clip_std` [embed_dim] (zeros and ones at init) of
      the CLIP image embedding; `normalise_embedding` and `raw_embedding` map between raw
      embeddings and the normalised space the network sees and predicts (Karlo). `__call__` does
      not use them.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  embed_dim: int
  width: int = 512
  layers: int = 6
  heads: int = 8
  max_tokens: int = 77
  activation: str = "gelu"
  causal: bool = False
  time_scale: float = TIME_SCALE
  clip_stats: bool = False
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
    time = EmbeddingMLP(w, name="time_mlp", **kw)(sinusoidal_embedding(t * self.time_scale, w))
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
    valid = valid[:, None, None, :]  # [b, heads, queries, keys]
    if self.causal:
      valid = valid & jnp.tril(jnp.ones((length + 4, length + 4), bool))
    bias = jnp.where(valid, 0.0, -1e9).astype(jnp.float32)
    tower = TowerConfig(w, self.layers, self.heads)
    for i in range(self.layers):
      x = Block(tower, self.activation, name=f"block_{i}", **kw)(x, bias)
    x = layer_norm("ln_final", **kw)(x[:, -1])
    out = dense(self.embed_dim, axes.CHANNELS_IN, axes.CONTEXT, name="out_proj", **kw)(x)
    if self.clip_stats:
      for name, init in (("clip_mean", nn.initializers.zeros), ("clip_std", nn.initializers.ones)):
        self.param(name, axes.partitioned(init, axes.CONTEXT), (self.embed_dim,), self.param_dtype)
    return out.astype(jnp.float32)

  def _stats(self) -> tuple[Array, Array]:
    """(clip_mean, clip_std) in float32."""
    if not self.clip_stats:
      raise errors.UserError(
        "this prior has no CLIP embedding statistics (clip_stats=False): its embeddings are not "
        "normalised by it"
      )
    mean, std = (
      nn.meta.unbox(self.get_variable("params", n)).astype(jnp.float32)
      for n in ("clip_mean", "clip_std")
    )
    return mean, std

  def normalise_embedding(self, e: Array) -> Array:
    """Raw CLIP image embeddings [..., embed_dim] -> the network's space, (e - mean) / std
    (float32). Call as `net.apply(params, e, method=DiffusionPrior.normalise_embedding)`."""
    mean, std = self._stats()
    return (e.astype(jnp.float32) - mean) / std

  def raw_embedding(self, x: Array) -> Array:
    """The network's space -> raw CLIP image embeddings, x * std + mean (float32; diffusers'
    `PriorTransformer.post_process_latents`). Call as
    `net.apply(params, x, method=DiffusionPrior.raw_embedding)`."""
    mean, std = self._stats()
    return x.astype(jnp.float32) * std + mean
