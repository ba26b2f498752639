"""Residual block with pseudo-3D convolutions, conditioned by scale-and-shift on one embedding."""

import flax.linen as nn
import jax.numpy as jnp

from mav_jax.models import axes
from mav_jax.models.common import Array, Dtype, FrameGroupNorm, dense, spatial_conv
from mav_jax.models.conv import Pseudo3DConv


class ResBlock(nn.Module):
  """GN -> SiLU -> P3D conv -> GN * (1 + scale) + shift -> SiLU -> dropout -> P3D conv, plus skip.

  The conditioning embedding (diffusion time + fps / frame skip + global embedding, already summed by
  the UNet) is projected to a per-channel scale and shift for the second normalisation.

  Attributes:
    features: output channels.
    dropout: dropout rate before the second conv.
    temporal_kernel_size: taps of the temporal convs.
    image_mode: skip the temporal convs.
    deterministic: disable dropout.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  features: int
  dropout: float = 0.0
  temporal_kernel_size: int = 3
  image_mode: bool = False
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, emb: Array) -> Array:
    """Args: x [b, f, h, w, c]; emb [b, e] or [b, f, e]. Returns [b, f, h, w, features]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    conv = dict(
      features=self.features,
      temporal_kernel_size=self.temporal_kernel_size,
      image_mode=self.image_mode,
      **kw,
    )
    h = nn.silu(FrameGroupNorm(**kw, name="norm1")(x))
    h = Pseudo3DConv(**conv, name="conv1")(h)
    scale_shift = dense(2 * self.features, axes.EMBED, axes.CHANNELS_OUT, name="emb_proj", **kw)(
      nn.silu(emb)
    )
    # emb [b, e] conditions every frame alike; [b, f, e] (a time per frame) each frame its own.
    per_frame = (
      scale_shift[:, :, None, None, :] if emb.ndim == 3 else scale_shift[:, None, None, None]
    )
    scale, shift = jnp.split(per_frame, 2, axis=-1)
    h = FrameGroupNorm(**kw, name="norm2")(h) * (1 + scale) + shift
    h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=self.deterministic)
    h = Pseudo3DConv(**conv, name="conv2")(h)
    if x.shape[-1] != self.features:
      x = spatial_conv(self.features, kernel_size=1, name="skip", **kw)(x)
    return axes.constrain(x + h, axes.VIDEO)
