"""Samplers: DDPM ancestral, DDIM (with eta) and DPM-Solver++(2M), each one `lax.fori_loop`.

All walk a time grid 1 = t_0 > t_1 > ... > t_N = 0 (uniform in log-SNR by default) with a model `denoise_fn(z, t)` that
returns its prediction in parameterisation `target` ("eps", "x0" or "v"); classifier-free guidance is
applied by wrapping the model (`mav_jax.diffusion.guidance.guided_model`). The functions are pure
and jit-friendly: jit the caller with `sampler`, `num_steps` and `target` static.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from mav_jax import errors
from mav_jax.diffusion import targets
from mav_jax.diffusion.schedules import NoiseSchedule

Array = jax.Array
DenoiseFn = Callable[[Array, Array], Array]
SAMPLERS = ("ddpm", "ddim", "dpm++2m")


def gaussian_noise(
  rng: jax.Array, shape: tuple[int, ...], share_across_frames: bool = False, frame_axis: int = 1
) -> Array:
  """Standard normal noise; with `share_across_frames` one draw is repeated along `frame_axis`.

  Sharing the noise makes every frame start (and stay, for stochastic steps) from the same draw, so
  per-frame models such as SR_h hallucinate the same detail in every frame.
  """
  if not share_across_frames:
    return jax.random.normal(rng, shape, jnp.float32)
  one = list(shape)
  one[frame_axis] = 1
  return jnp.broadcast_to(jax.random.normal(rng, tuple(one), jnp.float32), shape)


def _ddpm_step(z, x0, eps, a_t, s_t, a_s, s_s, noise, is_last):
  """Ancestral step: a draw from the posterior q(z_s | z_t, x0 = x0_hat)."""
  del eps
  a_ts = a_t / a_s
  var_ts = jnp.maximum(s_t**2 - a_ts**2 * s_s**2, 0.0)
  mean = (a_ts * s_s**2 / s_t**2) * z + (a_s * var_ts / s_t**2) * x0
  std = jnp.sqrt(var_ts * s_s**2 / s_t**2)
  return mean + jnp.where(is_last, 0.0, std) * noise


def _ddim_step(z, x0, eps, a_t, s_t, a_s, s_s, noise, is_last, eta):
  """DDIM (Song et al. 2021): deterministic for eta=0, DDPM-like variance for eta=1."""
  del z
  sig = eta * (s_s / s_t) * jnp.sqrt(jnp.maximum(1.0 - (a_t / a_s) ** 2, 0.0))
  sig = jnp.where(is_last, 0.0, sig)
  return a_s * x0 + jnp.sqrt(jnp.maximum(s_s**2 - sig**2, 0.0)) * eps + sig * noise


def sample(
  denoise_fn: DenoiseFn,
  schedule: NoiseSchedule,
  noise: Array,
  rng: jax.Array,
  *,
  sampler: str = "ddim",
  num_steps: int = 50,
  target: str = "eps",
  eta: float = 0.0,
  share_noise_across_frames: bool = False,
  frame_axis: int = 1,
  clip_x0: float | None = None,
  spacing: str = "logsnr",
  t_start: float = 1.0,
) -> Array:
  """Integrates the reverse process from `noise` at t=1 to a sample at t=0.

  Args:
    denoise_fn: model prediction function (z [b, ...], t [b]) -> prediction.
    schedule: the noise schedule the model was trained with.
    noise: the initial z_1, e.g. from `gaussian_noise` (shared across frames for SR_h).
    rng: key for the per-step noise of stochastic samplers (DDPM, DDIM with eta > 0).
    sampler: "ddpm", "ddim" or "dpm++2m".
    num_steps: number of model evaluations.
    target: the model's parameterisation.
    eta: DDIM stochasticity (0 = deterministic ODE).
    share_noise_across_frames: per-step noise is shared along `frame_axis`, like the initial noise.
    frame_axis: the frames axis of z.
    clip_x0: clip predicted x0 to [-clip_x0, clip_x0] (None: no clipping).
    spacing: time grid, "logsnr" (uniform in log-SNR) or "time" (uniform in t).
    t_start: the time `noise` is at: 1 for pure noise; < 1 for an input noised to that time with
      `add_noise` (variations keep the input's layout and change its detail).

  Returns:
    The sample, shaped like `noise`.
  """
  if sampler not in SAMPLERS:
    raise errors.UserError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
  if num_steps < 1:
    raise errors.UserError(f"num_steps must be >= 1, got {num_steps}")
  b = noise.shape[0]
  ts = schedule.time_grid(num_steps, spacing, t_start)
  expand = lambda a: jnp.reshape(a, (1,) * noise.ndim)  # noqa: E731

  def body(i, carry):
    z, x0_prev = carry
    t, s = ts[i], ts[i + 1]
    (a_t, s_t), (a_s, s_s) = schedule.alpha_sigma(t), schedule.alpha_sigma(s)
    a_t, s_t, a_s, s_s = map(expand, (a_t, s_t, a_s, s_s))
    times = jnp.broadcast_to(t, (b,))
    pred = denoise_fn(z, times).astype(jnp.float32)
    x0, eps = targets.to_x0_eps(pred, z, a_t, s_t, target)
    if clip_x0 is not None:
      x0 = jnp.clip(x0, -clip_x0, clip_x0)
      eps = (z - a_t * x0) / s_t
    is_last = i == num_steps - 1
    if sampler == "dpm++2m":
      lam = lambda a, s: jnp.log(a) - jnp.log(s)  # noqa: E731
      h = lam(a_s, s_s) - lam(a_t, s_t)
      t_prev = ts[jnp.maximum(i - 1, 0)]
      a_p, s_p = map(expand, schedule.alpha_sigma(t_prev))
      r = jnp.where(i == 0, 1.0, (lam(a_t, s_t) - lam(a_p, s_p)) / h)
      d2 = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
      # First order on the first step (no history) and on the last: the step into t=0 is the
      # largest in log-SNR, and extrapolating the history over it amplifies its error.
      first_order = (i == 0) | is_last
      d = jnp.where(first_order, x0, d2)
      z_next = (s_s / s_t) * z - a_s * jnp.expm1(-h) * d
    else:
      step_noise = gaussian_noise(
        jax.random.fold_in(rng, i), z.shape, share_noise_across_frames, frame_axis
      )
      step = _ddpm_step if sampler == "ddpm" else functools.partial(_ddim_step, eta=eta)
      z_next = step(z, x0, eps, a_t, s_t, a_s, s_s, step_noise, is_last)
    return z_next, x0

  z, _ = jax.lax.fori_loop(
    0, num_steps, body, (noise.astype(jnp.float32), jnp.zeros(noise.shape, jnp.float32))
  )
  return z
