"""Pseudo-3D attention: spatial self-attention, cross-attention, feed-forward, then temporal attention.

Attn_P3D(h) = Attn1D_time(Attn2D_space(h)) (Make-A-Video, Sec. 3.2). Spatial layers see each frame's
H*W tokens; the temporal layer sees, at every spatial position, the sequence of frames with a learned
relative-position bias over time. Its output projection is zero-initialised inside a residual branch,
so at initialisation the block is exactly the image block applied frame by frame.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mav_jax import errors
from mav_jax.models import axes
from mav_jax.models.common import Array, Dtype, FrameGroupNorm, dense, layer_norm
from mav_jax.models.embeddings import EmbeddingMLP, space_time_features


def attend(
  q: Array, k: Array, v: Array, bias: Array | None = None, mask: Array | None = None
) -> Array:
  """softmax(q k^T / sqrt(d) + bias, masked) v on [n, t, heads, d] queries and [n, s, heads, d] keys
  and values; `bias` and `mask` (True = attend) broadcast to [n, heads, t, s].

  `jax.nn.dot_product_attention`'s math with the score matrix kept in the compute dtype: the
  logits leave the matmul in q's dtype (the MXU still accumulates in float32), the softmax runs in
  float32 and the probabilities go back to v's dtype. jax.nn's XLA path writes float32 logits,
  which in bfloat16 doubles the bytes of the largest tensors; the TPU compiler estimates this
  version 14-23% faster forward + backward on the paper D^t's spatial and temporal attention
  shapes (docs/benchmarks.md, "Per op"). In float32 the two agree to rounding.
  """
  scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  logits = jnp.einsum("nthd,nshd->nhts", q * scale, k)
  if bias is not None:
    logits = logits + bias.astype(logits.dtype)
  logits = logits.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, -0.7 * jnp.finfo(jnp.float32).max)  # as jax.nn does
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("nhts,nshd->nthd", probs, v)


class _Projection(nn.Module):
  """y = einsum(x, kernel) + bias over named axes: the kernel is initialised at its final shape
  (unlike nn.DenseGeneral, which initialises a flattened kernel), so its logical names always match
  its rank.

  Attributes:
    kernel_shape: the kernel's shape.
    names: its logical axis names.
    equation: einsum of (x, kernel).
    in_dims: how many leading kernel dims are contracted (for the fan-in of the initialiser).
    zero_init: zero kernel.
  """

  kernel_shape: tuple[int, ...]
  names: tuple[str, ...]
  equation: str
  in_dims: int = 1
  zero_init: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n = len(self.kernel_shape)
    init = (
      nn.initializers.zeros
      if self.zero_init
      else nn.initializers.lecun_normal(
        in_axis=tuple(range(self.in_dims)), out_axis=tuple(range(self.in_dims, n))
      )
    )
    kernel = self.param(
      "kernel", axes.partitioned(init, *self.names), self.kernel_shape, self.param_dtype
    )
    out_shape, out_names = self.kernel_shape[self.in_dims :], self.names[self.in_dims :]
    bias = self.param(
      "bias", axes.partitioned(nn.initializers.zeros, *out_names), out_shape, self.param_dtype
    )
    y = jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)


class MultiHeadAttention(nn.Module):
  """Multi-head (cross-)attention over [batch, tokens, channels] with an optional additive bias.

  Attributes:
    num_heads: number of heads.
    head_dim: features per head.
    zero_init_out: zero-initialise the output projection (makes a residual branch an identity).
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  num_heads: int
  head_dim: int
  zero_init_out: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _proj(self, in_features: int, in_axis: str, name: str) -> _Projection:
    return _Projection(
      (in_features, self.num_heads, self.head_dim),
      (in_axis, axes.HEADS, axes.HEAD_DIM),
      "ntc,chd->nthd",
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name=name,
    )

  @nn.compact
  def __call__(
    self,
    x: Array,
    context: Array | None = None,
    context_mask: Array | None = None,
    bias: Array | None = None,
  ) -> Array:
    """Attends from `x` [n, t, c] to `context` [n, s, d] (to `x` itself when None).

    Args:
      x: queries' source tokens.
      context: keys' and values' source tokens; None for self-attention.
      context_mask: [n, s] boolean, True where a context token is valid.
      bias: additive logits bias broadcastable to [n, heads, t, s].

    Returns:
      [n, t, c] attention output.
    """
    kv_source, kv_axis = (x, axes.CHANNELS_IN) if context is None else (context, axes.CONTEXT)
    q = self._proj(x.shape[-1], axes.CHANNELS_IN, "query")(x)
    k = self._proj(kv_source.shape[-1], kv_axis, "key")(kv_source)
    v = self._proj(kv_source.shape[-1], kv_axis, "value")(kv_source)
    mask = None if context_mask is None else context_mask[:, None, None, :].astype(bool)
    out = attend(q, k, v, bias=bias, mask=mask)
    return self._out(x.shape[-1])(out)

  def _out(self, channels: int) -> _Projection:
    return _Projection(
      (self.num_heads, self.head_dim, channels),
      (axes.HEADS, axes.HEAD_DIM, axes.CHANNELS_OUT),
      "nthd,hdc->ntc",
      in_dims=2,
      zero_init=self.zero_init_out,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="out",
    )


class AddedKVAttention(MultiHeadAttention):
  """diffusers' `Attention(added_kv_proj_dim=...)` with `AttnAddedKVProcessor(2_0)` (unCLIP/Karlo)
  on [n, t, c] tokens that are already group-normalised: queries from the image tokens; keys and
  values = concat(added_key/added_value(context), key/value(tokens)), the context tokens first;
  `context_mask` masks the context part only (image tokens always valid). Scale head_dim**-0.5.
  The projections and attributes are MultiHeadAttention's (diffusers' out projection is not
  zero-initialised: leave `zero_init_out` False).
  """

  @nn.compact
  def __call__(self, x: Array, context: Array, context_mask: Array | None = None) -> Array:
    """x [n, t, c] (normalised tokens); context [n, s, d]; context_mask [n, s] (True = valid)."""
    c, d = x.shape[-1], context.shape[-1]
    q = self._proj(c, axes.CHANNELS_IN, "query")(x)
    k = jnp.concatenate(
      [
        self._proj(d, axes.CONTEXT, "added_key")(context),
        self._proj(c, axes.CHANNELS_IN, "key")(x),
      ],
      axis=1,
    )
    v = jnp.concatenate(
      [
        self._proj(d, axes.CONTEXT, "added_value")(context),
        self._proj(c, axes.CHANNELS_IN, "value")(x),
      ],
      axis=1,
    )
    mask = None
    if context_mask is not None:
      valid = jnp.concatenate(
        [context_mask.astype(bool), jnp.ones((x.shape[0], x.shape[1]), bool)], axis=1
      )
      mask = valid[:, None, None, :]
    out = attend(q, k, v, mask=mask)
    return self._out(c)(out)


class RelativePositionBias(nn.Module):
  """A learned per-head bias indexed by the clipped frame distance j - i.

  Attributes:
    num_heads: number of heads.
    max_distance: distances beyond +-max_distance share the edge bucket (so any frame count works).
    param_dtype: parameter dtype.
  """

  num_heads: int
  max_distance: int = 32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, num_frames: int) -> Array:
    """Returns a [1, heads, frames, frames] logits bias."""
    table = self.param(
      "table",
      axes.partitioned(nn.initializers.normal(0.02), axes.REL_POS, axes.HEADS),
      (2 * self.max_distance + 1, self.num_heads),
      self.param_dtype,
    )
    pos = jnp.arange(num_frames)
    rel = jnp.clip(pos[None, :] - pos[:, None], -self.max_distance, self.max_distance)
    return jnp.transpose(table[rel + self.max_distance], (2, 0, 1))[None]


class FeedForward(nn.Module):
  """GELU MLP with a `mult`-times wider hidden layer."""

  mult: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    h = dense(
      c * self.mult,
      axes.CHANNELS_IN,
      axes.MLP,
      name="wi",
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )(x)
    h = nn.gelu(h)
    return dense(
      c, axes.MLP, axes.CHANNELS_OUT, name="wo", dtype=self.dtype, param_dtype=self.param_dtype
    )(h)


class Pseudo3DAttention(nn.Module):
  """Factorised space-time transformer block on [batch, frames, height, width, channels].

  Per frame, with `spatial="transformer"` (the default): spatial self-attention, optional
  cross-attention to conditioning tokens, feed-forward (pre-LayerNorm residual branches). With
  `spatial="added_kv"`: diffusers' unCLIP block instead, x + out(attn(GN(x))) where the keys and
  values are the context tokens' (own projections, masked by `context_mask`) followed by GN(x)'s
  (AddedKVAttention; GroupNorm with `norm_groups` groups, eps 1e-5; no LayerNorm, no feed-forward;
  `context` required, `use_cross_attention` must stay False).
  Then, in video mode, temporal self-attention over frames at every spatial position (zero-init
  output, so the identity at initialisation) and, with `temporal_cross_attention`, cross-attention
  from each position's frame sequence to the context tokens (beyond the paper: lets the temporal
  layers read motion words; zero-init output too). A clip whose `context_mask` is all False has no
  caption: that branch then adds exactly zero, as if it were absent.

  Attributes:
    num_heads: attention heads (all three attentions).
    head_dim: features per head.
    use_cross_attention: attend to `context` tokens (required at call time when True).
    temporal_cross_attention: the temporal layer also attends to `context` tokens.
    ff_mult: feed-forward expansion.
    max_temporal_distance: clip of the temporal relative-position buckets.
    image_mode: skip the temporal attention.
    spatial: "transformer" or "added_kv" (the per-frame part, see above).
    norm_groups: GroupNorm groups of "added_kv" (must divide the channels).
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  num_heads: int
  head_dim: int
  use_cross_attention: bool = False
  temporal_cross_attention: bool = False
  ff_mult: int = 4
  max_temporal_distance: int = 32
  image_mode: bool = False
  spatial: str = "transformer"
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self, x: Array, context: Array | None = None, context_mask: Array | None = None
  ) -> Array:
    """Args: x [b, f, h, w, c]; context [b, s, d]; context_mask [b, s] (True = valid)."""
    b, f, h, w, c = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = dict(num_heads=self.num_heads, head_dim=self.head_dim, **kw)
    if self.spatial == "added_kv":
      x = self._added_kv(x, context, context_mask, attn)
    elif self.spatial == "transformer":
      x = self._transformer(x, context, context_mask, attn)
    else:
      raise errors.UserError(
        f"unknown Pseudo3DAttention spatial {self.spatial!r}: use 'transformer' or 'added_kv'"
      )
    if self.image_mode:
      return x

    # Temporal attention: one sequence of f frames per (batch, y, x) position.
    t = jnp.transpose(x, (0, 2, 3, 1, 4)).reshape(b * h * w, f, c)
    t = axes.constrain(t, (axes.ACT_BATCH, axes.ACT_FRAMES, axes.ACT_CHANNELS))
    bias = RelativePositionBias(
      self.num_heads,
      self.max_temporal_distance,
      param_dtype=self.param_dtype,
      name="temporal_rel_pos",
    )(f)
    t = t + MultiHeadAttention(**attn, zero_init_out=True, name="temporal_attn")(
      layer_norm("temporal_norm", **kw)(t), bias=bias
    )
    if self.temporal_cross_attention:
      t = t + self._temporal_text(t, context, context_mask, attn, (b, f, h, w))
    return jnp.transpose(t.reshape(b, h, w, f, c), (0, 3, 1, 2, 4))

  def _transformer(self, x, context, context_mask, attn):
    """Per frame: self-attention, optional cross-attention, feed-forward (pre-LN residuals)."""
    b, f, h, w, c = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    tokens_axes = (axes.ACT_BATCH, axes.ACT_TOKENS, axes.ACT_CHANNELS)
    t = axes.constrain(x.reshape(b * f, h * w, c), tokens_axes)
    t = t + MultiHeadAttention(**attn, name="spatial_attn")(layer_norm("spatial_norm", **kw)(t))
    if (self.use_cross_attention or self.temporal_cross_attention) and context is None:
      raise errors.UserError(
        "this attention block was built with use_cross_attention or temporal_cross_attention but "
        "got no context tokens; pass context=[batch, tokens, dim]"
      )
    if self.use_cross_attention:
      ctx = jnp.repeat(context, f, axis=0)
      ctx_mask = None if context_mask is None else jnp.repeat(context_mask, f, axis=0)
      t = t + MultiHeadAttention(**attn, name="cross_attn")(
        layer_norm("cross_norm", **kw)(t), ctx, ctx_mask
      )
    t = t + FeedForward(self.ff_mult, **kw, name="ff")(layer_norm("ff_norm", **kw)(t))
    return t.reshape(b, f, h, w, c)

  def _added_kv(self, x, context, context_mask, attn):
    """Per frame: x + out(attention of GN(x) to [context tokens, GN(x) tokens]) (diffusers'
    AttnAddedKVProcessor; its residual_connection/rescale_output_factor are not read there)."""
    b, f, h, w, c = x.shape
    if context is None:
      raise errors.UserError(
        "a spatial='added_kv' attention block needs context tokens; pass context=[batch, tokens, "
        "dim]"
      )
    if self.use_cross_attention:
      raise errors.UserError(
        "spatial='added_kv' already attends to the context: set use_cross_attention=False"
      )
    if c % self.norm_groups:
      raise errors.UserError(
        f"spatial='added_kv' GroupNorm: norm_groups={self.norm_groups} does not divide {c} channels"
      )
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    tokens_axes = (axes.ACT_BATCH, axes.ACT_TOKENS, axes.ACT_CHANNELS)
    normed = FrameGroupNorm(self.norm_groups, **kw, name="spatial_norm")(x)
    t = axes.constrain(normed.reshape(b * f, h * w, c), tokens_axes)
    ctx = jnp.repeat(context.astype(self.dtype), f, axis=0)
    ctx_mask = None if context_mask is None else jnp.repeat(context_mask, f, axis=0)
    out = AddedKVAttention(**attn, name="spatial_attn")(t, ctx, ctx_mask)
    return x + out.reshape(b, f, h, w, c).astype(x.dtype)

  def _temporal_text(self, t, context, context_mask, attn, shape):
    """Cross-attention of every position's frames [b * h * w, f, c] to the caption tokens.

    Its queries also see where they are: sinusoidal features of the frame index and of the y, x
    position (each scaled to [0, 1]) through a learned projection. Relative temporal layers alone
    cannot tell the first frame from the last where the clip is still noise, so they could not
    place a caption's motion (the object left at the start, right at the end) there.
    """
    b, f, h, w = shape
    positions = h * w
    present, mask = caption_mask(context, context_mask)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    coords = space_time_features(f, h, w).reshape(positions, f, -1)
    where = dense(
      t.shape[-1], axes.EMBED_IN, axes.CHANNELS_OUT, name="temporal_cross_coords", **kw
    )(coords.astype(self.dtype))
    query = layer_norm("temporal_cross_norm", **kw)(t) + jnp.tile(where, (b, 1, 1))
    out = MultiHeadAttention(**attn, zero_init_out=True, name="temporal_cross_attn")(
      query,
      jnp.repeat(context.astype(self.dtype), positions, axis=0),
      jnp.repeat(mask, positions, axis=0),
    )
    gate = jnp.repeat(present, positions, axis=0).astype(out.dtype)[:, None, None]
    return out * gate


def caption_mask(context: Array, context_mask: Array | None) -> tuple[Array, Array]:
  """(present [b], attention mask [b, s]) of caption tokens: `present` is False for a clip whose
  mask is all False (no caption); its mask keeps token 0 valid so the softmax stays finite, and the
  caller multiplies that clip's result by `present` (exactly zero)."""
  if context_mask is None:
    context_mask = jnp.ones(context.shape[:2], bool)
  context_mask = context_mask.astype(bool)
  present = jnp.any(context_mask, axis=-1)
  return present, context_mask.at[:, 0].set(context_mask[:, 0] | ~present)


class CaptionPool(nn.Module):
  """Caption tokens [b, s, d] -> one vector [b, features] for the UNet's conditioning embedding.

  A learned query attends over the tokens (so it can pick out the motion words, which a frozen
  CLIP trained on still images barely separates once pooled), then an MLP with a zero-initialised
  output. Clips whose mask is all False (no caption) get exactly zero.

  Attributes:
    features: output width (the UNet's embedding width).
    head_dim: features per attention head.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  features: int
  head_dim: int = 64
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, context: Array, context_mask: Array | None = None) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, _, d = context.shape
    heads = max(1, d // self.head_dim)
    query = self.param(
      "query", axes.partitioned(nn.initializers.normal(1.0), axes.CONTEXT), (d,), self.param_dtype
    )
    present, mask = caption_mask(context, context_mask)
    tokens = layer_norm("norm", **kw)(context.astype(self.dtype))
    pooled = MultiHeadAttention(heads, d // heads, name="attn", **kw)(
      jnp.broadcast_to(query.astype(self.dtype), (b, 1, d)), tokens, mask
    )[:, 0]
    out = EmbeddingMLP(self.features, in_axis=axes.CONTEXT, zero_init_out=True, name="mlp", **kw)(
      pooled
    )
    return out * present[:, None].astype(out.dtype)
