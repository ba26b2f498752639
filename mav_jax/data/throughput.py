"""Library of `python -m mav_jax.data.benchmark`: measures input-pipeline throughput per core."""

import os
import tempfile
import time

import numpy as np

from mav_jax.data import pipeline, prepare, records, synthetic
from mav_jax.utils import video_io


def _measure(ds, seconds: float) -> dict:
  it = iter(ds)
  first = next(it)  # warm-up: thread start-up, first decode
  clip_bytes = first["frames"][0].nbytes
  clips, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
  while time.perf_counter() - wall0 < seconds:
    clips += len(next(it)["frames"])
  wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
  return {
    "clips": clips,
    "wall_s": round(wall, 2),
    "cpu_s": round(cpu, 2),
    "clips_per_cpu_s": round(clips / cpu, 2),
    "output_mb_per_cpu_s": round(clips * clip_bytes / cpu / 1e6, 2),
  }


def _write_mp4_dataset(folder: str, num_videos: int, size: str, seconds: float) -> str:
  width, height = (int(v) for v in size.lower().split("x"))
  videos = os.path.join(folder, "videos")
  os.makedirs(videos)
  source = synthetic.SyntheticSource("train", num_videos, duration=seconds)
  rows = ["videoid,name"]
  for i in range(num_videos):
    scene = source[i]["scene"]
    side = max(width, height)
    frames = synthetic.render(scene, np.arange(int(seconds * 30)) / 30.0, side)
    top, left = (side - height) // 2, (side - width) // 2
    video_io.write_video(
      os.path.join(videos, f"{i}.mp4"), frames[:, top : top + height, left : left + width], fps=30
    )
    rows.append(f"{i},{scene.video_caption}")
  with open(os.path.join(folder, "captions.csv"), "w") as f:
    f.write("\n".join(rows) + "\n")
  out = os.path.join(folder, "prepared")
  prepare.prepare("video", videos, os.path.join(folder, "captions.csv"), out, log=lambda _: None)
  return out


def run(config, seconds: float, num_videos: int, video_size: str, video_seconds: float) -> dict:
  """Measures both sources; returns {"synthetic": {...}, "mp4": {...}}."""
  d = config.data
  single = dict(num_threads=1, worker_count=0)
  results = {}
  data = config.data.copy_and_resolve_references()
  data.source = "synthetic"
  ds, _ = pipeline.pipeline_from_config(data, "train", batch_size=1, **single)
  results["synthetic"] = _measure(ds, seconds)
  print(f"[benchmark] synthetic: {results['synthetic']}", flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.time()
    folder = _write_mp4_dataset(tmp, num_videos, video_size, video_seconds)
    mp4_bytes = sum(os.path.getsize(p) for p in records.shard_paths(folder))
    print(
      f"[benchmark] encoded {num_videos} mp4s ({video_size}, {video_seconds}s, 30 fps) in "
      f"{time.time() - t0:.0f}s",
      flush=True,
    )
    data.source = folder
    ds, _ = pipeline.pipeline_from_config(data, "train", batch_size=1, **single)
    results["mp4"] = _measure(ds, seconds)
    results["mp4"]["input_mb_per_cpu_s"] = round(
      results["mp4"]["clips_per_cpu_s"] * mp4_bytes / num_videos / 1e6, 2
    )
    results["mp4"]["source"] = f"{num_videos} x {video_size} H.264, {video_seconds}s at 30 fps"
    print(f"[benchmark] mp4: {results['mp4']}", flush=True)
  results["clip"] = f"{d.num_frames} frames of {d.resolution}x{d.resolution}"
  return results
