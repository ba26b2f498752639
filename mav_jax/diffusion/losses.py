"""The denoising training loss shared by every diffusion stage."""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from mav_jax import errors
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
  frame_noise: float = 0.0,
) -> tuple[Array, dict[str, Array]]:
  """Noises x0 at uniform random times and regresses the model onto the `target` parameterisation.

  With `frame_noise` > 0, that fraction of the clips (x0 [b, f, h, w, c] with f > 1) draws an
  independent time per frame (as in Diffusion Forcing, Chen et al. 2024) and the model gets times
  [b, f]: some frames are then nearly clean while others are noise, so what the clean ones show
  and the condition (a caption's "moving left") decide the noisy ones, a lesson that equal noise
  on every frame teaches only weakly. The loss is weighted per frame by its own time.

  Args:
    predict_fn: the model, closed over its parameters and conditioning.
    x0: clean data [b, ...].
    rng: key for the times and the noise.
    schedule: noise schedule.
    target: "eps", "x0" or "v".
    weighting: "plain" or "min_snr".
    min_snr_gamma: gamma of min-SNR weighting.
    frame_noise: probability that a clip's frames get independent times (0: never).

  Returns:
    (loss, aux): the batch-mean weighted loss, and per-example `t` and `loss` for metrics.
  """
  if not 0.0 <= frame_noise <= 1.0:
    raise errors.UserError(f"diffusion.frame_noise is a probability in [0, 1], got {frame_noise}")
  t_rng, noise_rng, frame_rng = jax.random.split(rng, 3)
  t = jax.random.uniform(t_rng, (x0.shape[0],))
  if frame_noise and x0.ndim == 5 and x0.shape[1] > 1:
    pick_rng, times_rng = jax.random.split(frame_rng)
    independent = jax.random.bernoulli(pick_rng, frame_noise, (x0.shape[0], 1))
    t = jnp.where(independent, jax.random.uniform(times_rng, x0.shape[:2]), t[:, None])
  noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
  logsnr = schedule.logsnr(t)
  alpha, sigma = schedule.alpha_sigma(t)
  a, s = broadcast_to(alpha, x0), broadcast_to(sigma, x0)
  z = a * x0 + s * noise
  pred = predict_fn(z, t).astype(jnp.float32)
  goal = targets.target_from(x0, noise, a, s, target)
  # Squared error per time (per example, or per frame), weighted by that time's noise level.
  error = jnp.mean(jnp.square(pred - goal), axis=tuple(range(t.ndim, x0.ndim)))
  weighted = error * targets.loss_weight(logsnr, target, weighting, min_snr_gamma)
  per_example = jnp.mean(weighted, axis=tuple(range(1, t.ndim)))
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
    frame_noise=float(d.get("frame_noise", 0.0)),
  )
