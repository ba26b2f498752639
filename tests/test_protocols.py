"""mav_jax.eval.protocols: prompts from MSR-VTT captions and UCF-101 class names, the real side read
from video files at the generated clips' frame rate, and a whole protocol run through a stand-in
cascade (rendered ground truth) with small stand-in extractors on 8 devices."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.eval import msrvtt, ucf101
from mav_jax.data import synthetic
from mav_jax.eval import motion_benchmark, protocols
from mav_jax.utils import video_io


def test_read_captions_text_and_msrvtt_json(tmp_path):
  text = tmp_path / "captions.txt"
  text.write_text("a red circle\n\n  a blue square  \n")
  assert protocols.read_captions(str(text)) == ["a red circle", "a blue square"]
  data = {
    "sentences": [
      {"caption": "train video", "video_id": "video12"},
      {"caption": "first test video", "video_id": "video7010"},
      {"caption": "last test video", "video_id": "video9999"},
    ]
  }
  js = tmp_path / "MSRVTT_data.json"
  js.write_text(json.dumps(data))
  assert protocols.read_captions(str(js)) == ["first test video", "last test video"]
  assert len(protocols.read_captions(str(js), test_split=False)) == 3
  with pytest.raises(FileNotFoundError, match="does not exist"):
    protocols.read_captions(str(tmp_path / "missing.txt"))
  (tmp_path / "empty.txt").write_text("\n")
  with pytest.raises(ValueError, match="no captions"):
    protocols.read_captions(str(tmp_path / "empty.txt"))
  (tmp_path / "c.csv").write_text("x")
  with pytest.raises(ValueError, match=r"\.txt"):
    protocols.read_captions(str(tmp_path / "c.csv"))


def test_ucf101_prompts_from_class_names(tmp_path):
  assert protocols.class_words("ApplyEyeMakeup") == "apply eye makeup"
  assert protocols.class_words("YoYo") == "yo yo"
  assert protocols.class_words("PlayingDhol") == "playing dhol"
  index = tmp_path / "classInd.txt"
  index.write_text("1 ApplyEyeMakeup\n2 YoYo\n\n")
  prompts = protocols.ucf101_prompts(str(index), "a person {}")
  assert prompts == [("ApplyEyeMakeup", "a person apply eye makeup"), ("YoYo", "a person yo yo")]
  assert protocols.cycle([p for _, p in prompts], 5)[4] == "a person apply eye makeup"
  with pytest.raises(ValueError, match="needs a"):
    protocols.ucf101_prompts(str(index), "a person")
  index.write_text("ApplyEyeMakeup\n")
  with pytest.raises(ValueError, match="classInd.txt:1"):
    protocols.ucf101_prompts(str(index), "{}")


def test_real_clips_are_taken_by_time_from_variable_frame_rate_files(tmp_path):
  """The real side's clip at the generated fps: frames chosen by their timestamps, so a
  variable-frame-rate file is read at real speed (not as if its frames were evenly spaced)."""
  from test_data import VFR_MS, _frame_numbers, _write_timed

  path = tmp_path / "vfr.mkv"
  _write_timed(path, VFR_MS, "1/1000", "matroska", "libx264")
  clip = protocols.clip_at_times(str(path), num_frames=6, fps=1.0)
  # On screen at 0, 1, ..., 5 s: frames 0 (shown at 0 s), 3 (1.0 s), 4 (1.04 s), 5 (3.0 s),
  # 7 (3.02 s), 8 (5.0 s).
  assert _frame_numbers(clip) == [0, 3, 4, 5, 7, 8]
  # Past the end the last frame repeats; evenly spaced indices would have given 0, 1, 2, 3, 4, 5.
  assert _frame_numbers(protocols.clip_at_times(str(path), 3, 0.2)) == [0, 8, 8]
  with pytest.raises(ValueError, match="does not exist"):
    protocols.clip_at_times(str(tmp_path / "missing.mp4"), 2, 1.0)


def test_config_checks_fail_before_any_work(tmp_path):
  config = msrvtt.get_config()
  with pytest.raises(ValueError, match="config.captions"):
    protocols.prompts_for(config)
  config.metrics = "fid,psnr"
  with pytest.raises(ValueError, match="unknown metrics"):
    protocols.parse_metrics(config)
  config.metrics = "fid"
  with pytest.raises(ValueError, match="exactly one of"):
    protocols.check_real_side(config, ["fid"])
  config.real_stats = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="real_fid.npz"):
    protocols.check_real_side(config, ["fid"])
  u = ucf101.get_config()
  with pytest.raises(ValueError, match="config.class_index"):
    protocols.prompts_for(u)


class _RenderCascade:
  """Stands in for sample_lib.Cascade: "generates" rendered ground truth of each caption."""

  def __init__(self, mesh):
    self.mesh, self.stages, self.calls = mesh, {}, []

  def text_to_video(self, prompts, rng, *, fps, num_frames, frame_skip, until):
    self.calls.append(len(prompts))
    combos = [tuple(p.split()[i] for i in (2, 1, 4)) for p in prompts]
    seed = int(jax.random.randint(rng, (), 0, 1000))
    clips = motion_benchmark.ground_truth(combos, num_frames, 16, fps, 1.5, seed)
    return clips.astype(np.float32) / 127.5 - 1.0, fps


def _stand_in_extractors(mesh) -> protocols.Extractors:
  """Small features that see colour and motion: enough for the Fréchet distances to tell sets
  apart; jitted and sharded like the real extractors."""

  def frames(x):  # [n, h, w, 3] -> mean and spread of each channel, and brightness per half
    h = x.shape[1] // 2
    return jnp.concatenate(
      [x.mean((1, 2)), x.std((1, 2)), x[:, :h].mean((1, 2, 3))[:, None]], axis=-1
    )

  def image(x):
    f = frames(x)
    return {"pool": f, "logits": 4 * f, "logits_unbiased": 4 * f}

  def video(x):  # [n, t, h, w, 3] -> colour and where the object's mass moves
    ys = jnp.linspace(-1, 1, x.shape[2])[:, None]
    xs = jnp.linspace(-1, 1, x.shape[3])[None, :]
    mass = x.mean(-1)
    w = mass / mass.sum((2, 3), keepdims=True)
    cx, cy = (w * xs).sum((2, 3)), (w * ys).sum((2, 3))
    logits = jnp.concatenate(
      [x.mean((1, 2, 3)), (cx[:, -1] - cx[:, 0])[:, None], (cy[:, -1] - cy[:, 0])[:, None]], -1
    )
    return {"pool": logits, "logits": 8 * logits}

  background = np.asarray(synthetic.BACKGROUND, np.float32) / 255

  def text(captions):  # the palette colour the caption names
    return np.stack([np.asarray(synthetic.COLOURS[c.split()[1]]) / 255 for c in captions])

  def clip_image(x):  # the mean colour off the background
    return x.mean((1, 2)) - background

  return protocols.Extractors(
    inception=protocols.Sharded(jax.jit(image), mesh),
    i3d=protocols.Sharded(jax.jit(video), mesh),
    clip_image=protocols.Sharded(jax.jit(clip_image), mesh),
    clip_text=text,
  )


def _write_real_videos(folder, combos, seed):
  """Rendered clips of `combos` as 24 fps MP4 files (the protocol resamples them to 8 fps)."""
  clips = motion_benchmark.ground_truth(combos, 12, 16, 24.0, 1.5, seed)
  for i, clip in enumerate(clips):
    video_io.write_video(os.path.join(folder, f"sub/v{i}.mp4"), clip, fps=24.0)


def test_protocol_run_end_to_end(tmp_path):
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  assert mesh.size == 8
  combos = motion_benchmark.captions(1)[:12]  # circles: every colour and direction
  captions = tmp_path / "captions.txt"
  captions.write_text("\n".join(synthetic.video_caption(*c) for c in combos))
  _write_real_videos(str(tmp_path / "real"), combos, seed=1)
  (tmp_path / "real" / "broken.mp4").write_bytes(b"not a video")  # skipped, not fatal
  config = msrvtt.get_config()
  config.update(
    captions=str(captions),
    metrics="fid,clipsim,fvd,is",
    is_features="i3d",
    real_videos=str(tmp_path / "real"),
    num_frames=4,
    fps=8.0,
    batch_size=5,  # 12 prompts: batches of 5, 5 and a padded 2
    preview=3,
  )
  cascade, ex = _RenderCascade(mesh), _stand_in_extractors(mesh)
  out = str(tmp_path / "out")
  matched = protocols.run(config, cascade, out, seed=0, log=lambda _: None, ex=ex)
  assert cascade.calls == [5, 5, 5]
  assert set(matched) == {"fid", "fvd", "is", "is_std", "clipsim"}
  for name in ("results.json", "results.md", "preview.gif", "gen_fid.npz", "real_fvd.npz"):
    assert os.path.isfile(os.path.join(out, name)), name
  setup = json.load(open(os.path.join(out, "results.json")))["setup"]
  assert (setup["frames"], setup["fps"], setup["size"], setup["videos"]) == (4, 8.0, 16, 12)
  assert setup["real_videos_read"] == 12
  assert setup["real_videos_skipped"] == [str(tmp_path / "real" / "broken.mp4")]
  # The statistics count the 12 videos (48 frames), not the 3 padding rows of the last batch.
  for name, count in (("gen_fid", 48), ("gen_fvd", 12), ("real_fid", 48), ("real_fvd", 12)):
    with np.load(os.path.join(out, f"{name}.npz")) as f:
      assert int(f["count"]) == count, name
  # The stand-in CLIP's image and text embeddings point the same way when the colours match.
  assert matched["clipsim"] > 0.9
  # Real clips of other captions (squares and triangles moving the other way, and all red) are
  # further from the generated set than real clips of the same captions.
  other = [("square", "red", {"left": "right", "right": "left"}.get(d, d)) for _, _, d in combos]
  _write_real_videos(str(tmp_path / "other"), other, seed=1)
  config.update(real_videos=str(tmp_path / "other"), metrics="fid,fvd")
  mismatched = protocols.run(config, cascade, str(tmp_path / "o2"), 0, lambda _: None, ex=ex)
  assert mismatched["fid"] > 3 * matched["fid"] and mismatched["fvd"] > 3 * matched["fvd"]
  # The saved real statistics replace the real videos and give the same distances.
  config.update(real_videos="", real_stats=out)
  again = protocols.run(config, cascade, str(tmp_path / "o3"), 0, lambda _: None, ex=ex)
  assert again["fid"] == pytest.approx(matched["fid"], rel=1e-9)
  assert again["fvd"] == pytest.approx(matched["fvd"], rel=1e-9)


_TWO_HOSTS_JOB = """
import argparse, os
p = argparse.ArgumentParser()
for name in ("folder", "coordinator_address", "num_processes", "process_id", "cpu_devices"):
  p.add_argument("--" + name)
a = p.parse_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={a.cpu_devices}"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(a.coordinator_address, int(a.num_processes), int(a.process_id))
import test_protocols as t
from mav_jax.eval import protocols
mesh = protocols.data_mesh()
config = t._merge_config(a.folder)
cascade, ex = t._GlobalRenderCascade(mesh), t._stand_in_extractors(mesh)
protocols.run(config, cascade, os.path.join(a.folder, "two"), 0, lambda _: None, ex=ex)
print("calls", cascade.calls, "devices", jax.device_count(), flush=True)
"""


class _GlobalRenderCascade(_RenderCascade):
  """Its videos on the devices, padded to a multiple of them as the cascade pads its batch: with
  several processes, each holds only its devices' rows."""

  def text_to_video(self, prompts, rng, **kwargs):
    from mav_jax import sample_lib
    from mav_jax.parallel import sharding

    clips, fps = super().text_to_video(prompts, rng, **kwargs)
    k = sharding.batch_shards(self.mesh)
    spec = sharding.batch_sharding(self.mesh)
    return sample_lib.place_batch(clips, -(-len(prompts) // k) * k, spec), fps


def _merge_config(folder):
  config = msrvtt.get_config()
  config.update(
    captions=os.path.join(folder, "captions.txt"),
    metrics="fid,clipsim,fvd,is",
    is_features="i3d",
    real_videos=os.path.join(folder, "real"),
    num_frames=4,
    fps=8.0,
    batch_size=4,  # 10 prompts: batches of 4, 4 and a padded 2
    preview=0,
  )
  return config


def test_statistics_merge_across_processes_to_the_one_process_metrics(tmp_path):
  """One job of 2 processes x 2 devices (launch/local.py; each process holds its devices' rows of
  every generated batch) gives the FVD, FID, IS and CLIPSIM of 1 process on 8 devices: every
  process's features reach the statistics once, and the padding none of them."""
  import subprocess
  import sys

  combos = motion_benchmark.captions(1)[:10]
  (tmp_path / "captions.txt").write_text("\n".join(synthetic.video_caption(*c) for c in combos))
  flip = {"left": "right", "right": "left", "up": "down", "down": "up"}
  _write_real_videos(str(tmp_path / "real"), [("square", "red", flip[d]) for *_, d in combos], 2)
  (tmp_path / "eval_two_hosts_job.py").write_text(_TWO_HOSTS_JOB)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  command = [sys.executable, "launch/local.py", "--num_processes=2", "--cpu_devices=2"]
  command += ["--module=eval_two_hosts_job", "--", f"--folder={tmp_path}"]
  path = os.pathsep.join([str(tmp_path), os.path.join(repo, "tests"), repo])
  two = subprocess.run(
    command, cwd=repo, env={**os.environ, "PYTHONPATH": path},
    capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
  for i in (0, 1):
    assert f"[process {i}] calls [4, 4, 4] devices 4" in two.stdout, two.stdout[-3000:]
  mesh = protocols.data_mesh()
  assert mesh.size == 8
  one = protocols.run(
    _merge_config(str(tmp_path)), _GlobalRenderCascade(mesh), str(tmp_path / "one"), 0,
    lambda _: None, ex=_stand_in_extractors(mesh),
  )  # fmt: skip
  merged = json.loads((tmp_path / "two" / "results.json").read_text())
  assert merged["setup"]["processes"] == 2
  assert set(merged["metrics"]) == set(one) == {"fid", "fvd", "is", "is_std", "clipsim"}
  for name, value in one.items():
    assert merged["metrics"][name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
  # Real clips of other captions (0.096 and 0.015 measured): the distances are not 0 by construction.
  assert one["fvd"] > 0.01 and one["fid"] > 0.001
  for name, count in (("gen_fid", 40), ("gen_fvd", 10), ("real_fvd", 10)):
    with (
      np.load(tmp_path / "one" / f"{name}.npz") as a,
      np.load(tmp_path / "two" / f"{name}.npz") as b,
    ):
      assert int(a["count"]) == int(b["count"]) == count, name
      np.testing.assert_allclose(b["mu"], a["mu"], rtol=1e-6, atol=1e-9, err_msg=name)
      np.testing.assert_allclose(b["sigma"], a["sigma"], rtol=1e-5, atol=1e-9, err_msg=name)


def test_padding_rows_stay_out_of_every_statistic():
  """A fixed batch of 5 whose last 3 rows pad it (and 5 clips padded again to the 8 devices) adds
  exactly what its 2 real rows alone add, for all four metrics."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  ex = _stand_in_extractors(mesh)
  combos = [("circle", "red", "left"), ("square", "blue", "up"), ("circle", "green", "right")]
  videos = motion_benchmark.ground_truth(combos, 4, 16, 8.0, 1.5, 0).astype(np.float32) / 255
  captions = [synthetic.video_caption(*c) for c in combos]
  # Padding unlike the real rows: another colour and motion, so letting it in moves every metric.
  padded = np.concatenate([videos[:2], np.repeat(videos[2:], 3, axis=0)])
  metrics = ["fid", "fvd", "is", "clipsim"]
  both = protocols.Accumulator(metrics, "i3d"), protocols.Accumulator(metrics, "i3d")
  both[0].update(padded, ex, captions[:2] + [captions[2]] * 3, count=2)
  both[1].update(videos[:2], ex, captions[:2])
  counts = [
    (a.frame_stats.count, a.clip_stats.count, int(a.inception_score.count.sum()), a.clipsim.count)
    for a in both
  ]
  assert counts[0] == counts[1] == (8, 2, 2, 2)
  for name in ("frame_stats", "clip_stats"):
    a, b = (getattr(acc, name) for acc in both)
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(a.scatter, b.scatter, rtol=1e-5, atol=1e-7, err_msg=name)
  np.testing.assert_allclose(
    both[0].inception_score.p_sum, both[1].inception_score.p_sum, rtol=1e-6
  )
  assert both[0].clipsim.result() == pytest.approx(both[1].clipsim.result(), rel=1e-6)


def test_real_side_fails_when_no_video_can_be_read(tmp_path):
  (tmp_path / "a.mp4").write_bytes(b"junk")
  acc = protocols.Accumulator(["fid"])
  with pytest.raises(ValueError, match="none of the 1 real videos"):
    protocols.read_real(
      [str(tmp_path / "a.mp4")], 4, 8.0, 16, 2, acc, protocols.Extractors(), print
    )
