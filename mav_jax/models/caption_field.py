"""Caption-conditioned space-time field: where, frame by frame, the caption puts things (beyond
the paper).

Make-A-Video's temporal layers never see text, and they could not place a caption's motion if they
did: a temporal conv and a temporal attention with relative positions treat a clip and its time
reversal alike, so from noise nothing tells "moving left" from "moving right" but the caption and
the frame's absolute index. This module gives the UNet both at once: a pooled summary of the
caption's token features and sinusoidal features of each position's absolute (y, x, frame) go
through one hidden SiLU layer (their sum, so the layer can form caption x position interactions)
and a zero-initialised output, added to the features after the input conv. With pool="sum" the
caption instead goes through a SiLU layer per token, a sum and a LayerNorm, and multiplies the
position features (a bilinear caption x position term): the mean's summary, added to the positions,
differed between directions by too little to bend the SiLU, and an unnormalised sum (~25 tokens)
was so large that the layer stayed linear or dead, so no interaction formed. A paper checkpoint is
unchanged until trained, and clips without a caption get exactly zero.
"""

import flax.linen as nn
import jax.numpy as jnp

from mav_jax.models import axes
from mav_jax.models.attention import caption_mask
from mav_jax.models.common import Array, Dtype, dense, layer_norm
from mav_jax.models.embeddings import space_time_features


class CaptionField(nn.Module):
  """Caption tokens [b, s, d] and a video's shape -> an additive field [b, f, h, w, features].

  Attributes:
    features: channels of the field (the UNet's first level).
    hidden: width of the hidden layer (default 4 * features).
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  features: int
  hidden: int | None = None
  pool: str = "mean"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self, context: Array, context_mask: Array | None, frames: int, height: int, width: int
  ) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    hidden = self.hidden or 4 * self.features
    present, mask = caption_mask(context, context_mask)
    tokens = layer_norm("norm", **kw)(context.astype(self.dtype))
    weights = mask.astype(self.dtype)[..., None]
    coords = space_time_features(frames, height, width).transpose(2, 0, 1, 3)  # [f, h, w, 24]
    where = dense(hidden, axes.EMBED_IN, axes.MLP, name="position", **kw)(coords.astype(self.dtype))
    if self.pool == "mean":
      summary = jnp.sum(tokens * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
      what = dense(hidden, axes.CONTEXT, axes.MLP, name="caption", **kw)(summary)  # [b, hidden]
      field = nn.silu(what[:, None, None, None, :] + where[None])
    elif self.pool == "sum":
      per_token = nn.silu(dense(hidden, axes.CONTEXT, axes.MLP, name="token", **kw)(tokens))
      summary = layer_norm("summary_norm", **kw)(jnp.sum(per_token * weights, axis=1))
      what = dense(hidden, axes.EMBED_IN, axes.MLP, name="caption", **kw)(summary)  # [b, hidden]
      field = nn.silu(where)[None] * what[:, None, None, None, :]
    else:
      raise ValueError(f"CaptionField pool must be 'mean' or 'sum', got {self.pool!r}")
    out = dense(self.features, axes.MLP, axes.CHANNELS_OUT, name="out", zero_init=True, **kw)(field)
    return out * present.astype(out.dtype)[:, None, None, None, None]
