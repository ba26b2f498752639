"""Discrete-time DDPM schedule and ancestral step, as diffusers' `UnCLIPScheduler` (Karlo) does them.

mav_jax's own samplers are continuous-time (`schedules.NoiseSchedule`, log-SNR clipped to +-15). Karlo
was trained on T = 1000 discrete steps of the "squaredcos_cap_v2" schedule, whose last step has
alpha_bar_999 = 2.4e-9 (log-SNR -19.8): no `NoiseSchedule` expresses it, so this module keeps the
table. `DiscreteSchedule` holds the fields of a diffusers `scheduler_config.json`;
`timesteps(n)` gives the grid and the previous timestep of each step; `step` is one jittable
ancestral step; `sample_discrete` is the pipeline's loop over them; `loss_discrete` is the
training loss (with improved DDPM's variational term for learned variance). The numbers follow the order of torch's float32 operations in
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
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mav_jax import errors
from mav_jax.diffusion.samplers import gaussian_noise

Array = jax.Array
# denoise_fn(x_t, t) -> model output; t is the integer timestep as float32, shape [batch].
DenoiseFn = Callable[[Array, Array], Array]

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

  @functools.cached_property
  def posterior_tables(self) -> dict[str, np.ndarray]:
    """Float32 tables [T] of the forward posterior q(x_{t-1} | x_t, x0), for the training loss.

    Computed in float64 from the float32 `betas` and `alphas_cumprod` (guided-diffusion computes
    them in float64 too), with alpha_bar_{-1} = 1:
      coef_x0, coef_xt: posterior mean = coef_x0 x0 + coef_xt x_t;
      log_variance_clipped: log beta~_t, with log beta~_1 at t = 0 (beta~_0 = 0);
      log_beta: log beta_t, the upper end of the learned variance range;
      recip_sqrt_ab, recipm1_sqrt_ab: x0 = recip_sqrt_ab x_t - recipm1_sqrt_ab eps.
    """
    betas = self.betas.astype(np.float64)
    ab = self.alphas_cumprod.astype(np.float64)
    ab_prev = np.append(1.0, ab[:-1])
    variance = betas * (1.0 - ab_prev) / (1.0 - ab)
    tables = {
      "coef_x0": betas * np.sqrt(ab_prev) / (1.0 - ab),
      "coef_xt": (1.0 - ab_prev) * np.sqrt(1.0 - betas) / (1.0 - ab),
      "log_variance_clipped": np.log(np.append(variance[1], variance[1:])),
      "log_beta": np.log(betas),
      "recip_sqrt_ab": np.sqrt(1.0 / ab),
      "recipm1_sqrt_ab": np.sqrt(1.0 / ab - 1.0),
    }
    return {k: v.astype(np.float32) for k, v in tables.items()}

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


# ---- the sampling loop --------------------------------------------------------------------------


def sample_discrete(
  denoise_fn: DenoiseFn,
  schedule: DiscreteSchedule,
  noise: Array,
  rng: jax.Array | None,
  *,
  num_steps: int,
  denoise_fn_last: DenoiseFn | None = None,
  step_noise: Array | None = None,
  share_noise_across_frames: bool = False,
  frame_axis: int = 1,
) -> Array:
  """Karlo's ancestral loop: `UnCLIPPipeline`'s prior, decoder and super-res loops, jittable.

  Walks `schedule.timesteps(num_steps)` (T - 1 down to 0; the model is also evaluated at t = 0,
  whose step returns the posterior mean without noise) and applies `schedule.step` with the next
  grid value as the previous timestep, as the pipeline does. The loop is a `lax.fori_loop`, so
  `denoise_fn` is traced once whatever `num_steps` is; jit the caller with `num_steps` static.

  Args:
    denoise_fn: (x_t [b, ...], t [b] float32) -> model output, channels-last: the prediction in
      `schedule.prediction_type`, followed by v on the channels for "learned_range". t is the
      integer timestep as a float (models take it with time_scale = 1). Guidance is applied by
      wrapping the model (`guidance.guided_model`, with `guided_channels` for learned variance).
    schedule: the stage's schedule and step settings (`DiscreteSchedule.from_config`).
    noise: the initial x_{T-1} (diffusers' init_noise_sigma is 1: standard normal latents).
    rng: key of the per-step noise (step i draws from `fold_in(rng, i)`); None with `step_noise`.
    num_steps: the number of model calls (>= 2).
    denoise_fn_last: replaces `denoise_fn` on the last step (t = 0) only: Karlo's
      `super_res_last`. It is traced once more (the last step is peeled out of the loop).
    step_noise: [num_steps, *noise.shape] noises to use instead of drawing them (a test hook to
      replay another implementation's draws); the last one is unused (no noise at t = 0).
    share_noise_across_frames: draw one per-step noise and repeat it along `frame_axis`.
    frame_axis: the frames axis of a video's x.

  Returns:
    The final x, float32, unclipped (the decoder's caller clamps to [-1, 1]).
  """
  t_grid, prev_grid = schedule.timesteps(num_steps)
  x = jnp.asarray(noise, jnp.float32)
  if step_noise is not None:
    step_noise = jnp.asarray(step_noise, jnp.float32)
    if step_noise.shape != (num_steps, *x.shape):
      raise errors.UserError(
        f"step_noise must have shape {(num_steps, *x.shape)} (one noise per step), got"
        f" {step_noise.shape}"
      )
  elif rng is None:
    raise errors.UserError("sample_discrete needs an rng key unless step_noise is given")
  t_grid, prev_grid = jnp.asarray(t_grid), jnp.asarray(prev_grid)
  batch = x.shape[0]

  def advance(fn: DenoiseFn, i, x: Array) -> Array:
    t, prev_t = t_grid[i], prev_grid[i]
    if step_noise is not None:
      draw = step_noise[i]
    else:
      key = jax.random.fold_in(rng, i)
      draw = gaussian_noise(key, x.shape, share_noise_across_frames, frame_axis)
    out = fn(x, jnp.full((batch,), t, jnp.float32))
    x_prev, _ = schedule.step(out, t, prev_t, x, draw)
    return x_prev

  if denoise_fn_last is None:
    return jax.lax.fori_loop(0, num_steps, functools.partial(advance, denoise_fn), x)
  x = jax.lax.fori_loop(0, num_steps - 1, functools.partial(advance, denoise_fn), x)
  return advance(denoise_fn_last, num_steps - 1, x)


# ---- the training loss (improved DDPM's hybrid loss) ----------------------------------------------


def normal_kl(mean1: Array, logvar1: Array, mean2: Array, logvar2: Array) -> Array:
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
  return 0.5 * (
    -1.0
    + logvar2
    - logvar1
    + jnp.exp(logvar1 - logvar2)
    + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
  )


def _cdf_logit(x: Array) -> Array:
  # Improved DDPM approximates Phi(x) by 0.5 (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) (as
  # GELU's tanh form). That equals sigmoid of this logit, which lets the bin masses be taken in
  # log space below: the same values, without float32's cancellation in the tails.
  return math.sqrt(8.0 / math.pi) * (x + 0.044715 * x**3)


def discretized_gaussian_log_likelihood(x: Array, mean: Array, log_scale: Array) -> Array:
  """log P(x) in nats, elementwise, of N(mean, exp(log_scale)^2) discretised to 8-bit images.

  x holds uint8 values rescaled to [-1, 1] (256 levels 2 / 255 apart). Each level gets the
  Gaussian mass of its bin of half-width 1 / 255; the end levels (|x| > 0.999) take the whole tail
  beyond their inner edge, so the 256 probabilities sum to 1. Phi is improved DDPM's tanh
  approximation, and probabilities are floored at 1e-12, as there (guided-diffusion's
  `discretized_gaussian_log_likelihood`). The masses are computed in log space: with
  Phi(u) = sigmoid(a(u)), Phi(u+) - Phi(u-) = sigmoid(a+) sigmoid(-a-) (1 - exp(a- - a+)), which
  keeps float32 accurate down to the floor where the plain difference of two CDFs near 1 would
  lose everything below 1e-7.
  """
  centered = x - mean
  inv_std = jnp.exp(-log_scale)
  a_plus = _cdf_logit(inv_std * (centered + 1.0 / 255.0))
  a_min = _cdf_logit(inv_std * (centered - 1.0 / 255.0))
  log_cdf_plus = jax.nn.log_sigmoid(a_plus)
  log_one_minus_cdf_min = jax.nn.log_sigmoid(-a_min)
  log_delta = log_cdf_plus + log_one_minus_cdf_min + jnp.log(-jnp.expm1(a_min - a_plus))
  log_probs = jnp.where(
    x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta)
  )
  return jnp.maximum(log_probs, math.log(1e-12))


def _per_t(table: np.ndarray, t: Array, like: Array) -> Array:
  return jnp.asarray(table)[t].reshape(t.shape + (1,) * (like.ndim - t.ndim))


def vlb_terms(
  schedule: DiscreteSchedule, pred: Array, v: Array, x0: Array, x_t: Array, t: Array
) -> Array:
  """Improved DDPM's variational bound term L_t per example, in bits per dimension.

  p(x_{t-1} | x_t) has the mean of the posterior q(x_{t-1} | x_t, x0_hat), x0_hat from `pred` (in
  `schedule.prediction_type`; not clipped), and the log-variance frac log beta_t +
  (1 - frac) log beta~_t with frac = (v + 1) / 2 (log beta~_1 at t = 0). For t > 0 the term is
  KL(q(x_{t-1} | x_t, x0) || p), for t = 0 the discretised Gaussian NLL of x0 under p. The hybrid
  loss passes a stop-gradient `pred`, so that this term trains the variance only.

  Args:
    schedule: the schedule (its posterior tables and prediction type).
    pred: the model's prediction [b, ...], shaped like x0.
    v: the variance channels [b, ...], shaped like x0.
    x0: the clean data in [-1, 1] (the NLL at t = 0 assumes 8-bit levels).
    x_t: the noised data.
    t: int32 timesteps [b].

  Returns:
    [b] float32: the KL (t > 0) or NLL (t = 0), averaged over the non-batch axes, over log 2.
  """
  tables = schedule.posterior_tables
  t = jnp.asarray(t, jnp.int32)
  coef_x0 = _per_t(tables["coef_x0"], t, x0)
  coef_xt = _per_t(tables["coef_xt"], t, x0)
  min_log = _per_t(tables["log_variance_clipped"], t, x0)
  max_log = _per_t(tables["log_beta"], t, x0)
  if schedule.prediction_type == "epsilon":
    x0_hat = (
      _per_t(tables["recip_sqrt_ab"], t, x0) * x_t - _per_t(tables["recipm1_sqrt_ab"], t, x0) * pred
    )
  else:
    x0_hat = pred
  model_mean = coef_x0 * x0_hat + coef_xt * x_t
  frac = (v + 1.0) / 2.0
  model_log_variance = frac * max_log + (1.0 - frac) * min_log
  true_mean = coef_x0 * x0 + coef_xt * x_t
  axes = tuple(range(1, x0.ndim))
  kl = jnp.mean(normal_kl(true_mean, min_log, model_mean, model_log_variance), axis=axes)
  nll = -jnp.mean(
    discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance), axis=axes
  )
  return jnp.where(t == 0, nll, kl) / math.log(2.0)


def loss_discrete(
  predict_fn: DenoiseFn,
  x0: Array,
  rng: jax.Array,
  schedule: DiscreteSchedule,
  *,
  learned_variance: bool | None = None,
  t: Array | None = None,
  noise: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
  """The training loss of a discrete-schedule (Karlo) stage: L_simple, plus L_vlb for learned variance.

  Draws t ~ U{0 .. T - 1} per example and eps ~ N(0, 1) (`t_rng, noise_rng = split(rng)`; t by
  `randint(t_rng, [b], 0, T)`, eps by `normal(noise_rng, x0.shape)`), noises
  x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps with the float32 table the sampler uses,
  and calls predict_fn(x_t, t as float32). L_simple is the per-example mean squared error of the
  prediction against eps ("epsilon") or x0 ("sample", the prior's case).

  With learned variance (improved DDPM's hybrid loss, Nichol & Dhariwal 2021, as guided-diffusion
  trains with learn_sigma and RESCALED_MSE: Karlo's setting, though Karlo released no training
  code) the output has twice the channels, [prediction, v], and `vlb_terms` of the stop-gradient
  prediction and v, times T / 1000, is added: only v learns from it.

  Args:
    predict_fn: (x_t [b, ...], t [b] float32) -> output, channels-last, the conditioning closed
      over.
    x0: clean data [b, ..., c] (in [-1, 1] for the t = 0 NLL of learned variance).
    rng: key of t and eps.
    schedule: the stage's schedule (its `prediction_type`; `variance_type` sets the default of
      `learned_variance`).
    learned_variance: add L_vlb (the output has 2c channels); None: variance_type ==
      "learned_range".
    t: int [b] timesteps to use instead of drawing them (a test hook).
    noise: eps to use instead of drawing it (a test hook).

  Returns:
    (loss, aux): the batch mean of L_simple + L_vlb, and aux with the batch means "loss_simple"
    and "loss_vlb" (0 without learned variance), the per-example "t" and "loss".
  """
  learned = (
    schedule.variance_type == "learned_range" if learned_variance is None else learned_variance
  )
  x0 = jnp.asarray(x0, jnp.float32)
  batch = x0.shape[0]
  t_rng, noise_rng = jax.random.split(rng)
  if t is None:
    t = jax.random.randint(t_rng, (batch,), 0, schedule.num_train_timesteps)
  t = jnp.asarray(t, jnp.int32)
  if noise is None:
    noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
  alpha_bar = _per_t(schedule.alphas_cumprod, t, x0)
  x_t = jnp.sqrt(alpha_bar) * x0 + jnp.sqrt(1.0 - alpha_bar) * noise
  out = jnp.asarray(predict_fn(x_t, t.astype(jnp.float32)), jnp.float32)
  channels = x0.shape[-1]
  expected = x0.shape[:-1] + ((2 * channels) if learned else channels,)
  if out.shape != expected:
    what = "prediction and variance value v" if learned else "prediction"
    raise errors.UserError(
      f"the model output must have shape {expected} ({what} on the last axis), got {out.shape}"
    )
  pred, v = jnp.split(out, 2, axis=-1) if learned else (out, None)
  goal = noise if schedule.prediction_type == "epsilon" else x0
  axes = tuple(range(1, x0.ndim))
  loss_simple = jnp.mean(jnp.square(goal - pred), axis=axes)
  if learned:
    scale = schedule.num_train_timesteps / 1000.0
    loss_vlb = scale * vlb_terms(schedule, jax.lax.stop_gradient(pred), v, x0, x_t, t)
  else:
    loss_vlb = jnp.zeros_like(loss_simple)
  per_example = loss_simple + loss_vlb
  aux = {
    "loss_simple": jnp.mean(loss_simple),
    "loss_vlb": jnp.mean(loss_vlb),
    "t": t,
    "loss": per_example,
  }
  return jnp.mean(per_example), aux
