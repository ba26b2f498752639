"""Caption-steered motion between frames (beyond the paper; model.text_motion.conv_size).

Make-A-Video's temporal layers never see text, and they could not place a caption's motion if they
did: a temporal conv and a temporal attention with relative positions treat a clip and its time
reversal alike, so from noise nothing but the caption tells "moving left" from "moving right".
`CaptionMotionConv` is a depthwise (frame, y, x) conv after every residual block whose kernels the
caption mixes (docs/text_motion.md).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mav_jax import errors
from mav_jax.models import axes
from mav_jax.models.attention import caption_mask
from mav_jax.models.common import Array, Dtype, FrameGroupNorm, dense, layer_norm


def summed_tokens(tokens: Array, weights: Array, hidden: int, kw: dict) -> Array:
  """A SiLU layer per (LayerNormed) token [b, s, d], summed over the valid tokens (`weights`
  [b, s, 1]) and LayerNormed -> [b, hidden]. Unlike a mean, one word that differs (a direction)
  moves the summary as much as it moves its own token; the norm keeps ~25 tokens' sum in range.
  Called inside a compact module (its layers are that module's "token" and "summary_norm")."""
  per_token = nn.silu(dense(hidden, axes.CONTEXT, axes.MLP, name="token", **kw)(tokens))
  return layer_norm("summary_norm", **kw)(jnp.sum(per_token * weights, axis=1))


def shift_kernels(key, shape, dtype=jnp.float32):
  """Initial kernel bank [n, taps, k, k, c]: kernel i (i < 8) follows content that moves one pixel
  per frame towards compass direction i (0: +x, 2: +y, ...): it takes the previous frame one step
  back along that direction and the next frame one step ahead (bilinear weights), so the caption's
  mix starts as a choice among motions rather than among random filters. Kernels past the eighth
  (and banks too small for a one-pixel step) start as small random filters."""
  n, taps, k, _, c = shape
  bank = jax.random.normal(key, shape, jnp.float32) * 0.01
  if taps < 3 or k < 3:
    return bank.astype(dtype)
  mid_t, mid = taps // 2, k // 2
  for i in range(min(n, 8)):
    angle = 2.0 * math.pi * i / 8
    vx, vy = round(math.cos(angle), 6), round(math.sin(angle), 6)
    for dt, sign in ((-1, -1.0), (1, 1.0)):  # previous frame: one step back; next: one ahead
      for yy, wy in _bilinear(mid + sign * vy):
        for xx, wx in _bilinear(mid + sign * vx):
          bank = bank.at[i, mid_t + dt, yy, xx].add(0.5 * wy * wx)
  return bank.astype(dtype)


def _bilinear(position: float) -> list[tuple[int, float]]:
  """The (index, weight) pairs that linearly interpolate at `position` (one pair if integral)."""
  low = math.floor(position)
  frac = position - low
  return [(low, 1.0 - frac)] + ([(low + 1, frac)] if frac > 1e-6 else [])


class CaptionMotionConv(nn.Module):
  """A caption-steered space-time conv: a residual branch [b, f, h, w, c] -> [b, f, h, w, c].

  Motion is a displacement between frames, which no factorised layer expresses on its own: a
  spatial conv sees one frame, a temporal conv or attention one pixel. A depthwise conv over
  (frame, y, x) does (its kernel taking the pixel to the left from the previous frame is a filter
  for rightward motion), and its time reversal is the opposite direction, so which kernel applies
  must come from the caption. Here each channel's `temporal_taps` x k x k kernel is a mix of
  `kernels` learned kernels (starting as compass motions, `shift_kernels`) weighted by a summary of
  the caption's tokens (`summed_tokens`), run on the GroupNormed features, computed as a sum of
  shifted slices (on XLA's CPU backend 20-34x faster than a grouped conv at the tiny D^t's shapes),
  followed by a zero-initialised 1x1 projection: the block starts as
  the identity (a paper checkpoint is unchanged until trained) and adds exactly zero for clips
  without a caption.

  Attributes:
    kernel_size: spatial size k of the kernels (odd; their reach is k // 2 pixels per frame).
    kernels: learned kernels the caption mixes.
    temporal_taps: frames each kernel spans (odd).
    hidden: width of the per-token layer.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  kernel_size: int = 3
  kernels: int = 8
  temporal_taps: int = 3
  hidden: int = 64
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array, context_mask: Array | None) -> Array:
    k, taps = self.kernel_size, self.temporal_taps
    if k < 1 or k % 2 != 1 or taps < 1 or taps % 2 != 1:
      raise errors.UserError(
        f"CaptionMotionConv needs odd kernel_size and temporal_taps ('same' padding), got "
        f"kernel_size={k}, temporal_taps={taps}"
      )
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, f, h, w, c = x.shape
    present, mask = caption_mask(context, context_mask)
    tokens = layer_norm("norm", **kw)(context.astype(self.dtype))
    summary = summed_tokens(tokens, mask.astype(self.dtype)[..., None], self.hidden, kw)
    mix = dense(self.kernels, axes.MLP, None, name="mix", **kw)(summary)  # [b, kernels]
    bank = self.param(
      "kernel_bank",
      axes.partitioned(
        shift_kernels,
        None,
        axes.CONV_T,
        axes.CONV_H,
        axes.CONV_W,
        axes.CHANNELS_IN,
      ),
      (self.kernels, taps, k, k, c),
      self.param_dtype,
    )
    kernel = jnp.einsum("bn,ntyxc->btyxc", mix, bank.astype(self.dtype))
    features = FrameGroupNorm(**kw, name="in_norm")(x)
    pt, ps = taps // 2, k // 2
    padded = jnp.pad(features, ((0, 0), (pt, pt), (ps, ps), (ps, ps), (0, 0)))
    out = jnp.zeros_like(features)
    for dt in range(taps):
      for dy in range(k):
        for dx in range(k):
          window = padded[:, dt : dt + f, dy : dy + h, dx : dx + w]
          out = out + kernel[:, dt, dy, dx][:, None, None, None, :] * window
    out = dense(c, axes.CHANNELS_IN, axes.CHANNELS_OUT, name="out", zero_init=True, **kw)(out)
    return out * present.astype(out.dtype)[:, None, None, None, None]
