"""SpaceTimeUNet: the factorised space-time UNet every video stage of the cascade is built on.

One set of weights serves images and videos. In video mode every conv is a pseudo-3D conv and every
attention block ends with temporal attention; with `image_mode=True` those temporal layers are skipped
and the frames of the [batch, frames, height, width, channels] input are independent images. Because
the temporal layers are identity-initialised, a freshly initialised video model equals its image
model frame by frame, and an image model's parameter tree loads into it unchanged
(`mav_jax.models.inflate`).
"""

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mav_jax import errors
from mav_jax.models import axes
from mav_jax.models.attention import CaptionPool, Pseudo3DAttention
from mav_jax.models.caption_motion import CaptionMotionConv
from mav_jax.models.common import Array, Dtype, FrameGroupNorm, spatial_conv
from mav_jax.models.conv import Downsample, Pseudo3DConv, Upsample
from mav_jax.models.embeddings import EmbeddingMLP, UnclipProjection, sinusoidal_embedding
from mav_jax.models.resblock import TIME_EMBEDDINGS, ResBlock

# Diffusion time t in [0, 1] is scaled to [0, 1000] before the sinusoidal features.
TIME_SCALE = 1000.0
RESAMPLES = ("conv", "resblock")
SPATIAL_ATTENTIONS = ("transformer", "added_kv")
GLOBAL_CONDITIONINGS = ("mlp", "unclip")
EXTRA_INPUT_MODES = ("zero_init", "concat")


def attention_heads(width: int, head_dim: int) -> tuple[int, int]:
  """(heads, features per head) of an attention block on `width` channels: ceil(width / head_dim)
  heads of width // heads features (960 channels at head_dim 128: 8 heads of 120)."""
  heads = -(-width // head_dim)
  return heads, width // heads


class SpaceTimeUNet(nn.Module):
  """Pseudo-3D UNet over [batch, frames, height, width, channels] videos.

  Attributes:
    out_channels: channels of the prediction (3 for RGB eps / x0 / v).
    channels: base width; level i has `channels * channel_mults[i]` channels.
    channel_mults: width multiplier per resolution level (one 2x downsample between levels).
    num_res_blocks: residual blocks per level on the way down (one more on the way up).
    attention_levels: indices of the levels that get pseudo-3D attention after each block.
    mid_attention: put a pseudo-3D attention block in the middle.
    head_dim: features per attention head: a level of width w has ceil(w / head_dim) heads of
      w // heads features (the same when head_dim divides w).
    embed_dim: width of the conditioning embedding; default 4 * channels.
    conditioning_scalars: names of scalar conditions, e.g. ("fps",) or ("frame_skip",) or
      ("noise_aug",), each embedded sinusoidally and added (zero-initialised) to the time embedding.
    conditioning_scalar_scales: a multiplier per scalar applied before its sinusoidal features, so
      that its useful range spans many periods: 1 for fps or frame skips (natural units), 1000 for
      a level in [0, 1] such as a noise-augmentation time (as for t). Empty: all 1.
    use_global_embedding: condition on a global vector (e.g. a CLIP image embedding).
    global_conditioning: how the global vector conditions the model: "mlp" (a two-layer MLP of it
      added to the time embedding) or "unclip" (Karlo's decoder: `UnclipProjection` of the raw
      image embedding, the raw text embedding `text_embedding` and the `context` token features;
      its vector is added to the time embedding and its tokens, 4 from the image then the
      projected text tokens, become the `context` of every attention block).
    unclip_context_dim: width of the "unclip" context tokens (Karlo: 1536).
    use_cross_attention: attention blocks cross-attend to `context` tokens.
    spatial_attention: the per-frame part of every attention block: "transformer" (self-attention,
      optional cross-attention, feed-forward) or "added_kv" (unCLIP: GroupNorm, then attention
      whose keys and values are the context tokens' followed by the frame's; needs `context`).
    temporal_text_attention: the temporal layer of every attention block also cross-attends to
      `context` tokens (caption features), and an attention-pooled summary of them joins the
      conditioning embedding in video mode, so motion can follow the caption; off in the
      paper-faithful configs. Clips whose `context_mask` is all False (no caption) are unaffected,
      and image mode never reads the caption.
    text_vocab_size: with `temporal_text_attention`, > 0 adds a learned embedding of the caption's
      token ids (`context_ids`) and of their positions to the context features before the text
      pathway reads them; both start at zero. A frozen CLIP trained on still images can map words
      that only video shows (motion words) to near-identical features; this lets captioned video
      teach the temporal layers those words. 0: off (the context features only).
    text_motion_conv: with `temporal_text_attention`, > 0 adds after every residual block in video
      mode a caption-steered depthwise space-time conv of this spatial size (odd; it reaches
      `text_motion_conv // 2` pixels per frame at its level; caption_motion.CaptionMotionConv):
      a mix, weighted by the caption, of learned (frame, y, x) kernels, so the caption can say
      which way things move between frames. Zero-initialised; 0: off.
    extra_input_channels: channels concatenated to the input (masked frames + mask for frame
      interpolation; an upsampled low-resolution video for super-resolution).
    extra_input_mode: how they enter: "zero_init" (a zero-initialised conv added to conv_in's
      output, so a model fine-tuned from one without them starts out equal to it) or "concat"
      (concatenated after the input channels before conv_in, as diffusers' super-resolution UNets
      read them).
    time_scale: multiplier of t before its sinusoidal features: 1000 for t in [0, 1]; 1 for the
      integer timesteps of a discrete schedule (Karlo's), which then go in exactly.
    time_embedding: how residual blocks take the embedding: "scale_shift" (GroupNorm scale and
      shift) or "additive" (added before the GroupNorm; Karlo's super-resolution UNets).
    resample: between levels, "conv" (a stride-2 conv down, nearest x2 + conv up) or "resblock"
      (a residual block that average-pools / nearest-upsamples inside, diffusers'
      `ResnetDownsampleBlock2D` / `ResnetUpsampleBlock2D`, Karlo's).
    temporal_kernel_size: taps of every temporal conv.
    max_temporal_distance: clip of the temporal attention's relative-position buckets.
    dropout: dropout rate inside residual blocks.
    remat: recompute each block's activations in the backward pass (`nn.remat`) to save memory.
    remat_policy: name of a `jax.checkpoint_policies` policy deciding what remat may keep
      (e.g. "nothing_saveable", "dots_with_no_batch_dims_saveable").
    dtype: compute dtype (e.g. bfloat16); the prediction is returned in float32.
    param_dtype: parameter dtype (float32 to train in mixed precision).
  """

  out_channels: int = 3
  channels: int = 64
  channel_mults: tuple[int, ...] = (1, 2, 4)
  num_res_blocks: int = 2
  attention_levels: tuple[int, ...] = (2,)
  mid_attention: bool = True
  head_dim: int = 64
  embed_dim: int | None = None
  conditioning_scalars: tuple[str, ...] = ()
  conditioning_scalar_scales: tuple[float, ...] = ()
  use_global_embedding: bool = False
  global_conditioning: str = "mlp"
  unclip_context_dim: int = 1536
  use_cross_attention: bool = False
  spatial_attention: str = "transformer"
  temporal_text_attention: bool = False
  text_vocab_size: int = 0
  text_motion_conv: int = 0
  extra_input_channels: int = 0
  extra_input_mode: str = "zero_init"
  time_scale: float = TIME_SCALE
  time_embedding: str = "scale_shift"
  resample: str = "conv"
  temporal_kernel_size: int = 3
  max_temporal_distance: int = 32
  dropout: float = 0.0
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _check_options(self):
    for name, value, allowed in (
      ("global_conditioning", self.global_conditioning, GLOBAL_CONDITIONINGS),
      ("spatial_attention", self.spatial_attention, SPATIAL_ATTENTIONS),
      ("extra_input_mode", self.extra_input_mode, EXTRA_INPUT_MODES),
      ("time_embedding", self.time_embedding, TIME_EMBEDDINGS),
      ("resample", self.resample, RESAMPLES),
    ):
      if value not in allowed:
        raise errors.UserError(f"unknown model.{name} {value!r}: expected one of {allowed}")
    if self.spatial_attention == "added_kv" and self.use_cross_attention:
      raise errors.UserError(
        "spatial_attention='added_kv' already attends to the context: set use_cross_attention=False"
      )

  def _check_inputs(
    self, x, t, scalars, global_embedding, text_embedding, context, extra_inputs, image_mode
  ):
    self._check_options()
    if x.ndim != 5:
      raise errors.UserError(
        f"SpaceTimeUNet takes [batch, frames, height, width, channels], got shape "
        f"{x.shape}; add a frames axis of 1 for images"
      )
    factor = 2 ** (len(self.channel_mults) - 1)
    if x.shape[2] % factor or x.shape[3] % factor:
      raise errors.UserError(
        f"height and width {x.shape[2:4]} must be divisible by {factor} "
        f"(2 ** (levels - 1) for channel_mults={self.channel_mults})"
      )
    if t.shape not in (x.shape[:1], x.shape[:2]):
      raise errors.UserError(
        f"t must have shape [batch]={x.shape[:1]} or [batch, frames]={x.shape[:2]} (a time per "
        f"frame), got {t.shape}"
      )
    if self.conditioning_scalar_scales and len(self.conditioning_scalar_scales) != len(
      self.conditioning_scalars
    ):
      raise errors.UserError(
        f"conditioning_scalar_scales {self.conditioning_scalar_scales} needs one scale per "
        f"conditioning scalar {self.conditioning_scalars}"
      )
    unknown = set(scalars) - set(self.conditioning_scalars)
    if unknown:
      raise errors.UserError(
        f"unknown scalar conditions {sorted(unknown)}; this model was built with "
        f"conditioning_scalars={self.conditioning_scalars}"
      )
    missing = set(self.conditioning_scalars) - set(scalars)
    if missing and not image_mode:
      raise errors.UserError(
        f"missing scalar conditions {sorted(missing)} (video mode needs all of "
        f"{self.conditioning_scalars}); pass scalars={{name: [batch] array}}"
      )
    if self.use_global_embedding and global_embedding is None:
      raise errors.UserError(
        "model built with use_global_embedding=True needs global_embedding=[b, d]"
      )
    if not self.use_global_embedding and global_embedding is not None:
      raise errors.UserError(
        "got global_embedding but the model was built with use_global_embedding=False"
      )
    unclip = self.use_global_embedding and self.global_conditioning == "unclip"
    if unclip and (text_embedding is None or context is None):
      raise errors.UserError(
        "model built with global_conditioning='unclip' needs text_embedding=[b, d] (the raw CLIP "
        "text embedding) and context=[b, tokens, d] (the text tower's token features)"
      )
    if not unclip and text_embedding is not None:
      raise errors.UserError(
        "got text_embedding but the model was not built with global_conditioning='unclip'"
      )
    if (self.use_cross_attention or self.spatial_attention == "added_kv") and context is None:
      raise errors.UserError(
        "model built with use_cross_attention=True or spatial_attention='added_kv' needs "
        "context=[b, tokens, d]"
      )
    if self.temporal_text_attention and context is None and not image_mode:
      raise errors.UserError(
        "model built with temporal_text_attention=True needs context=[b, tokens, d] in video mode "
        "(an all-False context_mask marks clips without a caption)"
      )
    if self.extra_input_channels:
      expected = x.shape[:4] + (self.extra_input_channels,)
      if extra_inputs is None or extra_inputs.shape != expected:
        got = None if extra_inputs is None else extra_inputs.shape
        raise errors.UserError(
          f"extra_inputs must have shape {expected} "
          f"(extra_input_channels={self.extra_input_channels}), got {got}"
        )
    elif extra_inputs is not None:
      raise errors.UserError("got extra_inputs but the model was built with extra_input_channels=0")

  def _learned_text(self, ids: Array | None, shape: tuple[int, ...]) -> Array:
    """Learned token + position embeddings [b, s, d] of the caption ids (zero-initialised)."""
    if ids is None or ids.shape != shape[:2]:
      raise errors.UserError(
        f"model built with text_vocab_size={self.text_vocab_size} needs context_ids=[b, s] token "
        f"ids matching the context {shape[:2]}, got {None if ids is None else ids.shape}"
      )
    _, s, d = shape
    tokens = self.param(
      "temporal_text_tokens",
      axes.partitioned(nn.initializers.zeros, axes.EMBED_IN, axes.CONTEXT),
      (self.text_vocab_size, d),
      self.param_dtype,
    )
    positions = self.param(
      "temporal_text_positions",
      axes.partitioned(nn.initializers.zeros, axes.POSITION, axes.CONTEXT),
      (s, d),
      self.param_dtype,
    )
    return (jnp.take(tokens, ids, axis=0) + positions).astype(jnp.float32)

  def _embedding(self, t, scalars, global_embedding) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    embed_dim = self.embed_dim or 4 * self.channels
    emb = EmbeddingMLP(embed_dim, **kw, name="time_embed")(
      sinusoidal_embedding(t * self.time_scale, self.channels)
    )
    if emb.ndim == 3:  # a time per frame [b, f, e]: the per-clip terms below broadcast over frames
      emb = emb.swapaxes(0, 1)
    scales = self.conditioning_scalar_scales or (1.0,) * len(self.conditioning_scalars)
    for name, scale in zip(self.conditioning_scalars, scales, strict=True):
      if name in scalars:
        emb = emb + EmbeddingMLP(embed_dim, zero_init_out=True, **kw, name=f"{name}_embed")(
          sinusoidal_embedding(scalars[name] * scale, self.channels)
        )
    if self.use_global_embedding and self.global_conditioning == "mlp":
      emb = emb + EmbeddingMLP(embed_dim, in_axis=axes.CONTEXT, **kw, name="global_embed")(
        global_embedding.astype(self.dtype)
      )
    return emb.swapaxes(0, 1) if emb.ndim == 3 else emb

  @nn.compact
  def __call__(
    self,
    x: Array,
    t: Array,
    *,
    scalars: Mapping[str, Array] | None = None,
    global_embedding: Array | None = None,
    text_embedding: Array | None = None,
    drop_image: Array | None = None,
    context: Array | None = None,
    context_mask: Array | None = None,
    context_ids: Array | None = None,
    extra_inputs: Array | None = None,
    image_mode: bool = False,
    deterministic: bool = True,
  ) -> Array:
    """Predicts the diffusion target for noisy videos.

    Args:
      x: noisy input [b, f, h, w, c].
      t: diffusion time in [0, 1] (an integer timestep with time_scale=1), shape [b], or [b, f]
        for a time per frame (diffusion.frame_noise).
      scalars: {name: [b]} values for `conditioning_scalars` in natural units (fps in frames per
        second, frame skip in frames). Optional in image mode.
      global_embedding: [b, d] conditioning vector ("mlp": zeros are the null condition for
        guidance; "unclip": the raw CLIP image embedding).
      text_embedding: [b, d] raw CLIP text embedding ("unclip" only).
      drop_image: [b] bool, rows whose image embedding is replaced by the learned null one
        ("unclip" only; the unconditional branch of guidance and condition dropout).
      context: [b, s, d] tokens for cross-attention.
      context_mask: [b, s] True where a context token is valid.
      context_ids: [b, s] token ids of `context` (needed when `text_vocab_size` > 0).
      extra_inputs: [b, f, h, w, extra_input_channels] channels concatenated to the input.
      image_mode: run as an image model (no temporal layers; frames are independent).
      deterministic: disable dropout.

    Returns:
      [b, f, h, w, out_channels] float32 prediction.
    """
    scalars = dict(scalars or {})
    self._check_inputs(
      x, t, scalars, global_embedding, text_embedding, context, extra_inputs, image_mode
    )
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mode = dict(
      image_mode=image_mode,
      temporal_kernel_size=self.temporal_kernel_size,
      **kw,
    )
    res_cls, attn_cls = ResBlock, Pseudo3DAttention
    if self.remat:
      if not hasattr(jax.checkpoint_policies, self.remat_policy):
        raise errors.UserError(
          f"unknown remat_policy {self.remat_policy!r}: see jax.checkpoint_policies"
        )
      policy = getattr(jax.checkpoint_policies, self.remat_policy)
      res_cls = nn.remat(ResBlock, policy=policy)
      attn_cls = nn.remat(Pseudo3DAttention, policy=policy)

    emb = self._embedding(t, scalars, global_embedding)
    if self.use_global_embedding and self.global_conditioning == "unclip":
      add, context, context_mask = UnclipProjection(
        emb.shape[-1], self.unclip_context_dim, **kw, name="unclip_proj"
      )(global_embedding, text_embedding, context, context_mask, drop_image)
      emb = emb + (add[:, None] if emb.ndim == 3 else add).astype(emb.dtype)
    if self.temporal_text_attention and not image_mode:
      if self.text_vocab_size:
        context = context + self._learned_text(context_ids, context.shape)
      caption = CaptionPool(emb.shape[-1], self.head_dim, **kw, name="temporal_caption_embed")(
        context, context_mask
      )
      emb = emb + (caption[:, None] if emb.ndim == 3 else caption)

    steer_motion = self.temporal_text_attention and self.text_motion_conv and not image_mode

    def res_block(h, features, name, resample=None):
      h = res_cls(
        features,
        dropout=self.dropout,
        deterministic=deterministic,
        time_embedding=self.time_embedding,
        resample=resample,
        **mode,
        name=name,
      )(h, emb)
      if steer_motion:
        h = h + CaptionMotionConv(self.text_motion_conv, **kw, name=f"temporal_text_motion_{name}")(
          h, context, context_mask
        )
      return h

    def attention(h, name):
      heads, per_head = attention_heads(h.shape[-1], self.head_dim)
      return attn_cls(
        heads,
        per_head,
        use_cross_attention=self.use_cross_attention,
        temporal_cross_attention=self.temporal_text_attention and not image_mode,
        max_temporal_distance=self.max_temporal_distance,
        image_mode=image_mode,
        spatial=self.spatial_attention,
        **kw,
        name=name,
      )(h, context, context_mask)

    x = axes.constrain(x.astype(self.dtype), axes.VIDEO)
    concat = self.extra_input_channels and self.extra_input_mode == "concat"
    if concat:
      x = jnp.concatenate([x, extra_inputs.astype(self.dtype)], axis=-1)
    h = Pseudo3DConv(self.channels, **mode, name="conv_in")(x)
    if self.extra_input_channels and not concat:
      h = h + spatial_conv(self.channels, zero_init=True, name="conv_in_extra", **kw)(
        extra_inputs.astype(self.dtype)
      )
    skips = [h]
    for level, mult in enumerate(self.channel_mults):
      for i in range(self.num_res_blocks):
        h = res_block(h, self.channels * mult, f"down_{level}_res_{i}")
        if level in self.attention_levels:
          h = attention(h, f"down_{level}_attn_{i}")
        skips.append(h)
      if level != len(self.channel_mults) - 1:
        name = f"down_{level}_downsample"
        if self.resample == "resblock":
          h = res_block(h, h.shape[-1], name, resample="down")
        else:
          h = Downsample(h.shape[-1], **kw, name=name)(h)
        skips.append(h)

    mid_features = h.shape[-1]
    h = res_block(h, mid_features, "mid_res_0")
    if self.mid_attention:
      h = attention(h, "mid_attn")
    h = res_block(h, mid_features, "mid_res_1")

    for level, mult in reversed(list(enumerate(self.channel_mults))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res_block(h, self.channels * mult, f"up_{level}_res_{i}")
        if level in self.attention_levels:
          h = attention(h, f"up_{level}_attn_{i}")
      if level != 0:
        name = f"up_{level}_upsample"
        if self.resample == "resblock":
          h = res_block(h, h.shape[-1], name, resample="up")
        else:
          h = Upsample(h.shape[-1], **kw, name=name)(h)

    h = nn.silu(FrameGroupNorm(**kw, name="norm_out")(h))
    out = Pseudo3DConv(self.out_channels, **mode, name="conv_out")(h)
    return out.astype(jnp.float32)


def unet_from_config(model_config) -> SpaceTimeUNet:
  """Builds a SpaceTimeUNet from a config's `model` section (dtype names become jnp dtypes; the
  `text_motion` sub-config becomes temporal_text_attention, text_vocab_size, text_motion_conv)."""
  kwargs = dict(model_config)
  text = dict(kwargs.pop("text_motion", None) or {})
  kwargs.update(
    temporal_text_attention=bool(text.get("enabled", False)),
    text_vocab_size=int(text.get("vocab_size", 0)),
    text_motion_conv=int(text.get("conv_size", 0)),
  )
  for key in ("dtype", "param_dtype"):
    if key in kwargs:
      kwargs[key] = jnp.dtype(kwargs[key])
  for key in (
    "channel_mults",
    "attention_levels",
    "conditioning_scalars",
    "conditioning_scalar_scales",
  ):
    if key in kwargs:
      kwargs[key] = tuple(kwargs[key])
  return SpaceTimeUNet(**kwargs)
