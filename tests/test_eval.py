"""mav_jax.eval: streaming statistics and the Fréchet distance against a scipy float64 reference,
Inception Score and CLIPSIM against numpy, and the motion benchmark's pixel measures on rendered
ground truth."""

import types

import jax
import numpy as np
import pytest
import scipy.linalg
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mav_jax.data import synthetic
from mav_jax.eval import motion, motion_benchmark, scores, stats


def _reference_fid(x, y):
  """The FID reference computation in float64 (mean, np.cov, scipy's sqrtm)."""
  mu1, mu2 = x.mean(0), y.mean(0)
  s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _features(rng, n, d, shift=0.0):
  mixing = rng.normal(size=(d, d)) / np.sqrt(d)
  return (rng.normal(size=(n, d)) @ mixing + shift).astype(np.float32)


def test_streaming_stats_match_numpy_over_uneven_sharded_batches():
  rng = np.random.default_rng(0)
  x = _features(rng, 360, 32, shift=3.0)  # an offset mean: a raw sum of squares would lose digits
  mesh = Mesh(np.array(jax.devices()).reshape(8), ("data",))
  running = stats.GaussianStats()
  for start, stop in ((0, 8), (8, 200), (200, 200), (200, 360)):
    batch = x[start:stop]
    if len(batch) and len(batch) % 8 == 0:
      batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
    running.update(batch)
  assert running.count == 360
  np.testing.assert_allclose(running.mean, x.astype(np.float64).mean(0), atol=1e-5)
  np.testing.assert_allclose(
    running.covariance, np.cov(x.astype(np.float64), rowvar=False), atol=1e-4
  )


@pytest.mark.parametrize("d,shift", [(16, 0.0), (64, 0.5)])
def test_frechet_distance_matches_scipy_float64(d, shift):
  rng = np.random.default_rng(d)
  x, y = _features(rng, 500, d), _features(rng, 400, d, shift=shift)
  a, b = stats.GaussianStats().update(x), stats.GaussianStats().update(y)
  expected = _reference_fid(np.float64(x), np.float64(y))
  assert stats.frechet_between(a, b) == pytest.approx(expected, rel=1e-4, abs=1e-6)
  assert stats.frechet_between(a, a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_of_known_gaussians_and_rank_deficient_covariances():
  # Diagonal covariances: d^2 = |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2.
  s1, s2 = np.array([1.0, 4.0, 0.0]), np.array([9.0, 1.0, 0.0])
  mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
  got = stats.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
  assert got == pytest.approx(5.0 + (1 - 3) ** 2 + (2 - 1) ** 2, abs=1e-9)
  with pytest.raises(ValueError, match="means"):
    stats.frechet_distance(mu1, np.diag(s1), mu2[:2], np.diag(s2))


def test_stats_save_load_round_trip_and_errors(tmp_path):
  rng = np.random.default_rng(1)
  a = stats.GaussianStats().update(_features(rng, 50, 8))
  a.save(str(tmp_path / "ref.npz"))
  b = stats.GaussianStats.load(str(tmp_path / "ref.npz"))
  assert b.count == 50
  np.testing.assert_allclose(b.covariance, a.covariance)
  with pytest.raises(ValueError, match="does not match"):
    a.update(np.zeros((4, 9), np.float32))
  with pytest.raises(ValueError, match="at least 2"):
    _ = stats.GaussianStats().update(np.zeros((1, 8), np.float32)).covariance
  np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
  with pytest.raises(ValueError, match="not a feature-statistics file"):
    stats.GaussianStats.load(str(tmp_path / "bad.npz"))


def test_inception_score_matches_numpy_and_its_limits():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(103, 12)) * 3
  score = scores.InceptionScore(splits=5)
  for chunk in np.array_split(logits, 4):
    score.update(chunk)
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  expected = []
  for k in range(5):
    part = p[np.arange(103) % 5 == k]
    kl = (part * (np.log(part) - np.log(part.mean(0)))).sum(1).mean()
    expected.append(np.exp(kl))
  mean, std = score.result()
  assert mean == pytest.approx(np.mean(expected), rel=1e-5)
  assert std == pytest.approx(np.std(expected), rel=1e-4)
  # Confident and spread over 4 classes evenly: IS = 4; all alike: IS = 1.
  sharp = np.eye(4)[np.arange(40) // 2 % 4] * 50.0  # each split sees every class
  assert scores.InceptionScore(splits=2).update(sharp).result()[0] == pytest.approx(4.0, rel=1e-4)
  same = np.tile(rng.normal(size=(1, 4)), (40, 1))
  assert scores.InceptionScore(splits=2).update(same).result()[0] == pytest.approx(1.0, abs=1e-6)
  with pytest.raises(ValueError, match="needs >= 10 samples"):
    scores.InceptionScore().update(logits[:3]).result()


def test_clip_similarity_is_the_mean_frame_cosine():
  rng = np.random.default_rng(3)
  text, frames = rng.normal(size=(3, 8)), rng.normal(size=(3, 5, 8))
  got = np.asarray(scores.clip_similarity(text, frames))
  cos = np.einsum("bd,bfd->bf", text, frames) / (
    np.linalg.norm(text, axis=-1)[:, None] * np.linalg.norm(frames, axis=-1)
  )
  np.testing.assert_allclose(got, cos.mean(1), rtol=1e-5)
  assert scores.Mean().update(got).update(got[:1]).result() == pytest.approx(
    np.concatenate([cos.mean(1), cos.mean(1)[:1]]).mean(), rel=1e-5
  )


def _ground_truth(resolution, count=120, frames=8, fps=4.0):
  source = synthetic.SyntheticSource("eval", count, duration=(frames - 1) / fps)
  clips, captions = [], []
  for i in range(count):
    scene = source[i]["scene"]
    clips.append(synthetic.render(scene, synthetic.clip_times(scene, fps, frames), resolution))
    captions.append((scene.shape, scene.colour, scene.direction))
  return clips, captions


def test_motion_measures_read_rendered_ground_truth():
  clips, captions = _ground_truth(32)
  result = motion.score([motion.measure_clip(c) for c in clips], captions)
  assert result["all_correct"] == 1.0 and result["visible_fraction"] == 1.0
  assert result["size_variation"] < 0.05 and result["colour_change"] < 0.05
  # 16x16 objects are 3-5 pixels wide; the measures still read nearly all of them.
  small_clips, small_captions = _ground_truth(16, count=60)
  small = motion.score([motion.measure_clip(c) for c in small_clips], small_captions)
  assert small["direction_accuracy"] == 1.0 and small["colour_accuracy"] == 1.0
  assert small["shape_accuracy"] >= 0.95


def test_motion_measures_see_reversed_static_and_empty_clips():
  clips, captions = _ground_truth(32, count=4)  # circle, red: left, right, up, down
  opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
  for clip, (_, _, direction) in zip(clips, captions, strict=True):
    assert motion.measure_clip(clip[::-1]).direction == opposite[direction]
    static = motion.measure_clip(np.repeat(clip[:1], len(clip), axis=0))
    assert static.direction == "none" and static.size_variation == pytest.approx(0.0)
  empty = np.broadcast_to(np.asarray(synthetic.BACKGROUND, np.uint8), (4, 32, 32, 3))
  assert motion.measure_clip(empty) == motion.ClipMeasure(
    "none", "none", "none", (0.0, 0.0), 0.0, 0.0, 0.0
  )
  with pytest.raises(ValueError, match="one caption per"):
    motion.score([motion.measure_clip(clips[0])], [])


class _TruthCascade:
  """Stands in for sample_lib.Cascade: every stage returns rendered ground truth of the prompts at
  that stage's size (D^t 4 frames of 16 px, ↑F x3 frames, SR_l 32 px, SR_h 64 px), so the benchmark
  must read back exactly what was asked at every stage."""

  def __init__(self):
    from configs import decoder, interp

    self.stages = {
      name: types.SimpleNamespace(config=cfg)
      for name, cfg in [
        ("prior", None),
        ("decoder", decoder.get_config("tiny")),
        ("interp", interp.get_config("tiny")),
        ("sr_low", None),
        ("sr_high", None),
      ]
    }
    self.calls = []

  def require(self, *names):
    assert set(names) <= set(self.stages)

  def prior(self, prompts, rng):
    self.calls.append("prior")
    return prompts  # the "embedding" carries the prompts to the decoder

  def _render(self, prompts, frames, resolution, fps):
    combos = [tuple(p.split()[i] for i in (2, 1, 4)) for p in prompts]  # shape, colour, direction
    clips = motion_benchmark.ground_truth(combos, frames, resolution, fps, duration=1.5)
    return clips.astype(np.float32) / 127.5 - 1.0

  def decoder(self, embedding, fps, num_frames, rng, prompts=None):
    self.calls.append("decoder")
    assert prompts == embedding  # the prompts reach a text-aware D^t
    self.prompts = prompts
    return self._render(prompts, num_frames, 16, fps)

  def expand(self, clip, skip, fps, embedding, rng, prompts=None):
    self.calls.append("interp")
    return self._render(prompts, (clip.shape[1] - 1) * skip + 1, 16, fps * skip)

  def super_resolve(self, name, clip, rng):
    self.calls.append(name)
    size = {"sr_low": 32, "sr_high": 64}[name]
    return self._render(self.prompts, clip.shape[1], size, 12.0)


def test_motion_benchmark_measures_every_stage_of_the_chain():
  cascade = _TruthCascade()
  rows, clips = motion_benchmark.run(cascade, per_combination=1, batch_size=40, log=lambda _: None)
  assert cascade.calls[:5] == ["prior", "decoder", "interp", "sr_low", "sr_high"]
  assert cascade.calls.count("prior") == 2  # 60 captions in batches of 40
  assert [(r["stage"], r["kind"], r["frames"], r["resolution"]) for r in rows[::2]] == [
    ("decoder", "generated", 4, 16),
    ("interp", "generated", 10, 16),
    ("sr_low", "generated", 10, 32),
    ("sr_high", "generated", 10, 64),
  ]
  assert {k: v.shape for k, v in clips.items()}["sr_high"] == (60, 10, 64, 64, 3)
  for row in rows:
    assert row["clips"] == 60 and row["colour_accuracy"] == 1.0
    assert row["direction_accuracy"] == 1.0 and row["shape_accuracy"] >= 0.9
  table = motion_benchmark.format_table(rows)
  assert table.count("\n") == len(rows) + 1 and "| sr_high | generated | 10 | 64 | 60 |" in table
