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


# ---- the sampling loop against UnCLIPPipeline's loops ---------------------------------------------

from mav_jax.diffusion import discrete, guidance  # noqa: E402


class ToyModel:
  """A deterministic 'model', the same float32 operations in torch (NCHW) and JAX (channels-last).

  out[..., c] = sum_k w[c, k] x[..., k] (summed left to right) + b[c] (t / 1000) + cond[:, c]:
  elementwise products and sums only, so both sides round alike (a matmul's summation order would
  not), which keeps the chains equal through the 2e4-fold amplification at t = 999 (T25).
  """

  def __init__(self, seed, in_channels, out_channels, scale=0.5):
    rng = np.random.default_rng(seed)
    self.w = (scale * rng.standard_normal((out_channels, in_channels))).astype(np.float32)
    self.b = rng.standard_normal(out_channels).astype(np.float32)
    self.traces = 0

  def _apply(self, x, t, cond, stack):
    # x channels-last; t [b]; cond [b, out] or None
    extra = (1,) * (x.ndim - 1)
    t = (t / 1000.0).reshape(t.shape + extra)
    outs = []
    for c in range(self.w.shape[0]):
      acc = float(self.w[c, 0]) * x[..., 0]
      for k in range(1, self.w.shape[1]):
        acc = acc + float(self.w[c, k]) * x[..., k]
      acc = acc + float(self.b[c]) * t[..., 0]
      if cond is not None:
        acc = acc + cond[:, c].reshape(cond.shape[:1] + extra[:-1])
      outs.append(acc)
    return stack(outs)

  def jax(self, x, t, cond=None):
    self.traces += 1
    return self._apply(x, t, cond, lambda o: jax.numpy.stack(o, axis=-1))

  def torch(self, x, t, cond=None):  # x NCHW or [b, d]
    x = torch.movedim(x, 1, -1)
    out = self._apply(x, t, cond, lambda o: torch.stack(o, dim=-1))
    return torch.movedim(out, -1, 1)


# name: (variance_type, prediction_type, clip_sample_range, sample shape in diffusers' layout)
SETTINGS = {
  "decoder": ("learned_range", "epsilon", 1.0, (2, 3, 4, 5)),
  "sr": ("fixed_small_log", "epsilon", 1.0, (2, 3, 4, 5)),
  "prior": ("fixed_small_log", "sample", 5.0, (2, 8)),
}


def _run_unclip_loop(ref, models, x, cond, uncond, scale, n, last_model, channels):
  """UnCLIPPipeline's loop: [uncond, cond] batch, eps guided, v from the cond branch."""
  timesteps = ref.timesteps
  for i, t in enumerate(timesteps.tolist()):
    model = last_model if (last_model is not None and i == n - 1) else models
    tt = torch.full((x.shape[0],), float(t), dtype=torch.float32)
    if scale is None:
      out = model.torch(x, tt, cond)
    else:
      both = model.torch(
        torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([torch.from_numpy(uncond), cond])
      )
      out_uncond, out_text = both.chunk(2)
      if ref.config.variance_type == "learned_range":
        eps_uncond, _ = out_uncond.split(channels, dim=1)
        eps_text, v = out_text.split(channels, dim=1)
        out = torch.cat([eps_uncond + scale * (eps_text - eps_uncond), v], dim=1)
      else:
        out = out_uncond + scale * (out_text - out_uncond)
    prev = None if i + 1 == n else timesteps[i + 1]
    x = ref.step(out, t, x, prev_timestep=prev).prev_sample
  return x


@pytest.mark.parametrize("n", [2, 7, 25])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("scale", [None, 4.0])
@pytest.mark.parametrize("with_last", [False, True])
def test_sample_matches_unclip_pipeline_loop(monkeypatch, n, setting, scale, with_last):
  variance_type, prediction_type, clip, shape = SETTINGS[setting]
  ref = scheduling_unclip.UnCLIPScheduler(
    variance_type=variance_type,
    prediction_type=prediction_type,
    clip_sample=True,
    clip_sample_range=clip,
  )
  ref.set_timesteps(n)
  schedule = DiscreteSchedule.from_config(dict(ref.config))
  channels = shape[1]
  out_channels = 2 * channels if variance_type == "learned_range" else channels
  model = ToyModel(n, channels, out_channels)
  last = ToyModel(n + 100, channels, out_channels) if with_last else None

  rng = np.random.default_rng(n)
  start = rng.standard_normal(shape, np.float32)
  noises = rng.standard_normal((n, *shape), np.float32)
  cond = rng.standard_normal((shape[0], out_channels), np.float32)
  uncond = rng.standard_normal((shape[0], out_channels), np.float32)
  draws = []

  def fake_randn(size, **kwargs):
    assert tuple(size) == shape
    draws.append(len(draws))
    return torch.from_numpy(noises[len(draws) - 1])

  monkeypatch.setattr(scheduling_unclip, "randn_tensor", fake_randn)
  x_ref = _run_unclip_loop(
    ref, model, torch.from_numpy(start), torch.from_numpy(cond), uncond, scale, n, last, channels
  )
  assert len(draws) == n - 1  # no draw at t = 0

  def channels_last(a):
    return np.moveaxis(np.asarray(a), 1, -1)

  guided = None if variance_type == "fixed_small_log" else channels

  def as_denoise(toy):
    if toy is None:
      return None
    if scale is None:
      return lambda x, t: toy.jax(x, t, cond)
    return guidance.guided_model(toy.jax, cond, uncond, scale, guided_channels=guided)

  run = jax.jit(
    lambda x, noise: discrete.sample_discrete(
      as_denoise(model),
      schedule,
      x,
      None,
      num_steps=n,
      denoise_fn_last=as_denoise(last),
      step_noise=noise,
    )
  )
  x_ours = run(channels_last(start), np.moveaxis(noises, 2, -1) if len(shape) == 4 else noises)
  assert x_ours.dtype == np.float32
  np.testing.assert_allclose(x_ours, channels_last(x_ref), rtol=TOL, atol=TOL)
  assert model.traces == 1 and (last is None or last.traces == 1)
  # Not trivially clipped: the sample moves and, with a last model, depends on it.
  assert np.abs(np.asarray(x_ours)).max() > 0.1


@pytest.mark.parametrize("with_last", [False, True])
def test_sample_traces_the_model_once_whatever_the_number_of_steps(with_last):
  schedule = DiscreteSchedule(variance_type="learned_range")
  model = ToyModel(0, 3, 6)
  last = ToyModel(1, 3, 6) if with_last else None
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  for n in (2, 7, 25, 1000):
    model.traces = 0
    if last is not None:
      last.traces = 0
    out = jax.jit(
      lambda x, key, n=n: discrete.sample_discrete(
        model.jax,
        schedule,
        x,
        key,
        num_steps=n,
        denoise_fn_last=None if last is None else last.jax,
      )
    )(x, jax.random.key(1))
    assert np.isfinite(np.asarray(out)).all()
    assert model.traces == 1, n
    assert last is None or last.traces == 1, n


def test_sample_draws_step_noise_from_fold_in():
  schedule = DiscreteSchedule(variance_type="learned_range")
  model = ToyModel(3, 3, 6)
  x = jax.random.normal(jax.random.key(0), (2, 3, 4, 4, 3))  # a video [b, f, h, w, c]
  key = jax.random.key(7)
  n = 5
  drawn = discrete.sample_discrete(model.jax, schedule, x, key, num_steps=n)
  noises = np.stack([jax.random.normal(jax.random.fold_in(key, i), x.shape) for i in range(n)])
  replayed = discrete.sample_discrete(model.jax, schedule, x, None, num_steps=n, step_noise=noises)
  np.testing.assert_allclose(drawn, replayed, rtol=1e-6, atol=1e-6)
  other = discrete.sample_discrete(model.jax, schedule, x, jax.random.key(8), num_steps=n)
  assert np.abs(np.asarray(other - drawn)).max() > 1e-3
  # Shared across frames: frames that start equal stay equal.
  same = jax.numpy.broadcast_to(x[:, :1], x.shape)
  shared = discrete.sample_discrete(
    model.jax, schedule, same, key, num_steps=n, share_noise_across_frames=True
  )
  np.testing.assert_array_equal(shared, jax.numpy.broadcast_to(shared[:, :1], x.shape))
  with pytest.raises(errors.UserError, match="step_noise must have shape"):
    discrete.sample_discrete(model.jax, schedule, x, None, num_steps=n, step_noise=noises[:-1])
  with pytest.raises(errors.UserError, match="needs an rng"):
    discrete.sample_discrete(model.jax, schedule, x, None, num_steps=n)


# ---- the training loss: pieces against closed forms --------------------------------------------


def test_normal_kl_matches_the_closed_form():
  rng = np.random.default_rng(0)
  m1, m2 = rng.standard_normal((2, 100))
  lv1, lv2 = rng.uniform(-12, 2, (2, 100))
  s1, s2 = np.exp(0.5 * lv1), np.exp(0.5 * lv2)
  expected = np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
  args = [np.float32(a) for a in (m1, lv1, m2, lv2)]
  np.testing.assert_allclose(discrete.normal_kl(*args), expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(discrete.normal_kl(m1[:1], lv1[:1], m1[:1], lv1[:1]), 0.0, atol=1e-6)


def _np_discretized_loglik(x, mean, log_scale):
  """float64 numpy reference: bins of half-width 1/255, open-ended end bins, 1e-12 floor.

  Phi is the tanh approximation; above the mean the bin mass is taken from the upper tail
  (1 - Phi(u) = Phi(-u) for it), so that float64 resolves masses down to the floor.
  """

  def cdf(v):
    return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))

  sigma = np.exp(log_scale)
  hi, lo = (x - mean + 1 / 255) / sigma, (x - mean - 1 / 255) / sigma
  lower_tail = np.where(x > 0.999, 1.0, cdf(hi)) - np.where(x < -0.999, 0.0, cdf(lo))
  upper_tail = np.where(x < -0.999, 1.0, cdf(-lo)) - np.where(x > 0.999, 0.0, cdf(-hi))
  mass = np.where(x - mean > 0, upper_tail, lower_tail)
  return np.log(np.maximum(mass, 1e-12))


def test_discretized_gaussian_log_likelihood():
  rng = np.random.default_rng(1)
  levels = np.arange(256) / 127.5 - 1
  x = rng.choice(levels, (4, 256))
  x[:, :4] = [-1.0, 1.0, levels[1], levels[-2]]  # the end bins and their neighbours
  mean = np.clip(x + 0.05 * rng.standard_normal(x.shape), -1.2, 1.2)
  log_scale = rng.uniform(-6, 0, x.shape)
  ours = discrete.discretized_gaussian_log_likelihood(
    *(np.float32(a) for a in (x, mean, log_scale))
  )
  np.testing.assert_allclose(ours, _np_discretized_loglik(x, mean, log_scale), rtol=2e-3, atol=2e-4)
  # Over the 256 levels the probabilities sum to one (the bins tile the line).
  for m, ls in ((0.3, -3.0), (-0.97, -1.0), (0.0, 0.5)):
    p = np.exp(np.asarray(discrete.discretized_gaussian_log_likelihood(levels, m, ls), np.float64))
    assert p.sum() == pytest.approx(1.0, abs=1e-4)
  # Far from the mean the probability is floored, not -inf.
  far = discrete.discretized_gaussian_log_likelihood(np.float32(0.5), -0.5, -8.0)
  assert float(far) == pytest.approx(np.log(1e-12), rel=1e-5)


def _np_vlb(schedule, pred, v, x0, x_t, t):
  """float64 reference of improved DDPM's L_t in bits, re-derived from the DDPM posterior."""
  betas = schedule.betas.astype(np.float64)
  ab = schedule.alphas_cumprod.astype(np.float64)
  out = []
  for i, ti in enumerate(t):
    ab_t, ab_p, beta = ab[ti], (ab[ti - 1] if ti > 0 else 1.0), betas[ti]
    var = lambda k: betas[k] * (1 - ab[k - 1]) / (1 - ab[k])  # noqa: E731  (k >= 1)
    log_var_post = np.log(var(ti) if ti > 0 else var(1))

    def mean(x0_, x_t_, ab_t=ab_t, ab_p=ab_p, beta=beta):
      return (np.sqrt(ab_p) * beta * x0_ + np.sqrt(1 - beta) * (1 - ab_p) * x_t_) / (1 - ab_t)

    if schedule.prediction_type == "epsilon":
      x0_hat = (x_t[i] - np.sqrt(1 - ab_t) * pred[i]) / np.sqrt(ab_t)
    else:
      x0_hat = pred[i]
    frac = (v[i] + 1) / 2
    log_var_model = frac * np.log(beta) + (1 - frac) * log_var_post
    if ti == 0:
      term = -_np_discretized_loglik(x0[i], mean(x0_hat, x_t[i]), 0.5 * log_var_model)
    else:
      s1, s2 = np.exp(0.5 * log_var_post), np.exp(0.5 * log_var_model)
      term = (
        np.log(s2 / s1)
        + (s1**2 + (mean(x0[i], x_t[i]) - mean(x0_hat, x_t[i])) ** 2) / (2 * s2**2)
        - 0.5
      )
    out.append(term.mean() / np.log(2))
  return np.array(out)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_vlb_terms_match_a_float64_reference(prediction_type):
  schedule = DiscreteSchedule(variance_type="learned_range", prediction_type=prediction_type)
  rng = np.random.default_rng(2)
  t = np.array([0, 0, 1, 2, 10, 250, 500, 998, 999])
  shape = (len(t), 4, 4, 3)
  x0 = rng.integers(0, 256, shape) / 127.5 - 1
  eps = rng.standard_normal(shape)
  ab = schedule.alphas_cumprod.astype(np.float64)[t].reshape(-1, 1, 1, 1)
  x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
  goal = eps if prediction_type == "epsilon" else x0
  pred = goal + 0.05 * rng.standard_normal(shape)
  v = rng.uniform(-1, 1, shape)
  ours = discrete.vlb_terms(schedule, *(np.float32(a) for a in (pred, v, x0, x_t)), t)
  np.testing.assert_allclose(ours, _np_vlb(schedule, pred, v, x0, x_t, t), rtol=2e-3, atol=1e-4)


def test_vlb_kl_vanishes_at_the_true_posterior():
  schedule = DiscreteSchedule(variance_type="learned_range")
  rng = np.random.default_rng(3)
  t = np.array([1, 2, 10, 250, 500, 998, 999])
  shape = (len(t), 8, 8, 3)
  x0 = np.float32(rng.uniform(-1, 1, shape))
  eps = np.float32(rng.standard_normal(shape))
  ab = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
  x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
  at_posterior = discrete.vlb_terms(schedule, eps, -np.ones(shape, np.float32), x0, x_t, t)
  assert np.abs(np.asarray(at_posterior)).max() < 1e-8  # ~1e-11: float32 rounding of x_t
  # Off the posterior it is clearly positive: a wrong variance (v = +1, beta_t) or a wrong eps.
  wrong_var = discrete.vlb_terms(schedule, eps, np.ones(shape, np.float32), x0, x_t, t)
  wrong_eps = discrete.vlb_terms(schedule, eps + 0.1, -np.ones(shape, np.float32), x0, x_t, t)
  assert np.all(np.asarray(wrong_var)[:2] > 1e-2) and np.all(np.asarray(wrong_eps) > 1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
@pytest.mark.parametrize("learned", [False, True])
def test_loss_simple_is_the_mse_on_the_drawn_time_and_noise(prediction_type, learned):
  schedule = DiscreteSchedule(
    variance_type="learned_range" if learned else "fixed_small_log",
    prediction_type=prediction_type,
  )
  rng = jax.random.key(4)
  x0 = jax.random.uniform(jax.random.key(5), (6, 2, 4, 4, 3), minval=-1, maxval=1)
  output = jax.random.normal(jax.random.key(6), x0.shape[:-1] + ((6 if learned else 3),))
  seen = {}

  def predict(z, t):
    seen["z"], seen["t"] = z, t
    return output

  loss, aux = discrete.loss_discrete(predict, x0, rng, schedule)
  t_rng, noise_rng = jax.random.split(rng)
  t = np.asarray(jax.random.randint(t_rng, (6,), 0, 1000))
  eps = np.asarray(jax.random.normal(noise_rng, x0.shape), np.float64)
  ab = schedule.alphas_cumprod[t].astype(np.float64).reshape(-1, 1, 1, 1, 1)
  x0 = np.asarray(x0, np.float64)
  np.testing.assert_allclose(seen["z"], np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps, atol=1e-6)
  assert seen["t"].dtype == np.float32
  np.testing.assert_array_equal(seen["t"], t.astype(np.float32))
  np.testing.assert_array_equal(aux["t"], t)
  goal = eps if prediction_type == "epsilon" else x0
  pred = np.asarray(output, np.float64)[..., :3]
  per_example = ((goal - pred) ** 2).mean(axis=(1, 2, 3, 4))
  np.testing.assert_allclose(aux["loss_simple"], per_example.mean(), rtol=1e-5)
  np.testing.assert_allclose(loss, aux["loss_simple"] + aux["loss_vlb"], rtol=1e-5)
  if learned:
    assert float(aux["loss_vlb"]) > 0
    v = np.asarray(output, np.float64)[..., 3:]
    z = np.asarray(seen["z"], np.float64)
    expected = _np_vlb(schedule, pred, v, x0, z, t)
    np.testing.assert_allclose(aux["loss_vlb"], expected.mean(), rtol=2e-3)
    np.testing.assert_allclose(aux["loss"], per_example + expected, rtol=2e-3)
  else:
    assert float(aux["loss_vlb"]) == 0


def test_vlb_gradient_reaches_only_the_variance_channels():
  schedule = DiscreteSchedule(variance_type="learned_range")
  x0 = jax.random.uniform(jax.random.key(0), (8, 4, 4, 3), minval=-1, maxval=1)
  t = np.array([0, 1, 5, 100, 400, 700, 998, 999])
  output = 0.5 * jax.random.normal(jax.random.key(1), (8, 4, 4, 6))

  def loss_parts(out):
    _, aux = discrete.loss_discrete(lambda z, t: out, x0, jax.random.key(2), schedule, t=t)
    return aux["loss_simple"], aux["loss_vlb"]

  g_vlb = jax.grad(lambda o: loss_parts(o)[1])(output)
  g_simple = jax.grad(lambda o: loss_parts(o)[0])(output)
  assert np.all(np.asarray(g_vlb[..., :3]) == 0)  # stop-gradient: the mean is L_simple's
  assert np.all(np.abs(np.asarray(g_vlb[..., 3:])).max(axis=(1, 2, 3)) > 0)  # every t, 0 too
  assert np.all(np.asarray(g_simple[..., 3:]) == 0)
  g_total = jax.grad(
    lambda o: discrete.loss_discrete(lambda z, t: o, x0, jax.random.key(2), schedule, t=t)[0]
  )(output)
  np.testing.assert_allclose(g_total[..., :3], g_simple[..., :3], rtol=1e-6, atol=1e-12)


def test_loss_errors():
  schedule = DiscreteSchedule(variance_type="learned_range")
  x0 = np.zeros((2, 4, 4, 3), np.float32)
  with pytest.raises(errors.UserError, match=r"\(2, 4, 4, 6\).*variance"):
    discrete.loss_discrete(lambda z, t: z, x0, jax.random.key(0), schedule)
  with pytest.raises(errors.UserError, match=r"\(2, 4, 4, 3\)"):
    discrete.loss_discrete(
      lambda z, t: jax.numpy.concatenate([z, z], -1),
      x0,
      jax.random.key(0),
      schedule,
      learned_variance=False,
    )
