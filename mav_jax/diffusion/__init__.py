"""Diffusion maths as pure functions of arrays: schedules, targets, losses, guidance, samplers."""

from mav_jax.diffusion.augment import noise_augment
from mav_jax.diffusion.discrete import DiscreteSchedule, loss_discrete, sample_discrete
from mav_jax.diffusion.guidance import (
  drop_conditioning,
  guide,
  guided_model,
)
from mav_jax.diffusion.losses import diffusion_loss, loss_from_config
from mav_jax.diffusion.samplers import gaussian_noise, sample
from mav_jax.diffusion.schedules import NoiseSchedule, add_noise, resolution_shifted

__all__ = [
  "DiscreteSchedule",
  "NoiseSchedule",
  "add_noise",
  "diffusion_loss",
  "drop_conditioning",
  "gaussian_noise",
  "guide",
  "guided_model",
  "loss_discrete",
  "loss_from_config",
  "noise_augment",
  "resolution_shifted",
  "sample",
  "sample_discrete",
]
