"""Schedules, parameterisations, loss weighting, guidance and noise augmentation."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mav_jax import diffusion
from mav_jax.diffusion import targets
from mav_jax.diffusion.schedules import NoiseSchedule, broadcast_to, resolution_shifted

KINDS = ("cosine", "linear")


@pytest.mark.parametrize("kind", KINDS)
def test_schedule_is_variance_preserving_monotone_and_hits_its_end_points(kind):
  schedule = NoiseSchedule(kind)
  t = jnp.linspace(0.0, 1.0, 1001)
  alpha, sigma = schedule.alpha_sigma(t)
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
  logsnr = schedule.logsnr(t)
  assert bool(jnp.all(jnp.diff(logsnr) <= 0)) and float(logsnr[0] - logsnr[-1]) > 20
  assert float(logsnr[0]) == pytest.approx(schedule.logsnr_max)
  if kind == "cosine":
    assert float(logsnr[-1]) == pytest.approx(schedule.logsnr_min, abs=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_t_from_logsnr_inverts_the_schedule(kind):
  schedule = NoiseSchedule(kind, shift=2.0)
  t = jnp.linspace(0.05, 0.95, 19)
  np.testing.assert_allclose(schedule.t_from_logsnr(schedule.logsnr(t)), t, atol=1e-4)
  grid = schedule.time_grid(8)
  assert float(grid[0]) == 1.0 and float(grid[-1]) == 0.0 and bool(jnp.all(jnp.diff(grid) < 0))
  steps = jnp.diff(schedule.logsnr(grid[1:-1]))
  np.testing.assert_allclose(steps, steps[0], rtol=1e-3)  # uniform in log-SNR inside the grid


def test_resolution_shift_lowers_logsnr_by_twice_the_log_of_the_ratio():
  base = NoiseSchedule("cosine")
  shifted = resolution_shifted(base, resolution=256, base_resolution=64)
  assert shifted.shift == 4.0
  t = jnp.linspace(0.2, 0.8, 7)  # away from the clipped ends
  np.testing.assert_allclose(base.logsnr(t) - shifted.logsnr(t), 2 * math.log(4.0), atol=1e-4)


@pytest.mark.parametrize(
  "bad", [dict(kind="sqrt"), dict(logsnr_min=5.0, logsnr_max=1.0), dict(shift=0.0)]
)
def test_schedule_rejects_bad_settings(bad):
  with pytest.raises(ValueError):
    NoiseSchedule(**bad)


def _random_state(seed=0, shape=(4, 3, 5)):
  k = jax.random.split(jax.random.key(seed), 3)
  x0 = jax.random.normal(k[0], shape)
  eps = jax.random.normal(k[1], shape)
  alpha, sigma = NoiseSchedule().alpha_sigma(
    jax.random.uniform(k[2], shape[:1], minval=0.05, maxval=0.95)
  )
  a, s = broadcast_to(alpha, x0), broadcast_to(sigma, x0)
  return x0, eps, a, s, a * x0 + s * eps


@pytest.mark.parametrize("source, target", list(itertools.product(targets.TARGETS, repeat=2)))
def test_conversions_between_parameterisations_are_exact(source, target):
  x0, eps, a, s, z = _random_state()
  pred = targets.target_from(x0, eps, a, s, source)
  np.testing.assert_allclose(
    targets.convert(pred, z, a, s, source, target),
    targets.target_from(x0, eps, a, s, target),
    atol=1e-4,
  )
  x0_hat, eps_hat = targets.to_x0_eps(pred, z, a, s, source)
  np.testing.assert_allclose(x0_hat, x0, atol=1e-4)
  np.testing.assert_allclose(eps_hat, eps, atol=1e-4)


def test_v_is_alpha_eps_minus_sigma_x0():
  x0, eps, a, s, _ = _random_state()
  np.testing.assert_allclose(targets.target_from(x0, eps, a, s, "v"), a * eps - s * x0, atol=1e-6)


def test_min_snr_weights_the_same_x0_error_equally_in_every_parameterisation():
  x0, eps, a, s, z = _random_state()
  x0_wrong = x0 + 0.1 * jnp.ones_like(x0)
  eps_wrong = (z - a * x0_wrong) / s
  logsnr = jnp.log(a[:, 0, 0] ** 2 / s[:, 0, 0] ** 2)
  losses = []
  for target in targets.TARGETS:
    err = targets.target_from(x0_wrong, eps_wrong, a, s, target) - targets.target_from(
      x0, eps, a, s, target
    )
    weight = targets.loss_weight(logsnr, target, "min_snr", gamma=5.0)
    losses.append(weight * jnp.mean(err**2, axis=(1, 2)))
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-3)
  np.testing.assert_allclose(losses[0], losses[2], rtol=1e-3)
  snr = jnp.exp(logsnr)
  np.testing.assert_allclose(losses[1], jnp.minimum(snr, 5.0) * 0.01, rtol=1e-3)
  np.testing.assert_array_equal(targets.loss_weight(logsnr, "eps", "plain"), 1.0)
  with pytest.raises(ValueError, match="unknown loss weighting"):
    targets.loss_weight(logsnr, "eps", "snr+1")


@pytest.mark.parametrize("target", targets.TARGETS)
def test_diffusion_loss_is_zero_for_an_oracle_and_one_for_a_zero_eps_model(target):
  schedule = NoiseSchedule()
  x0 = jax.random.normal(jax.random.key(1), (64, 2, 4, 4, 3))

  def oracle(z, t):
    alpha, sigma = schedule.alpha_sigma(t)
    a, s = broadcast_to(alpha, z), broadcast_to(sigma, z)
    return targets.target_from(x0, (z - a * x0) / s, a, s, target)

  loss, aux = diffusion.diffusion_loss(
    oracle, x0, jax.random.key(2), schedule, target=target, weighting="min_snr"
  )
  assert float(loss) < 1e-6 and aux["loss"].shape == (64,)
  zero_loss, _ = diffusion.diffusion_loss(
    lambda z, t: jnp.zeros_like(z), x0, jax.random.key(2), schedule, target="eps"
  )
  assert float(zero_loss) == pytest.approx(1.0, abs=0.02)  # E[eps^2] = 1


def test_frame_noise_gives_that_fraction_of_clips_a_time_per_frame():
  """diffusion.frame_noise: the chosen clips' frames get independent times (the model sees
  [b, f]), the rest one time for all frames; the weighted loss is the frames' mean, per frame
  weighted by its own time, and an oracle still scores zero."""
  schedule = NoiseSchedule()
  x0 = jax.random.normal(jax.random.key(1), (400, 3, 2, 2, 1))
  seen = {}

  def oracle(z, t):
    seen["t"] = t
    alpha, sigma = schedule.alpha_sigma(t)
    a, s = broadcast_to(alpha, z), broadcast_to(sigma, z)
    return targets.target_from(x0, (z - a * x0) / s, a, s, "eps")

  loss, aux = diffusion.diffusion_loss(oracle, x0, jax.random.key(2), schedule, frame_noise=0.25)
  t = seen["t"]
  assert t.shape == (400, 3) and aux["t"].shape == (400, 3) and float(loss) < 1e-6
  independent = np.asarray(jnp.any(t != t[:, :1], axis=1))
  assert 0.18 < independent.mean() < 0.32  # ~ a quarter of the clips

  # A model off by 1 on frame 0 only: min-SNR weights that frame's error by its own time.
  def off(z, t):
    return oracle(z, t).at[:, 0].add(1.0)

  weighted, aux = diffusion.diffusion_loss(
    off, x0, jax.random.key(2), schedule, target="eps", weighting="min_snr", frame_noise=1.0
  )
  w = targets.loss_weight(schedule.logsnr(aux["t"][:, 0]), "eps", "min_snr")
  np.testing.assert_allclose(aux["loss"], w / 3, rtol=1e-4)
  plain, _ = diffusion.diffusion_loss(
    oracle, x0[:, :1], jax.random.key(2), schedule, frame_noise=1.0
  )
  assert seen["t"].shape == (400,)  # one frame (images): one time per clip
  with pytest.raises(ValueError, match="frame_noise is a probability"):
    diffusion.diffusion_loss(oracle, x0, jax.random.key(2), schedule, frame_noise=1.5)


def test_guidance_scale_one_is_the_conditional_and_zero_the_unconditional_model():
  def model_fn(z, t, cond):
    return z * cond["emb"][:, :1, None] + t[:, None, None]

  z = jax.random.normal(jax.random.key(0), (3, 4, 2))
  t = jnp.array([0.1, 0.5, 0.9])
  cond = {"emb": jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])}
  neg = {"emb": jnp.full((3, 2), -0.5)}  # a negative prompt's condition
  full = model_fn(z, t, cond)
  np.testing.assert_allclose(
    diffusion.guided_model(model_fn, cond, neg, 1.0)(z, t), full, atol=1e-6
  )
  np.testing.assert_allclose(
    diffusion.guided_model(model_fn, cond, neg, 0.0)(z, t), model_fn(z, t, neg), atol=1e-6
  )
  scaled = diffusion.guided_model(model_fn, cond, diffusion.guidance.null_like(cond), 3.0)(z, t)
  uncond = model_fn(z, t, diffusion.guidance.null_like(cond))
  np.testing.assert_allclose(scaled, uncond + 3.0 * (full - uncond), atol=1e-5)


def test_guided_channels_guide_the_prediction_and_keep_the_conditional_variance():
  # A learned-variance output [eps (3), v (3)]: eps is guided, v is the conditional pass's.
  def model_fn(z, t, cond):
    return jnp.concatenate([z, z], -1) * cond[:, None, None, :] + t[:, None, None, None]

  z = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  t = jnp.array([3.0, 999.0])
  cond = jax.random.normal(jax.random.key(1), (2, 6))
  uncond = jax.random.normal(jax.random.key(2), (2, 6))
  full, null = model_fn(z, t, cond), model_fn(z, t, uncond)
  out = diffusion.guided_model(model_fn, cond, uncond, 4.0, guided_channels=3)(z, t)
  np.testing.assert_allclose(out[..., :3], null[..., :3] + 4.0 * (full - null)[..., :3], atol=1e-5)
  np.testing.assert_array_equal(out[..., 3:], full[..., 3:])
  # The default guides every channel, as before.
  every = diffusion.guided_model(model_fn, cond, uncond, 4.0)(z, t)
  np.testing.assert_allclose(every, null + 4.0 * (full - null), atol=1e-5)
  np.testing.assert_allclose(
    diffusion.guided_model(model_fn, cond, uncond, 4.0, guided_channels=6)(z, t), every
  )
  with pytest.raises(ValueError, match="exceeds"):
    diffusion.guided_model(model_fn, cond, uncond, 4.0, guided_channels=7)(z, t)
  with pytest.raises(ValueError, match="positive integer"):
    diffusion.guided_model(model_fn, cond, uncond, 4.0, guided_channels=0)


def test_conditioning_dropout_drops_whole_examples_at_the_given_rate():
  cond = {
    "emb": jnp.ones((4000, 3)),
    "tokens": jnp.ones((4000, 5), jnp.int32),
    "mask": jnp.ones((4000, 5), bool),
  }
  dropped = diffusion.drop_conditioning(jax.random.key(0), cond, 0.25)
  emb_gone = np.asarray(jnp.all(dropped["emb"] == 0, axis=1))
  assert 0.22 < emb_gone.mean() < 0.28
  # Every leaf of an example is dropped together; untouched examples are unchanged.
  np.testing.assert_array_equal(emb_gone, np.asarray(jnp.all(dropped["tokens"] == 0, axis=1)))
  np.testing.assert_array_equal(emb_gone, np.asarray(~jnp.any(dropped["mask"], axis=1)))
  assert bool(jnp.all(dropped["emb"][~emb_gone] == 1))
  assert diffusion.drop_conditioning(jax.random.key(0), cond, 0.0)["emb"].sum() == 12000
  assert diffusion.drop_conditioning(jax.random.key(0), cond, 1.0)["emb"].sum() == 0
  with pytest.raises(ValueError, match=r"in \[0, 1\]"):
    diffusion.drop_conditioning(jax.random.key(0), cond, 1.5)


def test_noise_augmentation_levels_and_noise_scale():
  schedule = NoiseSchedule()
  x = jnp.zeros((2000, 8, 8, 3))
  z, level = diffusion.noise_augment(jax.random.key(0), x, schedule, max_level=0.3)
  assert level.shape == (2000,) and float(level.min()) >= 0 and float(level.max()) <= 0.3
  z_fixed, level_fixed = diffusion.noise_augment(jax.random.key(0), x, schedule, level=0.5)
  np.testing.assert_array_equal(level_fixed, 0.5)
  _, sigma = schedule.alpha_sigma(jnp.array(0.5))
  assert float(jnp.std(z_fixed)) == pytest.approx(float(sigma), rel=0.01)
  # The signal is scaled by alpha at that level.
  ones, _ = diffusion.noise_augment(jax.random.key(0), jnp.ones((2000, 4)), schedule, level=0.0)
  assert float(jnp.mean(ones)) == pytest.approx(1.0, abs=1e-3)
