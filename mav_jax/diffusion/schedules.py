"""Variance-preserving noise schedules in continuous time t in [0, 1], parameterised by log-SNR.

z_t = alpha_t * x + sigma_t * eps with alpha_t^2 + sigma_t^2 = 1 and logsnr_t = log(alpha^2 / sigma^2),
decreasing from `logsnr_max` at t=0 (clean) to `logsnr_min` at t=1 (pure noise).

High-resolution stages see the same image with more pixels, which averages noise away; the
resolution shift (Hoogeboom et al., "simple diffusion", 2023) adds 2*log(base / resolution) to the
log-SNR so a 256px stage is as noisy at time t as a 64px stage.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from mav_jax import errors

Array = jax.Array

KINDS = ("cosine", "linear")

# Continuous-time limit of DDPM's linear betas 1e-4 .. 0.02 over 1000 steps (Song et al. VP-SDE).
_LINEAR_BETA_MIN, _LINEAR_BETA_MAX = 0.1, 20.0


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
  """A log-SNR schedule; frozen and hashable, so it can be closed over by jit-compiled code.

  Attributes:
    kind: "cosine" (Nichol & Dhariwal) or "linear" (DDPM betas, continuous time).
    logsnr_min: log-SNR at t=1.
    logsnr_max: log-SNR at t=0.
    shift: resolution / base_resolution; log-SNR is lowered by 2*log(shift) (1 = no shift).
  """

  kind: str = "cosine"
  logsnr_min: float = -15.0
  logsnr_max: float = 15.0
  shift: float = 1.0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise errors.UserError(f"unknown schedule kind {self.kind!r}; choose one of {KINDS}")
    if not self.logsnr_min < self.logsnr_max:
      raise errors.UserError(
        f"need logsnr_min < logsnr_max, got {self.logsnr_min}, {self.logsnr_max}"
      )
    if self.shift <= 0:
      raise errors.UserError(
        f"shift must be positive (resolution / base resolution), got {self.shift}"
      )

  def logsnr(self, t: Array) -> Array:
    """log(alpha_t^2 / sigma_t^2) for t in [0, 1]."""
    t = jnp.asarray(t, jnp.float32)
    if self.kind == "cosine":
      # -2 log tan(a t + b), with a, b chosen so t=0 -> logsnr_max and t=1 -> logsnr_min.
      b = math.atan(math.exp(-0.5 * self.logsnr_max))
      a = math.atan(math.exp(-0.5 * self.logsnr_min)) - b
      logsnr = -2.0 * jnp.log(jnp.tan(a * t + b))
    else:
      integral = _LINEAR_BETA_MIN * t + 0.5 * (_LINEAR_BETA_MAX - _LINEAR_BETA_MIN) * t**2
      logsnr = -jnp.log(jnp.expm1(jnp.maximum(integral, 1e-12)))
    logsnr = logsnr - 2.0 * math.log(self.shift)
    return jnp.clip(logsnr, self.logsnr_min, self.logsnr_max)

  def t_from_logsnr(self, logsnr: Array) -> Array:
    """Inverse of `logsnr` on its unclipped range: the time at which the log-SNR equals `logsnr`."""
    unshifted = jnp.asarray(logsnr, jnp.float32) + 2.0 * math.log(self.shift)
    if self.kind == "cosine":
      b = math.atan(math.exp(-0.5 * self.logsnr_max))
      a = math.atan(math.exp(-0.5 * self.logsnr_min)) - b
      t = (jnp.arctan(jnp.exp(-0.5 * unshifted)) - b) / a
    else:
      integral = jax.nn.softplus(-unshifted)  # log1p(exp(-logsnr)) = beta integral
      slope = _LINEAR_BETA_MAX - _LINEAR_BETA_MIN
      t = (jnp.sqrt(_LINEAR_BETA_MIN**2 + 2.0 * slope * integral) - _LINEAR_BETA_MIN) / slope
    return jnp.clip(t, 0.0, 1.0)

  def time_grid(self, num_steps: int, spacing: str = "logsnr", t_max: float = 1.0) -> Array:
    """num_steps + 1 decreasing times from t_max (1: pure noise) to 0 for a sampler.

    "time" spaces them uniformly in t; "logsnr" uniformly in log-SNR between the schedule's end
    points, which resolves low-noise detail better and keeps multistep solvers' step ratios at 1.
    t_max < 1 starts from a partly noised input (SDEdit-style variations).
    """
    if not 0.0 < t_max <= 1.0:
      raise errors.UserError(f"t_max must be in (0, 1], got {t_max}")
    if spacing == "time":
      return jnp.linspace(t_max, 0.0, num_steps + 1)
    if spacing != "logsnr":
      raise errors.UserError(f"unknown time spacing {spacing!r}; choose 'time' or 'logsnr'")
    hi, lo = self.logsnr(jnp.array(0.0)), self.logsnr(jnp.array(t_max))
    ts = self.t_from_logsnr(jnp.linspace(lo, hi, num_steps + 1))
    return ts.at[0].set(t_max).at[-1].set(0.0)

  def alpha_sigma(self, t: Array) -> tuple[Array, Array]:
    """(alpha_t, sigma_t), each the shape of t."""
    return alpha_sigma_from_logsnr(self.logsnr(t))


def alpha_sigma_from_logsnr(logsnr: Array) -> tuple[Array, Array]:
  """alpha = sqrt(sigmoid(logsnr)), sigma = sqrt(sigmoid(-logsnr)), computed stably."""
  return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


def resolution_shifted(
  schedule: NoiseSchedule, resolution: int, base_resolution: int
) -> NoiseSchedule:
  """The schedule for a stage at `resolution` whose noise levels should match `base_resolution`."""
  return dataclasses.replace(schedule, shift=schedule.shift * resolution / base_resolution)


def broadcast_to(a: Array, x: Array) -> Array:
  """Reshapes a per-example [b] array to broadcast against x [b, ...]."""
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def add_noise(schedule: NoiseSchedule, x: Array, noise: Array, t: Array) -> Array:
  """Forward process: z_t = alpha_t * x + sigma_t * noise for per-example times t [b]."""
  alpha, sigma = schedule.alpha_sigma(t)
  return broadcast_to(alpha, x) * x + broadcast_to(sigma, x) * noise


def schedule_from_config(diffusion_config) -> NoiseSchedule:
  """The NoiseSchedule of a config's `diffusion` section (fields `schedule` and `shift`)."""
  return NoiseSchedule(
    kind=diffusion_config.schedule, shift=float(diffusion_config.get("shift", 1.0))
  )
