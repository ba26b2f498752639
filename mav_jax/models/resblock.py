"""Residual block with pseudo-3D convolutions, conditioned on one embedding (scale-and-shift of the
second normalisation, or added before it), optionally resampling inside the block."""

import flax.linen as nn
import jax.numpy as jnp

from mav_jax import errors
from mav_jax.models import axes
from mav_jax.models.common import Array, Dtype, FrameGroupNorm, dense, spatial_conv
from mav_jax.models.conv import Pseudo3DConv

TIME_EMBEDDINGS = ("scale_shift", "additive")
RESAMPLES = (None, "down", "up")


def resample_frames(x: Array, resample: str | None) -> Array:
  """Spatial resampling of every frame of [..., h, w, c]: "down" is a 2x2 stride-2 average pool
  (odd sizes are floored, as torch's AvgPool2d does), "up" nearest-neighbour x2, None the identity."""
  if resample == "down":
    return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")
  if resample == "up":
    return jnp.repeat(jnp.repeat(x, 2, axis=-3), 2, axis=-2)
  return x


class ResBlock(nn.Module):
  """GN -> SiLU -> [resample] -> P3D conv -> (+ emb) -> GN [* (1 + scale) + shift] -> SiLU ->
  dropout -> P3D conv, plus the (resampled, 1x1-projected when channels change) input.

  The conditioning embedding (diffusion time + fps / frame skip + global embedding, already summed by
  the UNet) goes through SiLU and the `emb_proj` dense layer, then conditions the second
  normalisation. This is diffusers' `ResnetBlock2D` (eps 1e-5, 32 groups: FrameGroupNorm's
  gcd(C, 32) groups are 32 for every width that is a multiple of 32) applied to every frame, with the
  temporal convs added in video mode.

  Attributes:
    features: output channels.
    dropout: dropout rate before the second conv.
    temporal_kernel_size: taps of the temporal convs.
    image_mode: skip the temporal convs.
    deterministic: disable dropout.
    time_embedding: "scale_shift" (diffusers `time_embedding_norm="scale_shift"`: `emb_proj` gives
      2 * features, split scale first, `GN(h) * (1 + scale) + shift`) or "additive" (diffusers
      "default": `emb_proj` gives features, `GN(h + emb)`).
    resample: None, "down" or "up" (diffusers `ResnetBlock2D(down=True / up=True)` with the default
      kernel): after `silu(norm1(x))` both that and the residual input are resampled per frame
      (2x2 average pool / nearest x2) before conv1 and before the 1x1 skip.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  features: int
  dropout: float = 0.0
  temporal_kernel_size: int = 3
  image_mode: bool = False
  deterministic: bool = True
  time_embedding: str = "scale_shift"
  resample: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, emb: Array) -> Array:
    """Args: x [b, f, h, w, c]; emb [b, e] or [b, f, e]. Returns [b, f, h', w', features], with
    (h', w') = (h, w), halved ("down") or doubled ("up")."""
    if self.time_embedding not in TIME_EMBEDDINGS:
      raise errors.UserError(
        f"unknown time_embedding {self.time_embedding!r}: expected one of {TIME_EMBEDDINGS}"
      )
    if self.resample not in RESAMPLES:
      raise errors.UserError(f"unknown resample {self.resample!r}: expected one of {RESAMPLES}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    conv = dict(
      features=self.features,
      temporal_kernel_size=self.temporal_kernel_size,
      image_mode=self.image_mode,
      **kw,
    )
    h = nn.silu(FrameGroupNorm(**kw, name="norm1")(x))
    h, x = resample_frames(h, self.resample), resample_frames(x, self.resample)
    h = Pseudo3DConv(**conv, name="conv1")(h)
    additive = self.time_embedding == "additive"
    proj = dense(
      self.features if additive else 2 * self.features,
      axes.EMBED,
      axes.CHANNELS_OUT,
      name="emb_proj",
      **kw,
    )(nn.silu(emb))
    # emb [b, e] conditions every frame alike; [b, f, e] (a time per frame) each frame its own.
    per_frame = proj[:, :, None, None, :] if emb.ndim == 3 else proj[:, None, None, None]
    if additive:
      h = FrameGroupNorm(**kw, name="norm2")(h + per_frame)
    else:
      scale, shift = jnp.split(per_frame, 2, axis=-1)
      h = FrameGroupNorm(**kw, name="norm2")(h) * (1 + scale) + shift
    h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=self.deterministic)
    h = Pseudo3DConv(**conv, name="conv2")(h)
    if x.shape[-1] != self.features:
      x = spatial_conv(self.features, kernel_size=1, name="skip", **kw)(x)
    return axes.constrain(x + h, axes.VIDEO)
