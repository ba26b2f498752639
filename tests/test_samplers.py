"""Samplers checked against an exact answer.

For Gaussian data x0 ~ N(mu, diag(s^2)) the optimal denoiser is known in closed form:
E[x0 | z_t] = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (z_t - alpha mu). A correct sampler fed that
denoiser must reproduce the data's mean and standard deviation. Tolerances: the mean within
5 standard errors (s / sqrt(N)) and the standard deviation within 4% (the sampling error of the
estimate is 0.5% at N = 20000; the rest is the solver's discretisation error at the stated steps).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mav_jax import diffusion
from mav_jax.diffusion import targets
from mav_jax.diffusion.schedules import NoiseSchedule, broadcast_to

MU = jnp.array([-1.0, 0.5, 2.0, 0.0])
STD = jnp.array([0.5, 1.0, 0.2, 0.05])
N = 20_000


def gaussian_denoiser(schedule: NoiseSchedule, target: str):
  """The exact posterior-mean model for N(MU, STD^2) data, in parameterisation `target`."""

  def fn(z, t):
    alpha, sigma = schedule.alpha_sigma(t)
    a, s = broadcast_to(alpha, z), broadcast_to(sigma, z)
    x0 = MU + a * STD**2 / (a**2 * STD**2 + s**2) * (z - a * MU)
    return targets.target_from(x0, (z - a * x0) / s, a, s, target)

  return fn


def _draw(
  sampler, steps, target="eps", kind="cosine", eta=0.0, seed=2, noise_seed=1, spacing="logsnr"
):
  schedule = NoiseSchedule(kind)
  run = jax.jit(
    functools.partial(
      diffusion.sample,
      gaussian_denoiser(schedule, target),
      schedule,
      sampler=sampler,
      num_steps=steps,
      target=target,
      eta=eta,
      spacing=spacing,
    )
  )
  return run(jax.random.normal(jax.random.key(noise_seed), (N, 4)), jax.random.key(seed))


@pytest.mark.parametrize("sampler, steps", [("ddpm", 400), ("ddim", 200), ("dpm++2m", 25)])
@pytest.mark.parametrize("target", ["eps", "x0", "v"])
@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_sampler_with_the_exact_denoiser_reproduces_gaussian_data(sampler, steps, target, kind):
  x = _draw(sampler, steps, target, kind)
  assert bool(jnp.all(jnp.isfinite(x)))
  np.testing.assert_array_less(jnp.abs(x.mean(0) - MU), 5 * STD / np.sqrt(N))
  np.testing.assert_allclose(x.std(0) / STD, 1.0, atol=0.04)


@pytest.mark.parametrize("steps, spacing, tol", [(10, "logsnr", 0.05), (100, "time", 0.04)])
def test_dpm_solver_on_short_runs_and_uneven_steps(steps, spacing, tol):
  """Few steps (first-order last step) and a grid uniform in t (step ratios r != 1)."""
  x = _draw("dpm++2m", steps, "v", spacing=spacing)
  np.testing.assert_array_less(jnp.abs(x.mean(0) - MU), 5 * STD / np.sqrt(N))
  np.testing.assert_allclose(x.std(0) / STD, 1.0, atol=tol)


def test_sampler_accepts_bfloat16_noise():
  schedule = NoiseSchedule()
  noise = jax.random.normal(jax.random.key(0), (8, 4), jnp.bfloat16)
  for sampler in ("ddpm", "ddim", "dpm++2m"):
    out = diffusion.sample(
      gaussian_denoiser(schedule, "eps"),
      schedule,
      noise,
      jax.random.key(1),
      sampler=sampler,
      num_steps=4,
    )
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))


def test_ddim_error_shrinks_with_more_steps():
  errors = [float(jnp.max(jnp.abs(_draw("ddim", n).std(0) / STD - 1))) for n in (25, 100)]
  assert errors[1] < errors[0] / 2, errors


def test_ddim_with_eta_zero_is_deterministic_and_eta_one_is_not():
  a = _draw("ddim", 20, seed=1)
  b = _draw("ddim", 20, seed=99)  # a different key for per-step noise: unused when eta = 0
  np.testing.assert_array_equal(a, b)
  c = _draw("ddim", 20, eta=1.0, seed=1)
  d = _draw("ddim", 20, eta=1.0, seed=99)
  assert float(jnp.abs(c - d).max()) > 1e-2
  np.testing.assert_allclose(c.std(0) / STD, 1.0, atol=0.5)  # still sane, only noisier


def test_guided_sampling_at_scale_one_equals_the_conditional_model():
  schedule = NoiseSchedule()
  exact = gaussian_denoiser(schedule, "eps")

  def model_fn(z, t, cond):  # cond shifts the prediction; the null condition (0) changes it
    return exact(z, t) + cond[:, None]

  cond, null = jnp.full((64,), 0.3), jnp.zeros((64,))
  noise = jax.random.normal(jax.random.key(3), (64, 4))
  guided = diffusion.sample(
    diffusion.guided_model(model_fn, cond, null, 1.0),
    schedule,
    noise,
    jax.random.key(0),
    num_steps=10,
  )
  plain = diffusion.sample(
    lambda z, t: model_fn(z, t, cond), schedule, noise, jax.random.key(0), num_steps=10
  )
  np.testing.assert_allclose(guided, plain, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_shared_noise_across_frames_gives_every_frame_the_same_draw(sampler):
  schedule = NoiseSchedule()
  per_frame = gaussian_denoiser(schedule, "eps")  # acts on each frame's pixels independently
  shape = (2, 5, 4)  # [batch, frames, "pixels"]
  noise = diffusion.gaussian_noise(jax.random.key(0), shape, share_across_frames=True)
  np.testing.assert_array_equal(noise, jnp.broadcast_to(noise[:, :1], shape))
  out = diffusion.sample(
    per_frame,
    schedule,
    noise,
    jax.random.key(1),
    sampler=sampler,
    num_steps=8,
    eta=1.0,
    share_noise_across_frames=True,
  )
  np.testing.assert_allclose(out, jnp.broadcast_to(out[:, :1], shape), atol=1e-6)
  independent = diffusion.sample(
    per_frame,
    schedule,
    jax.random.normal(jax.random.key(0), shape),
    jax.random.key(1),
    sampler=sampler,
    num_steps=8,
    eta=1.0,
  )
  assert float(jnp.abs(independent[:, 1:] - independent[:, :1]).max()) > 1e-2


def test_sampler_rejects_bad_arguments():
  schedule = NoiseSchedule()
  with pytest.raises(ValueError, match="unknown sampler"):
    diffusion.sample(
      lambda z, t: z, schedule, jnp.zeros((1, 2)), jax.random.key(0), sampler="euler"
    )
  with pytest.raises(ValueError, match="num_steps"):
    diffusion.sample(lambda z, t: z, schedule, jnp.zeros((1, 2)), jax.random.key(0), num_steps=0)


@pytest.mark.parametrize("step", ["ddpm", "ddim-0", "ddim-0.5", "ddim-1"])
def test_one_step_with_the_true_x0_keeps_the_forward_marginal(step):
  """Given the true x0, a DDPM or DDIM (any eta) step from t to s must leave z_s ~ q(z_s | x0)."""
  from mav_jax.diffusion import samplers

  schedule = NoiseSchedule()
  (a_t, s_t), (a_s, s_s) = (
    schedule.alpha_sigma(jnp.array(0.6)),
    schedule.alpha_sigma(jnp.array(0.4)),
  )
  k1, k2 = jax.random.split(jax.random.key(0))
  x0 = jnp.full((N, 4), 0.7)
  eps = jax.random.normal(k1, x0.shape)
  z_t = a_t * x0 + s_t * eps
  noise = jax.random.normal(k2, x0.shape)
  if step == "ddpm":
    z_s = samplers._ddpm_step(z_t, x0, eps, a_t, s_t, a_s, s_s, noise, False)
  else:
    eta = float(step.split("-")[1])
    z_s = samplers._ddim_step(z_t, x0, eps, a_t, s_t, a_s, s_s, noise, False, eta=eta)
  np.testing.assert_allclose(z_s.mean(), a_s * 0.7, atol=5 * float(s_s) / np.sqrt(N))
  np.testing.assert_allclose(z_s.std(), s_s, rtol=0.01)
