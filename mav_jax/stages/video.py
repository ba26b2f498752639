"""The four UNet stages of the cascade, one `VideoStage` each: D^t, ↑F, SR_l^t and SR_h.

Every stage is a SpaceTimeUNet trained with the same denoising loss; they differ in what they are
conditioned on (see `VideoStage.condition`):

  decoder (D^t)  CLIP image embedding of a random frame of the clip (so unlabelled video trains it:
                 at sampling time the prior's embedding takes its place) and the clip's fps.
  interp (↑F)    the masked clip and the mask as 4 extra input channels, the spacing of the given
                 frames ("frame_skip") and fps, and the CLIP embedding of the first given frame.
                 Random masks cover interpolation (every k-th frame given) and extrapolation (the
                 first or last frames given), so one model interpolates, animates and extends.
  sr_low (SR_l^t) the clip downsampled to `conditioning.low_resolution`, noise-augmented at a random
                 level (fed as the "noise_level" scalar) and upsampled back, as 3 extra channels.
  sr_high (SR_h) the same per frame: an image model (no temporal layers). At sampling time every
                 frame of a clip starts from the same noise, so hallucinated detail is consistent.

Beyond the paper, `model.text_motion` gives D^t's and ↑F's temporal layers the caption's
CLIP token features to cross-attend to ("context"), dropped with the embedding for guidance and
absent (an all-False mask) for clips without a caption (`has_caption` False), which therefore train
exactly as in the paper.

`data.kind == "image"` trains a stage's spatial layers on single frames (image mode); the video
stage then starts from that checkpoint (`train.init_from`) with its temporal layers at identity.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp

from mav_jax import diffusion, errors
from mav_jax.diffusion import discrete
from mav_jax.diffusion.schedules import add_noise, schedule_from_config
from mav_jax.models import unet_from_config
from mav_jax.models.common import Array
from mav_jax.stages.common import discrete_schedule, frozen_clip, raw_embeddings, to_model_space

Batch = dict[str, Array]
NAMES = ("decoder", "interp", "sr_low", "sr_high")


class StageModel:
  """The stage's UNet (`net`) and, for CLIP-conditioned stages, the frozen CLIP (`clip`), whose
  checkpoint is read only when first used (counting parameters needs no CLIP)."""

  def __init__(self, config, uses_clip: bool):
    self.config = config
    self.net = unet_from_config(config.model)
    self.uses_clip = uses_clip

  @property
  def uses_text(self) -> bool:
    """Whether the temporal layers read caption tokens (`model.text_motion.enabled`)."""
    return bool(self.config.model.text_motion.enabled)

  @property
  def unclip(self) -> bool:
    """Whether the UNet is conditioned as Karlo's decoder (`model.global_conditioning ==
    "unclip"`): raw CLIP image and text embeddings and the caption's token features."""
    m = self.config.model
    return bool(m.use_global_embedding) and m.get("global_conditioning", "mlp") == "unclip"

  @functools.cached_property
  def clip(self):
    # Caption tokens go through CLIP's text tower, so its tokenizer must match the stage's data.
    if not self.uses_clip:
      return None
    return frozen_clip(self.config, check_tokens=self.uses_text or self.unclip)

  @property
  def augments(self) -> bool:
    """Whether the low-resolution input of a super-resolution stage is noise-augmented (the
    "noise_level" scalar condition; Karlo's SR has none)."""
    return "noise_level" in tuple(self.config.model.conditioning_scalars)


def resize_frames(video: Array, size: int, method: str = "linear") -> Array:
  """[..., h, w, c] -> [..., size, size, c] (antialiased when shrinking; "bicubic" is Keys'
  a = -0.5 kernel, torch's bicubic)."""
  if video.shape[-3:-1] == (size, size):
    return video
  return jax.image.resize(video, video.shape[:-3] + (size, size, video.shape[-1]), method)


def masked_video_inputs(video: Array, mask: Array) -> Array:
  """The interpolation model's 4 extra channels: the given frames (others zeroed) and the mask."""
  m = mask.astype(jnp.float32)[:, :, None, None, None]
  m = jnp.broadcast_to(m, video.shape[:4] + (1,))
  return jnp.concatenate([video * m, m], axis=-1)


class VideoStage:
  """One UNet stage: its model, initialisation, loss, and conditional generation.

  Attributes:
    name: one of NAMES.
  """

  def __init__(self, name: str):
    if name not in NAMES:
      raise errors.UserError(f"unknown video stage {name!r}; choose one of {NAMES}")
    self.name = name

  def __repr__(self):
    return f"VideoStage({self.name!r})"

  # -- what the stage is -------------------------------------------------------------------------

  @property
  def uses_clip(self) -> bool:
    return self.name in ("decoder", "interp")

  @property
  def is_super_resolution(self) -> bool:
    return self.name in ("sr_low", "sr_high")

  def image_mode(self, config) -> bool:
    """Whether the UNet runs as an image model (no temporal layers) in training."""
    return self.name == "sr_high" or config.data.kind == "image"

  def make_model(self, config) -> StageModel:
    text = config.model.text_motion
    if text.enabled and not self.uses_clip:
      raise errors.UserError(
        f"model.text_motion applies to the decoder and interp stages (they read CLIP), not to "
        f"{self.name}; leave model.text_motion.enabled False"
      )
    for field in ("vocab_size", "conv_size"):
      if text[field] and not text.enabled:
        raise errors.UserError(
          f"model.text_motion.{field} is part of the text pathway; set "
          f"--config.model.text_motion.enabled=True or model.text_motion.{field}=0"
        )
    return StageModel(config, self.uses_clip)

  def load_frozen(self, model: StageModel, config, mesh) -> dict[str, Any]:
    """Frozen parameters the loss needs (CLIP's), placed on `mesh`."""
    if model.clip is None:
      return {}
    return {"clip": model.clip.load(mesh, config.sharding.strategy)}

  def init(self, model: StageModel, config, rng: Array) -> Any:
    d, m = config.data, config.model
    frames = 1 if self.image_mode(config) else d.num_frames
    b = 1
    z = jnp.zeros((b, frames, d.resolution, d.resolution, 3))  # RGB (out_channels may be 6)
    cond = {
      "scalars": {name: jnp.ones((b,)) for name in m.conditioning_scalars},
      "embedding": (
        jnp.zeros((b, config.conditioning.embedding_dim)) if m.use_global_embedding else None
      ),
      "extra": (
        jnp.zeros(z.shape[:4] + (m.extra_input_channels,)) if m.extra_input_channels else None
      ),
    }
    if model.uses_text or model.unclip:
      cond["context"] = jnp.zeros((b, d.max_tokens, config.conditioning.text_width))
      cond["context_mask"] = jnp.ones((b, d.max_tokens), bool)
    if model.uses_text:
      cond["context_ids"] = jnp.zeros((b, d.max_tokens), jnp.int32)
    if model.unclip:
      cond["text_embedding"] = jnp.zeros((b, config.conditioning.embedding_dim))
    return model.net.init(
      rng, z, jnp.zeros((b,)), **self._net_kwargs(cond, self.image_mode(config))
    )["params"]

  @staticmethod
  def _net_kwargs(cond: dict, image_mode: bool) -> dict:
    return dict(
      scalars=cond["scalars"],
      global_embedding=cond["embedding"],
      text_embedding=cond.get("text_embedding"),
      drop_image=cond.get("drop_image"),
      extra_inputs=cond["extra"],
      context=cond.get("context"),
      context_mask=cond.get("context_mask"),
      context_ids=cond.get("context_ids"),
      image_mode=image_mode,
    )

  @staticmethod
  def caption_context(
    model: StageModel,
    clip_params,
    tokens: Array,
    token_mask: Array,
    has_caption: Array | None = None,
  ) -> dict:
    """{context, context_mask, context_ids} of caption tokens for `model.text_motion`: CLIP's
    token features (and the ids, for `model.text_motion.vocab_size`), masked out entirely for clips
    without a caption."""
    _, features = model.clip.text(clip_params, tokens)
    mask = token_mask.astype(bool)
    if has_caption is not None:
      mask = mask & has_caption.astype(bool)[:, None]
    return {"context": features, "context_mask": mask, "context_ids": tokens.astype(jnp.int32)}

  @staticmethod
  def unclip_text(model: StageModel, clip_params, tokens: Array, token_mask: Array) -> dict:
    """{text_embedding, context, context_mask} a Karlo (unclip) UNet reads from the caption:
    CLIP's raw text embedding, token features and mask."""
    text, features = model.clip.text(clip_params, tokens, raw=True)
    return {"text_embedding": text, "context": features, "context_mask": token_mask.astype(bool)}

  @classmethod
  def unclip_null(cls, model: StageModel, clip_params, batch: int) -> dict:
    """The unconditional branch's text for a Karlo UNet: the empty caption's encoding."""
    return cls.unclip_text(model, clip_params, *model.clip.null_tokens(batch))

  @staticmethod
  def drop_unclip(rng: Array, cond: dict, null: dict, rate: float) -> dict:
    """Condition dropout of a Karlo UNet: with probability `rate` an example's image embedding
    becomes the learned null one (`drop_image`) and its caption the empty caption."""
    b = cond["embedding"].shape[0]
    drop = jax.random.bernoulli(rng, rate, (b,))
    out = dict(cond, drop_image=drop)
    for key, value in null.items():
      keep = drop.reshape((b,) + (1,) * (value.ndim - 1))
      out[key] = jnp.where(keep, value, cond[key])
    return out

  @staticmethod
  def low_resolution_input(
    model: StageModel,
    config,
    low: Array,
    size: int,
    rng,
    level: float | None = None,
    share_across_frames: bool = False,
  ) -> dict:
    """{extra, scalars} of a super-resolution stage for a low-resolution clip `low`: noise-augmented
    (the "noise_level" scalar) at `level`, or in training at a random level up to
    `conditioning.max_aug_level`, unless the model has no noise level (Karlo's SR), then brought up
    to `size` with `conditioning.upsample`. `share_across_frames`: one noise draw per clip (SR_h's
    frames at sampling time)."""
    up = config.conditioning.get("upsample", "linear")
    if not model.augments:
      return {"extra": resize_frames(low, size, up), "scalars": {}}
    aug, level = diffusion.noise_augment(
      rng,
      low,
      schedule_from_config(config.diffusion),
      level,
      max_level=config.conditioning.max_aug_level,
      share_across_frames=share_across_frames,
    )
    return {"extra": resize_frames(aug, size, up), "scalars": {"noise_level": level}}

  # -- training ----------------------------------------------------------------------------------

  def condition(self, model: StageModel, config, x0: Array, batch: Batch, frozen, rng) -> dict:
    """The training condition of clean clips `x0` [b, f, h, w, 3]: {embedding, scalars, extra}."""
    b, f = x0.shape[:2]
    cond = {"embedding": None, "scalars": {}, "extra": None}
    raw = raw_embeddings(config)
    if self.name == "decoder":
      pick = jax.random.randint(rng, (b,), 0, f)
      frame = jnp.take_along_axis(x0, pick[:, None, None, None, None], axis=1)[:, 0]
      cond["embedding"] = model.clip.image_embedding(frozen["clip"], frame, raw=raw)
      if not self.image_mode(config):
        cond["scalars"] = {"fps": batch["fps"]}
    elif self.name == "interp":
      mask = batch["frame_mask"]
      first = jnp.argmax(mask, axis=1)
      frame = jnp.take_along_axis(x0, first[:, None, None, None, None], axis=1)[:, 0]
      cond["embedding"] = model.clip.image_embedding(frozen["clip"], frame, raw=raw)
      cond["scalars"] = {"fps": batch["fps"], "frame_skip": batch["mask_skip"]}
      cond["extra"] = masked_video_inputs(x0, mask)
    if model.uses_text:
      cond.update(
        self.caption_context(
          model, frozen["clip"], batch["tokens"], batch["token_mask"], batch.get("has_caption")
        )
      )
    if model.unclip:
      cond.update(self.unclip_text(model, frozen["clip"], batch["tokens"], batch["token_mask"]))
      cond["drop_image"] = jnp.zeros((b,), bool)
    if self.is_super_resolution:
      low = resize_frames(x0, config.conditioning.low_resolution)
      cond.update(self.low_resolution_input(model, config, low, x0.shape[2], rng))
    return cond

  def loss_fn(self, model: StageModel, config, params, batch: Batch, rng: Array, frozen=None):
    """The denoising loss of one batch: (loss, aux metrics)."""
    cond_rng, drop_rng, loss_rng, dropout_rng = jax.random.split(rng, 4)
    x0 = to_model_space(batch["frames"])
    cond = self.condition(model, config, x0, batch, frozen, cond_rng)
    if model.unclip:
      null = self.unclip_null(model, frozen["clip"], x0.shape[0])
      cond = self.drop_unclip(drop_rng, cond, null, config.diffusion.cond_dropout)
    elif cond["embedding"] is not None:
      # Embedding and caption are dropped together: the guidance's null condition lacks both.
      keys = [k for k in ("embedding", "context_mask") if k in cond]
      dropped = diffusion.drop_conditioning(
        drop_rng, {k: cond[k] for k in keys}, config.diffusion.cond_dropout
      )
      cond.update(dropped)
    image_mode = self.image_mode(config)

    def predict(z, t):
      return model.net.apply(
        {"params": params},
        z,
        t,
        **self._net_kwargs(cond, image_mode),
        deterministic=False,
        rngs={"dropout": dropout_rng},
      )

    schedule = discrete_schedule(config)
    if schedule is not None:  # Karlo: integer timesteps, + the VLB term for learned variance
      loss, _ = discrete.loss_discrete(predict, x0, loss_rng, schedule)
      return loss, {"loss": loss}
    loss, _ = diffusion.loss_from_config(predict, x0, loss_rng, config.diffusion)
    return loss, {"loss": loss}

  # -- sampling ----------------------------------------------------------------------------------

  def generate(
    self,
    model: StageModel,
    config,
    params,
    cond: dict,
    shape: tuple[int, ...],
    rng: Array,
    *,
    sampling=None,
    negative_embedding: Array | None = None,
    init: Array | None = None,
    strength: float = 1.0,
    image_mode: bool = False,
    params_last=None,
    noise: Array | None = None,
    step_noise: Array | None = None,
  ) -> Array:
    """Samples clips of `shape` [b, f, h, w, 3] in [-1, 1] given `cond` {embedding, scalars, extra}
    (a Karlo UNet also reads {text_embedding, context, context_mask} and, for guidance, "null":
    the empty caption's {text_embedding, context, context_mask}).

    Args:
      sampling: the `sampling` config section to use (default: the stage config's).
      negative_embedding: [b, d] embedding guidance steers away from (default: the null, zeros).
      init: a clip to vary: it is noised to time `strength` and denoised from there.
      strength: how much of `init` is replaced (1: none of it is kept).
      image_mode: frames are independent images (image-stage samples); SR_h always is.
      params_last: parameters used for the last step only (a discrete schedule; Karlo's
        super_res_last).
      noise: the initial noise [b, f, h, w, 3] and `step_noise` [steps, b, f, h, w, 3] the
        per-step noises of a discrete schedule (tests inject another implementation's; default:
        drawn from rng).
    """
    s, d = sampling or config.sampling, config.diffusion
    per_frame = self.name == "sr_high"
    b = shape[0]
    raw_cond = cond
    cond = {
      "embedding": cond.get("embedding"),
      "scalars": cond.get("scalars", {}),
      "extra": cond.get("extra"),
      **{
        k: cond[k]
        for k in ("context", "context_mask", "context_ids", "text_embedding")
        if cond.get(k) is not None
      },
    }
    if model.unclip:
      cond["drop_image"] = jnp.zeros((b,), bool)
    if model.uses_text and "context" not in cond:
      raise errors.UserError(
        f"this {self.name} model reads caption tokens (model.text_motion): pass "
        f"cond['context'] and cond['context_mask'] (VideoStage.caption_context; an all-False mask "
        f"for no caption)"
      )

    def model_fn(z, t, c, params=params):
      if per_frame:  # each frame an image [n, 1, h, w, c], one frame at a time (bounded memory)

        def one_frame(inputs):
          z_f, extra_f = inputs
          frame_cond = dict(c, extra=extra_f[:, None])
          return model.net.apply(
            {"params": params}, z_f[:, None], t, **self._net_kwargs(frame_cond, True)
          )[:, 0]

        frames = jax.lax.map(one_frame, (jnp.swapaxes(z, 0, 1), jnp.swapaxes(c["extra"], 0, 1)))
        return jnp.swapaxes(frames, 0, 1)
      return model.net.apply({"params": params}, z, t, **self._net_kwargs(c, image_mode))

    guided = cond["embedding"] is not None and s.guidance_scale != 1.0
    schedule = discrete_schedule(config, s)
    learned = schedule is not None and schedule.variance_type == "learned_range"
    if guided and model.unclip:
      if "null" not in raw_cond:
        raise errors.UserError(
          f"this {self.name} (a Karlo UNet) guides against the empty caption: pass cond['null'] "
          "(VideoStage.unclip_null)"
        )
      uncond = dict(cond, **raw_cond["null"])
      if negative_embedding is None:
        uncond["drop_image"] = jnp.ones((b,), bool)  # the learned null image embedding
      else:
        uncond["embedding"] = negative_embedding
      denoise = diffusion.guided_model(
        model_fn, cond, uncond, s.guidance_scale, guided_channels=3 if learned else None
      )
    elif guided:
      uncond = dict(cond)
      uncond["embedding"] = (
        jnp.zeros_like(cond["embedding"]) if negative_embedding is None else negative_embedding
      )
      if "context_mask" in cond:  # the null condition has no caption either
        uncond["context_mask"] = jnp.zeros_like(cond["context_mask"])
      denoise = diffusion.guided_model(model_fn, cond, uncond, s.guidance_scale)
    else:
      denoise = functools.partial(model_fn, c=cond)
    noise_rng, step_rng = jax.random.split(rng)
    if noise is None:
      noise = diffusion.gaussian_noise(noise_rng, shape, share_across_frames=per_frame)
    if schedule is not None:
      if init is not None:
        raise errors.UserError(
          f"variations (init, strength) are not supported by this {self.name}'s discrete schedule"
        )
      last = None
      if params_last is not None:
        last = functools.partial(model_fn, c=cond, params=params_last)
        if guided:
          raise errors.UserError("a last-step model is not supported with guidance")
      out = discrete.sample_discrete(
        denoise,
        schedule,
        noise,
        step_rng,
        num_steps=s.num_steps,
        denoise_fn_last=last,
        step_noise=step_noise,
        share_noise_across_frames=per_frame,
      )
      return jnp.clip(out, -1.0, 1.0)
    schedule = schedule_from_config(d)
    if init is not None:
      noise = add_noise(schedule, init.astype(jnp.float32), noise, jnp.full((b,), strength))
    out = diffusion.sample(
      denoise,
      schedule,
      noise,
      step_rng,
      sampler=s.sampler,
      num_steps=s.num_steps,
      target=d.target,
      eta=s.eta,
      share_noise_across_frames=per_frame,
      clip_x0=1.0,
      t_start=strength if init is not None else 1.0,
    )
    # The last step leaves sigma_min * eps of noise: clip to the pixel range.
    return jnp.clip(out, -1.0, 1.0)

  def sample(self, model: StageModel, config, params, batch: Batch, rng: Array, frozen=None):
    """Training-time samples conditioned like the first clips of `batch` (written to the workdir)."""
    x0 = to_model_space(batch["frames"])
    cond = self.condition(model, config, x0, batch, frozen, jax.random.key(0))
    if self.name == "decoder":  # condition on the first frame, as at sampling time
      raw = raw_embeddings(config)
      cond["embedding"] = model.clip.image_embedding(frozen["clip"], x0[:, 0], raw=raw)
    if model.unclip:
      cond["null"] = self.unclip_null(model, frozen["clip"], x0.shape[0])
    if self.is_super_resolution:  # a fixed, small augmentation level
      low = resize_frames(x0, config.conditioning.low_resolution)
      cond = {
        "embedding": None,
        **self.low_resolution_input(
          model,
          config,
          low,
          x0.shape[2],
          rng,
          level=config.sampling.aug_level,
          share_across_frames=self.name == "sr_high",
        ),
      }
    image_mode = self.image_mode(config) and self.name != "sr_high"
    return self.generate(model, config, params, cond, x0.shape, rng, image_mode=image_mode)


DECODER, INTERP, SR_LOW, SR_HIGH = (VideoStage(n) for n in NAMES)
