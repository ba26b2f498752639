"""Decoder D^t: what the stage feeds the SpaceTimeUNet, how its loss is formed, how it samples.

D^t maps an image embedding (CLIP's, in the paper) and an fps to a video. Unlabelled video trains
it because the embedding is taken from a frame of the clip itself. Until the CLIP stage lands, a
small trainable `FrameEncoder` stands in for CLIP's image encoder and is trained jointly, so the
stage is self-contained on the synthetic data. `data.kind == "image"` trains the spatial layers on
single frames (image mode: temporal layers skipped); "video" trains on clips with fps.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mav_jax import diffusion
from mav_jax.diffusion.schedules import schedule_from_config
from mav_jax.models import axes, unet_from_config
from mav_jax.models.common import Array, Dtype, dense, spatial_conv

Batch = dict[str, Array]


class FrameEncoder(nn.Module):
  """A small CNN from one frame [b, h, w, 3] to a [b, features] embedding (stand-in for CLIP).

  Attributes:
    features: embedding width.
    channels: width of the first conv (doubled at each of three stride-2 convs).
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  features: int
  channels: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, frame: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = frame.astype(self.dtype)
    for i in range(3):
      h = nn.silu(spatial_conv(self.channels * 2**i, strides=2, name=f"conv_{i}", **kw)(h))
    h = jnp.mean(h, axis=(-3, -2))
    return dense(self.features, axes.CHANNELS_IN, axes.CONTEXT, name="proj", **kw)(h)


class DecoderModel(nn.Module):
  """The SpaceTimeUNet plus its embedding source, in one parameter tree ("unet", "encoder").

  Attributes:
    config: the stage config (its `model` and `data` sections are used).
  """

  config: Any

  def setup(self):
    self.unet = unet_from_config(self.config.model)
    self.encoder = FrameEncoder(
      self.config.data.embedding_dim,
      dtype=jnp.dtype(self.config.model.dtype),
      param_dtype=jnp.dtype(self.config.model.param_dtype),
    )

  def embed(self, frame: Array) -> Array:
    return self.encoder(frame)

  def denoise(self, z, t, embedding, fps=None, image_mode=False, deterministic=True):
    scalars = {} if fps is None else {"fps": fps}
    return self.unet(
      z,
      t,
      scalars=scalars,
      global_embedding=embedding,
      image_mode=image_mode,
      deterministic=deterministic,
    )

  def __call__(self, z, t, frame, fps=None, image_mode=False):
    return self.denoise(z, t, self.embed(frame), fps, image_mode)


def make_model(config) -> DecoderModel:
  return DecoderModel(config)


def to_model_space(frames: Array) -> Array:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return frames.astype(jnp.float32) / 127.5 - 1.0


def image_mode(config) -> bool:
  return config.data.kind == "image"


def example_inputs(config, batch_size: int) -> tuple:
  """Dummy (z, t, frame, fps) for initialisation."""
  d = config.data
  frames = 1 if image_mode(config) else d.num_frames
  z = jnp.zeros((batch_size, frames, d.resolution, d.resolution, 3))
  fps = None if image_mode(config) else jnp.ones((batch_size,))
  return z, jnp.zeros((batch_size,)), jnp.zeros((batch_size, d.resolution, d.resolution, 3)), fps


def init(model: DecoderModel, config, rng: Array) -> Any:
  z, t, frame, fps = example_inputs(config, 1)
  return model.init(rng, z, t, frame, fps, image_mode=image_mode(config))["params"]


def loss_fn(model: DecoderModel, config, params, batch: Batch, rng: Array):
  """The denoising loss of one batch: (loss, aux metrics)."""
  frame_rng, drop_rng, loss_rng, dropout_rng = jax.random.split(rng, 4)
  x0 = to_model_space(batch["frames"])
  b, f = x0.shape[:2]
  # The conditioning frame: a random frame of each clip (the only frame, for images).
  pick = jax.random.randint(frame_rng, (b,), 0, f)
  frame = jnp.take_along_axis(x0, pick[:, None, None, None, None], axis=1)[:, 0]
  embedding = model.apply({"params": params}, frame, method=DecoderModel.embed)
  embedding = diffusion.drop_conditioning(drop_rng, embedding, config.diffusion.cond_dropout)
  fps = None if image_mode(config) else batch["fps"]

  def predict(z, t):
    return model.apply(
      {"params": params},
      z,
      t,
      embedding,
      fps,
      image_mode(config),
      deterministic=False,
      method=DecoderModel.denoise,
      rngs={"dropout": dropout_rng},
    )

  d = config.diffusion
  loss, aux = diffusion.diffusion_loss(
    predict,
    x0,
    loss_rng,
    schedule_from_config(d),
    target=d.target,
    weighting=d.weighting,
    min_snr_gamma=d.min_snr_gamma,
  )
  return loss, {"loss": loss}


def sample(model: DecoderModel, config, params, batch: Batch, rng: Array) -> Array:
  """Videos [b, f, h, w, 3] in [-1, 1] conditioned on the first frame and fps of `batch`'s clips."""
  s, d = config.sampling, config.diffusion
  x0 = to_model_space(batch["frames"])
  embedding = model.apply({"params": params}, x0[:, 0], method=DecoderModel.embed)
  fps = None if image_mode(config) else batch["fps"]
  cond = {"embedding": embedding, "fps": fps}
  uncond = {"embedding": jnp.zeros_like(embedding), "fps": fps}

  def model_fn(z, t, c):
    return model.apply(
      {"params": params},
      z,
      t,
      c["embedding"],
      c["fps"],
      image_mode(config),
      method=DecoderModel.denoise,
    )

  noise_rng, step_rng = jax.random.split(rng)
  noise = diffusion.gaussian_noise(noise_rng, x0.shape)
  denoise = diffusion.guided_model(model_fn, cond, uncond, s.guidance_scale)
  return diffusion.sample(
    denoise,
    schedule_from_config(d),
    noise,
    step_rng,
    sampler=s.sampler,
    num_steps=s.num_steps,
    target=d.target,
    eta=s.eta,
    clip_x0=1.0,
  )
