"""The prior P: a diffusion model from a caption (CLIP text embedding and token features) to a CLIP
image embedding, trained on image-text pairs only (`data.kind == "image"`), never on video.

The target is the scaled-unit CLIP image embedding of the paired image (`stages.common`); the
condition (text embedding, token features, token mask) is dropped as a whole for classifier-free
guidance. Sampling returns scaled-unit embeddings, the form D^t and ↑F are conditioned on.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp

from mav_jax import diffusion, errors
from mav_jax.diffusion import discrete
from mav_jax.diffusion.schedules import schedule_from_config
from mav_jax.models.common import Array
from mav_jax.models.prior import DiffusionPrior
from mav_jax.stages.common import (
  discrete_schedule,
  frozen_clip,
  raw_embeddings,
  scaled_unit,
  to_model_space,
)


class PriorModel:
  """The prior network (`net`) and the frozen CLIP it reads captions and images with (`clip`)."""

  def __init__(self, config):
    self.config = config
    m = config.model
    self.net = DiffusionPrior(
      embed_dim=config.conditioning.embedding_dim,
      width=m.width,
      layers=m.layers,
      heads=m.heads,
      max_tokens=config.data.max_tokens,
      activation=m.activation,
      causal=bool(m.get("causal", False)),
      time_scale=float(m.get("time_scale", 1000.0)),
      clip_stats=bool(m.get("clip_stats", False)),
      dtype=jnp.dtype(m.dtype),
      param_dtype=jnp.dtype(m.param_dtype),
    )

  @functools.cached_property
  def clip(self):
    clip = frozen_clip(self.config, check_tokens=True)
    width = clip.config.model.text_width
    if width != self.config.conditioning.text_width:
      raise errors.UserError(
        f"conditioning.clip has a text tower of width {width} but conditioning.text_width is "
        f"{self.config.conditioning.text_width}; set --config.conditioning.text_width={width}"
      )
    return clip


def make_model(config) -> PriorModel:
  return PriorModel(config)


def load_frozen(model: PriorModel, config, mesh) -> dict[str, Any]:
  return {"clip": model.clip.load(mesh, config.sharding.strategy)}


def init(model: PriorModel, config, rng: Array) -> Any:
  d, c = config.conditioning.embedding_dim, config.conditioning
  length = config.data.max_tokens
  return model.net.init(
    rng,
    jnp.zeros((1, d)),
    jnp.zeros((1,)),
    jnp.zeros((1, d)),
    jnp.zeros((1, length, c.text_width)),
    jnp.ones((1, length), bool),
  )["params"]


def text_condition(
  model: PriorModel, clip_params, tokens: Array, token_mask: Array, raw: bool = False
) -> dict:
  """The prior's condition for token ids [b, l]: text embedding (raw with `raw`), token features,
  mask."""
  text, features = model.clip.text(clip_params, tokens, raw=raw)
  return {"text": text, "features": features, "mask": token_mask.astype(bool)}


def null_condition(model: PriorModel, config, clip_params, batch: int) -> dict | None:
  """The condition guidance and condition dropout fall back to: the encoding of the empty caption
  for a Karlo prior (raw embeddings, as it was trained), None (zeros) otherwise."""
  if not raw_embeddings(config):
    return None
  return text_condition(model, clip_params, *model.clip.null_tokens(batch), raw=True)


def _normalised(model: PriorModel, params, e: Array) -> Array:
  return model.net.apply({"params": params}, e, method=DiffusionPrior.normalise_embedding)


def _raw(model: PriorModel, params, x: Array) -> Array:
  return model.net.apply({"params": params}, x, method=DiffusionPrior.raw_embedding)


def _predict(model: PriorModel, params, z, t, cond, deterministic=True):
  del deterministic
  return model.net.apply({"params": params}, z, t, cond["text"], cond["features"], cond["mask"])


def loss_fn(model: PriorModel, config, params, batch, rng: Array, frozen=None):
  """Denoising loss on the CLIP image embedding of each image, given its caption."""
  drop_rng, loss_rng = jax.random.split(rng)
  clip_params = frozen["clip"]
  raw = raw_embeddings(config)
  cond = text_condition(model, clip_params, batch["tokens"], batch["token_mask"], raw=raw)
  null = null_condition(model, config, clip_params, batch["tokens"].shape[0])
  cond = diffusion.drop_conditioning(drop_rng, cond, config.diffusion.cond_dropout, null)
  frames = to_model_space(batch["frames"])[:, 0]
  target = model.clip.image_embedding(clip_params, frames, raw=raw)
  schedule = discrete_schedule(config)
  if schedule is not None:  # Karlo: x0 of the normalised embedding, integer timesteps
    if model.net.clip_stats:
      target = _normalised(model, params, target)
    loss, _ = discrete.loss_discrete(
      lambda z, t: _predict(model, params, z, t, cond), target, loss_rng, schedule
    )
    return loss, {"loss": loss}
  loss, _ = diffusion.loss_from_config(
    lambda z, t: _predict(model, params, z, t, cond), target, loss_rng, config.diffusion
  )
  return loss, {"loss": loss}


def generate(
  model: PriorModel,
  config,
  params,
  clip_params,
  tokens: Array,
  token_mask: Array,
  rng: Array,
  *,
  negative: tuple[Array, Array] | None = None,
  sampling=None,
  noise: Array | None = None,
  step_noise: Array | None = None,
) -> Array:
  """Scaled-unit image embeddings [b, d] for captions `tokens` [b, l] (mask [b, l]); raw ones
  for a prior with `conditioning.embedding_norm="raw"` (Karlo's).

  `negative`: (tokens, mask) of a negative prompt that guidance steers away from (default: the
  null condition: zeros, or the empty caption's encoding for a Karlo prior). `sampling`
  overrides the config's sampling section. `noise` [b, d] and `step_noise` [steps, b, d]: the
  initial and per-step noises (tests inject another implementation's; default: drawn from rng).
  """
  s, d = sampling or config.sampling, config.diffusion
  raw = raw_embeddings(config)
  cond = text_condition(model, clip_params, tokens, token_mask, raw=raw)
  if negative is not None:
    uncond = text_condition(model, clip_params, *negative, raw=raw)
  else:
    uncond = null_condition(model, config, clip_params, tokens.shape[0])
    uncond = diffusion.guidance.null_like(cond) if uncond is None else uncond

  def model_fn(z, t, c):
    return _predict(model, params, z, t, c)

  if s.guidance_scale != 1.0:
    denoise = diffusion.guided_model(model_fn, cond, uncond, s.guidance_scale)
  else:
    denoise = functools.partial(model_fn, c=cond)
  noise_rng, step_rng = jax.random.split(rng)
  shape = (tokens.shape[0], config.conditioning.embedding_dim)
  schedule = discrete_schedule(config, s)
  if schedule is not None:
    noise = diffusion.gaussian_noise(noise_rng, shape) if noise is None else noise
    out = discrete.sample_discrete(
      denoise, schedule, noise, step_rng, num_steps=s.num_steps, step_noise=step_noise
    )
    return _raw(model, params, out) if model.net.clip_stats else out
  out = diffusion.sample(
    denoise,
    schedule_from_config(d),
    diffusion.gaussian_noise(noise_rng, shape),
    step_rng,
    sampler=s.sampler,
    num_steps=s.num_steps,
    target=d.target,
    eta=s.eta,
  )
  return scaled_unit(out)


def evaluate(model: PriorModel, config, params, clip_params, batch, rng: Array) -> dict[str, Array]:
  """Mean cosine similarity of sampled and true image embeddings, and the same for the text
  embedding itself as a baseline (a prior must beat it to be worth having)."""
  sampled = generate(model, config, params, clip_params, batch["tokens"], batch["token_mask"], rng)
  sampled = scaled_unit(sampled)  # a Karlo prior samples raw embeddings
  true = model.clip.image_embedding(clip_params, to_model_space(batch["frames"])[:, 0])
  text, _ = model.clip.text(clip_params, batch["tokens"])
  d = true.shape[-1]
  return {
    "prior_cosine": jnp.mean(jnp.sum(sampled * true, -1)) / d,
    "text_cosine": jnp.mean(jnp.sum(text * true, -1)) / d,
  }
