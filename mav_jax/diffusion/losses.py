"""The denoising training loss shared by every diffusion stage."""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from mav_jax.diffusion import targets
from mav_jax.diffusion.schedules import NoiseSchedule, broadcast_to, schedule_from_config

Array = jax.Array
# predict_fn(z_t, t) -> prediction in the stage's parameterisation; conditioning is closed over.
PredictFn = Callable[[Array, Array], Array]


def diffusion_loss(
  predict_fn: PredictFn,
  x0: Array,
  rng: jax.Array,
  schedule: NoiseSchedule,
  target: str = "eps",
  weighting: str = "plain",
  min_snr_gamma: float = 5.0,
) -> tuple[Array, dict[str, Array]]:
  """Noises x0 at uniform random times and regresses the model onto the `target` parameterisation.

  Args:
    predict_fn: the model, closed over its parameters and conditioning.
    x0: clean data [b, ...].
    rng: key for the times and the noise.
    schedule: noise schedule.
    target: "eps", "x0" or "v".
    weighting: "plain" or "min_snr".
    min_snr_gamma: gamma of min-SNR weighting.

  Returns:
    (loss, aux): the batch-mean weighted loss, and per-example `t` and `loss` for metrics.
  """
  t_rng, noise_rng = jax.random.split(rng)
  t = jax.random.uniform(t_rng, (x0.shape[0],))
  noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
  logsnr = schedule.logsnr(t)
  alpha, sigma = schedule.alpha_sigma(t)
  a, s = broadcast_to(alpha, x0), broadcast_to(sigma, x0)
  z = a * x0 + s * noise
  pred = predict_fn(z, t).astype(jnp.float32)
  goal = targets.target_from(x0, noise, a, s, target)
  per_example = jnp.mean(jnp.square(pred - goal), axis=tuple(range(1, x0.ndim)))
  per_example = per_example * targets.loss_weight(logsnr, target, weighting, min_snr_gamma)
  return jnp.mean(per_example), {"t": t, "loss": per_example}


def loss_from_config(
  predict_fn: PredictFn, x0: Array, rng: jax.Array, diffusion_config
) -> tuple[Array, dict[str, Array]]:
  """`diffusion_loss` with the schedule, target and weighting of a config's `diffusion` section."""
  d = diffusion_config
  return diffusion_loss(
    predict_fn,
    x0,
    rng,
    schedule_from_config(d),
    target=d.target,
    weighting=d.weighting,
    min_snr_gamma=d.min_snr_gamma,
  )
