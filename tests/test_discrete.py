"""The discrete (Karlo / unCLIP) schedule and step against diffusers' `UnCLIPScheduler`.

Both sides walk the same grid from the same start with the same model outputs and the same noise
(diffusers' `randn_tensor` is replaced in `scheduling_unclip` by a function that hands out the
prepared draws). Every step starts from diffusers' state; for short grids a chain of our own states
is checked as well. States and x0 predictions must agree to 1e-5 (absolute and relative), float32.
"""

import jax
import numpy as np
import pytest

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

from diffusers.schedulers import scheduling_unclip  # noqa: E402

from mav_jax import errors  # noqa: E402
from mav_jax.diffusion.discrete import DiscreteSchedule  # noqa: E402

SHAPE = (2, 3, 4, 5)  # diffusers' NCHW; mav_jax gets the same values channels-last
TOL = 1e-5


def test_tables_equal_diffusers():
  ref = scheduling_unclip.UnCLIPScheduler()
  ours = DiscreteSchedule()
  np.testing.assert_array_equal(ours.betas, ref.betas.numpy())
  np.testing.assert_array_equal(ours.alphas, ref.alphas.numpy())
  np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())


@pytest.mark.parametrize("n", [2, 7, 25, 1000, 999, 3, 4])
def test_timesteps_equal_diffusers(n):
  ref = scheduling_unclip.UnCLIPScheduler()
  ref.set_timesteps(n)
  t, prev_t = DiscreteSchedule().timesteps(n)
  np.testing.assert_array_equal(t, ref.timesteps.numpy())
  assert t[0] == 999 and t[-1] == 0 and len(t) == n
  np.testing.assert_array_equal(prev_t, np.append(t[1:], -1))
  if n == 25:  # 166.5 rounds half to even
    assert t[-5] == 166


@pytest.mark.parametrize("n", [25, 7, 1000, 2])
@pytest.mark.parametrize("variance_type", ["fixed_small_log", "learned_range"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
@pytest.mark.parametrize("clip_sample", [False, True])
def test_step_matches_unclip_scheduler(monkeypatch, n, variance_type, prediction_type, clip_sample):
  # Karlo's ranges: 1 for the decoder and SR (eps), 5 for the prior (x0, normalised embeddings).
  clip = (1.0 if prediction_type == "epsilon" else 5.0) if clip_sample else None
  config = dict(
    variance_type=variance_type,
    prediction_type=prediction_type,
    clip_sample=clip is not None,
    clip_sample_range=1.0 if clip is None else clip,
  )
  ref = scheduling_unclip.UnCLIPScheduler(**config)
  ref.set_timesteps(n)
  ours = DiscreteSchedule.from_config(dict(ref.config))
  assert ours == DiscreteSchedule(**config)
  step = jax.jit(ours.step)

  rng = np.random.default_rng(n)
  out_channels = 2 * SHAPE[1] if variance_type == "learned_range" else SHAPE[1]
  outputs = rng.standard_normal((n, SHAPE[0], out_channels, *SHAPE[2:]), np.float32)
  if variance_type == "learned_range":  # v beyond [-1, 1] too: diffusers does not squash it
    outputs[:, :, SHAPE[1] :] = rng.uniform(-1.5, 1.5, outputs[:, :, SHAPE[1] :].shape)
  if prediction_type == "sample":
    outputs *= 4  # beyond the clip range of 5 at times
  noises = rng.standard_normal((n, *SHAPE), np.float32)
  start = rng.standard_normal(SHAPE, np.float32)

  draws = []  # the step index of each draw diffusers made

  def fake_randn(shape, **kwargs):
    assert tuple(shape) == SHAPE and kwargs["dtype"] == torch.float32
    draws.append(i)
    return torch.from_numpy(noises[i])

  monkeypatch.setattr(scheduling_unclip, "randn_tensor", fake_randn)

  def channels_last(x):
    return np.moveaxis(np.asarray(x), 1, -1)

  t_grid, prev_grid = ours.timesteps(n)
  np.testing.assert_array_equal(t_grid, ref.timesteps.numpy())
  x_ref = torch.from_numpy(start)
  x_free = channels_last(start)
  for i, t in enumerate(ref.timesteps.tolist()):
    x_in = channels_last(x_ref)
    # As UnCLIPPipeline: the next grid value, and None (t - 1) on the last step.
    prev = None if i + 1 == n else ref.timesteps[i + 1].item()
    x_ref, x0_ref = ref.step(torch.from_numpy(outputs[i]), t, x_ref, prev_timestep=prev).to_tuple()
    args = (channels_last(outputs[i]), t_grid[i], prev_grid[i])
    # Each step from diffusers' state: float32 rounding, not a drift of the chains, is compared.
    x_ours, x0_ours = step(*args, x_in, channels_last(noises[i]))
    # x0 = (x - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) is compared times sqrt(alpha_bar): the
    # division magnifies 1-ulp differences (torch's float32 sqrt is not always correctly rounded)
    # by up to 2e4 at t = 999; in the next state x0 is multiplied by about that factor again.
    a_t = np.sqrt(ours.alphas_cumprod[t].astype(np.float64))
    np.testing.assert_allclose(
      a_t * np.asarray(x0_ours), a_t * channels_last(x0_ref), rtol=TOL, atol=TOL, err_msg=f"{i=}"
    )
    np.testing.assert_allclose(x_ours, channels_last(x_ref), rtol=TOL, atol=TOL, err_msg=f"{i=}")
    if n <= 25:
      # A chain on its own states too. Over 1000 steps of random (inconsistent) model outputs the
      # states grow to ~1e4 and 1/sqrt(alpha_bar_t) amplifies last-bit differences past 1e-5.
      x_free, _ = step(*args, x_free, channels_last(noises[i]))
      np.testing.assert_allclose(x_free, channels_last(x_ref), rtol=TOL, atol=TOL, err_msg=f"{i=}")
  assert draws == list(range(n - 1))  # noise on every step but the last (t = 0)
  if clip is not None:
    assert np.abs(np.asarray(x0_ours)).max() <= clip
  assert np.abs(np.asarray(x_ours)).max() > 0.1


def test_last_step_is_the_x0_prediction_without_noise():
  schedule = DiscreteSchedule(variance_type="learned_range", clip_sample=False)
  rng = np.random.default_rng(0)
  sample = rng.standard_normal((2, 4, 4, 3), np.float32)
  output = rng.standard_normal((2, 4, 4, 6), np.float32)
  noise = rng.standard_normal(sample.shape, np.float32)
  x_prev, x0 = schedule.step(output, 0, -1, sample, noise)
  # diffusers' float32 quirk: the stored beta_0 is not exactly 1 - alpha_bar_0.
  factor = schedule.betas[0] / (1 - schedule.alphas_cumprod[0])
  assert abs(factor - 1) > 1e-4
  np.testing.assert_allclose(x_prev, factor * np.asarray(x0), rtol=1e-6)
  assert np.isfinite(np.asarray(x_prev)).all()


def test_errors():
  with pytest.raises(errors.UserError, match="variance_type 'learned'"):
    DiscreteSchedule(variance_type="learned")
  with pytest.raises(errors.UserError, match="prediction_type 'v_prediction'"):
    DiscreteSchedule(prediction_type="v_prediction")
  with pytest.raises(errors.UserError, match="beta_schedule 'linear'"):
    DiscreteSchedule(beta_schedule="linear")
  with pytest.raises(errors.UserError, match=r"\['thresholding'\]"):
    DiscreteSchedule.from_config({"_class_name": "UnCLIPScheduler", "thresholding": True})
  for n in (1, 1001):
    with pytest.raises(errors.UserError, match=r"in \[2, 1000\]"):
      DiscreteSchedule().timesteps(n)
  x = np.zeros((1, 2, 2, 3), np.float32)
  with pytest.raises(errors.UserError, match="learned_range"):
    DiscreteSchedule(variance_type="learned_range").step(x, 5, 4, x, x)
  with pytest.raises(errors.UserError, match="model output shape"):
    DiscreteSchedule().step(np.zeros((1, 2, 2, 6), np.float32), 5, 4, x, x)
