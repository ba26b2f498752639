"""Discrete-time DDPM schedule and ancestral step, as diffusers' `UnCLIPScheduler` (Karlo) does them.

mav_jax's own samplers are continuous-time (`schedules.NoiseSchedule`, log-SNR clipped to +-15). Karlo
was trained on T = 1000 discrete steps of the "squaredcos_cap_v2" schedule, whose last step has
alpha_bar_999 = 2.4e-9 (log-SNR -19.8): no `NoiseSchedule` expresses it, so this module keeps the
table. `DiscreteSchedule` holds the fields of a diffusers `scheduler_config.json`;
`timesteps(n)` gives the grid and the previous timestep of each step; `step` is one jittable
ancestral step. The numbers follow the order of torch's float32 operations in
`diffusers/schedulers/scheduling_unclip.py`, so a step matches diffusers to float32 rounding:

- betas from float64 Python floats rounded to float32; alphas_cumprod = cumprod(1 - beta) with a
  float64 accumulator rounded to float32 (torch's CPU cumprod);
- when the previous timestep is t - 1 the stored beta_t is used, otherwise
  beta = 1 - alpha_bar_t / alpha_bar_prev (the respaced beta). `samplers._ddpm_step` is the same
  posterior algebraically, but it always recovers beta from the alpha_bar ratio, which loses about
  3 digits near t = 0 (alpha_bar ~ 1), and it has no learned variance, so it is not reused here;
- the model is also evaluated at t = 0, whose previous timestep is -1 (alpha_bar = 1): that step
  returns the posterior mean with no noise. In exact arithmetic that is the (clipped) x0
  prediction; in float32 it is x0 * beta_0 / (1 - alpha_bar_0) = 0.99947 x0 (the stored beta_0 is
  not exactly 1 - alpha_bar_0). diffusers does the same, and so does this step, for parity.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from mav_jax import errors

Array = jax.Array

BETA_SCHEDULES = ("squaredcos_cap_v2",)
VARIANCE_TYPES = ("fixed_small_log", "learned_range")
PREDICTION_TYPES = ("epsilon", "sample")


def _cosine_betas(num_timesteps: int, max_beta: float) -> np.ndarray:
  """Nichol & Dhariwal's cosine betas, in float64 Python maths then rounded to float32."""

  def alpha_bar(t):
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

  betas = [
    min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
    for i in range(num_timesteps)
  ]
  return np.asarray(betas, np.float32)


@dataclasses.dataclass(frozen=True)
class DiscreteSchedule:
  """A discrete DDPM schedule and the sampler settings of a diffusers `UnCLIPScheduler`.

  Frozen and hashable, so jit can close over it (or take it as a static argument). The field names
  and values are diffusers' own, so `from_config(scheduler_config.json)` needs no renaming.

  Attributes:
    num_train_timesteps: T, the number of training steps (timesteps run 0 .. T - 1).
    beta_schedule: only "squaredcos_cap_v2" (cosine alpha_bar, betas capped at `max_beta`).
    variance_type: "fixed_small_log" (the posterior variance beta~) or "learned_range" (the
      model output has twice the channels; the second half v interpolates the log-variance
      between log beta~ (v = -1) and log beta (v = +1); v is not clipped).
    prediction_type: "epsilon" (the model predicts the noise) or "sample" (it predicts x0).
    clip_sample: clamp the x0 prediction to [-clip_sample_range, clip_sample_range].
    clip_sample_range: see `clip_sample`.
    max_beta: the cap on each beta (diffusers' `betas_for_alpha_bar` default; not a config key).
  """

  num_train_timesteps: int = 1000
  beta_schedule: str = "squaredcos_cap_v2"
  variance_type: str = "fixed_small_log"
  prediction_type: str = "epsilon"
  clip_sample: bool = True
  clip_sample_range: float = 1.0
  max_beta: float = 0.999

  def __post_init__(self):
    for name, value, choices in (
      ("beta_schedule", self.beta_schedule, BETA_SCHEDULES),
      ("variance_type", self.variance_type, VARIANCE_TYPES),
      ("prediction_type", self.prediction_type, PREDICTION_TYPES),
    ):
      if value not in choices:
        raise errors.UserError(f"unsupported {name} {value!r}; choose one of {choices}")
    if not (isinstance(self.num_train_timesteps, int) and self.num_train_timesteps >= 2):
      raise errors.UserError(
        f"num_train_timesteps must be an integer >= 2, got {self.num_train_timesteps!r}"
      )
    if self.clip_sample and not self.clip_sample_range > 0:
      raise errors.UserError(f"clip_sample_range must be positive, got {self.clip_sample_range}")
    if not 0 < self.max_beta < 1:
      raise errors.UserError(f"max_beta must be in (0, 1), got {self.max_beta}")

  @classmethod
  def from_config(cls, config: dict) -> "DiscreteSchedule":
    """From a diffusers `UnCLIPScheduler` config (the dict of its scheduler_config.json).

    Keys left out take diffusers' defaults; keys starting with "_" (diffusers' bookkeeping:
    `_class_name`, `_diffusers_version`, `_use_default_values`) are ignored; any other unknown key
    raises a `UserError` naming it.
    """
    fields = {f.name for f in dataclasses.fields(cls)} - {"max_beta"}
    unknown = sorted(k for k in config if k not in fields and not k.startswith("_"))
    if unknown:
      raise errors.UserError(
        f"unsupported scheduler config key(s) {unknown}; known keys are {sorted(fields)}"
      )
    return cls(**{k: v for k, v in config.items() if k in fields})

  # ---- host-side float32 tables (numpy), in torch's operation order --------------------------

  @functools.cached_property
  def betas(self) -> np.ndarray:
    return _cosine_betas(self.num_train_timesteps, self.max_beta)

  @functools.cached_property
  def alphas(self) -> np.ndarray:
    return np.float32(1.0) - self.betas

  @functools.cached_property
  def alphas_cumprod(self) -> np.ndarray:
    # torch's CPU cumprod accumulates float32 in float64; numpy's float32 cumprod would differ
    # in the last bits for 99% of the entries.
    return np.cumprod(self.alphas.astype(np.float64)).astype(np.float32)

  def timesteps(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The inference grid for `num_steps` model calls and the previous timestep of each.

    Returns int32 arrays `(t, prev_t)`, each [num_steps]: t = round(k (T - 1) / (n - 1)) for
    k = n - 1 .. 0 (numpy's half-to-even rounding, as diffusers' `set_timesteps`), from T - 1 down to
    0; prev_t[i] = t[i + 1] and, for the last step, t - 1 = -1 (alpha_bar = 1: no noise added).
    """
    if not (isinstance(num_steps, int | np.integer) and 2 <= num_steps <= self.num_train_timesteps):
      raise errors.UserError(
        f"the number of sampling steps must be an integer in [2, {self.num_train_timesteps}]"
        f" (the grid always runs from {self.num_train_timesteps - 1} to 0), got {num_steps!r}"
      )
    ratio = (self.num_train_timesteps - 1) / (num_steps - 1)
    t = (np.arange(0, num_steps) * ratio).round()[::-1].astype(np.int32)
    prev_t = np.append(t[1:], t[-1] - 1).astype(np.int32)
    return t, prev_t

  # ---- the step (jittable) ------------------------------------------------------------------

  def step(
    self,
    model_output: Array,
    t: Array | int,
    prev_t: Array | int,
    sample: Array,
    noise: Array,
    *,
    channel_axis: int = -1,
  ) -> tuple[Array, Array]:
    """One ancestral step x_t -> x_prev_t, as `UnCLIPScheduler.step(..., prev_timestep=prev_t)`.

    Args:
      model_output: the model's prediction for `sample`, in `prediction_type`; with
        "learned_range" it has twice the channels of `sample` along `channel_axis` (prediction,
        then v).
      t: the current timestep, an integer in [0, T - 1] (a traced int32 scalar is fine).
      prev_t: the timestep to step to, < t; -1 means alpha_bar_prev = 1 (the last step).
      sample: x_t.
      noise: standard normal noise shaped like `sample`; ignored when t == 0.
      channel_axis: the channel axis of `model_output` and `sample` (mav_jax is channels-last).

    Returns:
      (x_prev, x0): the next state and the (clipped) x0 prediction, both float32.
    """
    sample = jnp.asarray(sample, jnp.float32)
    model_output = jnp.asarray(model_output, jnp.float32)
    axis = channel_axis % sample.ndim
    channels = sample.shape[axis]
    if self.variance_type == "learned_range":
      expected = sample.shape[:axis] + (2 * channels,) + sample.shape[axis + 1 :]
      if model_output.shape != expected:
        raise errors.UserError(
          f'variance_type "learned_range" needs a model output of shape {expected} (prediction'
          f" and variance value v on the channels), got {model_output.shape}"
        )
      pred, v = jnp.split(model_output, 2, axis=axis)
    else:
      if model_output.shape != sample.shape:
        raise errors.UserError(
          f"model output shape {model_output.shape} differs from the sample's {sample.shape}"
        )
      pred, v = model_output, None
    if noise.shape != sample.shape:
      raise errors.UserError(f"noise shape {noise.shape} differs from the sample's {sample.shape}")

    t = jnp.asarray(t, jnp.int32)
    prev_t = jnp.asarray(prev_t, jnp.int32)
    betas = jnp.asarray(self.betas)
    alphas = jnp.asarray(self.alphas)
    alphas_cumprod = jnp.asarray(self.alphas_cumprod)
    one = jnp.float32(1.0)

    alpha_prod_t = alphas_cumprod[t]
    alpha_prod_prev = jnp.where(prev_t >= 0, alphas_cumprod[jnp.maximum(prev_t, 0)], one)
    beta_prod_t = one - alpha_prod_t
    beta_prod_prev = one - alpha_prod_prev
    consecutive = prev_t == t - 1
    beta = jnp.where(consecutive, betas[t], one - alpha_prod_t / alpha_prod_prev)
    alpha = jnp.where(consecutive, alphas[t], one - beta)

    if self.prediction_type == "epsilon":
      x0 = (sample - jnp.sqrt(beta_prod_t) * pred) / jnp.sqrt(alpha_prod_t)
    else:
      x0 = pred
    if self.clip_sample:
      x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)

    x0_coeff = (jnp.sqrt(alpha_prod_prev) * beta) / beta_prod_t
    sample_coeff = jnp.sqrt(alpha) * beta_prod_prev / beta_prod_t
    mean = x0_coeff * x0 + sample_coeff * sample

    # The posterior variance beta~; it is 0 only on the last step (prev_t = -1), where no noise
    # is added: the tiny floor keeps its log finite there (and the where below drops it).
    variance = beta_prod_prev / beta_prod_t * beta
    if self.variance_type == "fixed_small_log":
      std = jnp.exp(0.5 * jnp.log(jnp.maximum(variance, 1e-20)))
    else:
      frac = (v + 1) / 2
      log_variance = frac * jnp.log(beta) + (1 - frac) * jnp.log(jnp.maximum(variance, 1e-20))
      std = jnp.exp(0.5 * log_variance)
    x_prev = mean + jnp.where(t > 0, std * noise, 0.0)
    return x_prev, x0
