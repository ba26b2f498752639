"""Noise augmentation of a low-resolution conditioning input (cascaded super-resolution).

A super-resolution stage trained on clean low-resolution inputs breaks on the artefacts of the stage
below it; noising its conditioning input at a random level during training, and at a fixed level
at sampling time, makes it robust (Ho et al., "Cascaded Diffusion Models", 2021). The level is also
fed to the model as a scalar condition.
"""

import jax
import jax.numpy as jnp

from mav_jax.diffusion.samplers import gaussian_noise
from mav_jax.diffusion.schedules import NoiseSchedule, add_noise

Array = jax.Array


def noise_augment(
  rng: jax.Array,
  x: Array,
  schedule: NoiseSchedule,
  level: float | Array | None = None,
  max_level: float = 0.5,
  share_across_frames: bool = False,
) -> tuple[Array, Array]:
  """Noises a conditioning input at diffusion time `level` (per example).

  Args:
    rng: key for the level (when sampled) and the noise.
    x: low-resolution conditioning input [b, ...].
    schedule: the noise schedule that defines what a level means.
    level: fixed level in [0, 1] (a scalar or [b]) at sampling time; None samples U(0, max_level)
      per example, for training.
    max_level: upper bound of the sampled level.
    share_across_frames: one noise draw for every frame of a clip [b, f, ...] (per-frame SR_h:
      identical frames must get identical conditioning inputs).

  Returns:
    (x_aug, level): the noised input and the [b] levels, to pass to the model as a condition.
  """
  level_rng, noise_rng = jax.random.split(rng)
  b = x.shape[0]
  if level is None:
    level = jax.random.uniform(level_rng, (b,), maxval=max_level)
  level = jnp.broadcast_to(jnp.asarray(level, jnp.float32), (b,))
  noise = gaussian_noise(noise_rng, x.shape, share_across_frames)
  return add_noise(schedule, x, noise, level), level
