"""Entrypoints end to end: the demo (train a few steps, write a sample) and count_params."""

import os
import subprocess
import sys

import av
import numpy as np
import pytest

from configs import decoder
from mav_jax import demo_lib
from mav_jax.models.summary import count_params
from mav_jax.utils import video_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_config():
  config = decoder.get_config("tiny")
  config.demo_steps = 3
  config.sampling.num_steps = 3
  return config


def _frames(path):
  with av.open(path) as container:
    return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_demo_trains_and_writes_a_video_and_contact_sheet(tmp_path):
  config = _tiny_config()
  out = str(tmp_path / "sample.gif")
  result = demo_lib.run_demo(config, out)
  assert len(result["losses"]) == 3 and np.all(np.isfinite(result["losses"]))
  frames = _frames(out)
  scale = 128 // config.data.resolution
  assert len(frames) == config.data.num_frames
  assert frames[0].shape == (config.data.resolution * scale, config.data.resolution * scale, 3)
  assert os.path.getsize(result["sheet"]) > 0
  # count_params (abstract shapes only) agrees with the model the demo really initialised.
  counts = count_params(config)
  assert counts["total"] == result["num_params"]
  assert 0 < counts["temporal"] < counts["total"]
  # A second run must not overwrite what the first wrote.
  before = open(out, "rb").read()
  with pytest.raises(FileExistsError, match="--overwrite"):
    demo_lib.run_demo(config, out)
  assert open(out, "rb").read() == before


def test_demo_cli_refuses_to_overwrite_and_exits_non_zero(tmp_path):
  out = tmp_path / "taken.gif"
  out.write_bytes(b"precious")
  proc = subprocess.run(
    [sys.executable, "-m", "mav_jax.demo", f"--output={out}"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode != 0
  assert "already exists" in proc.stderr
  assert out.read_bytes() == b"precious"


def test_count_params_cli_prints_the_counts():
  proc = subprocess.run(
    [sys.executable, "-m", "mav_jax.count_params", "--config", "configs/decoder.py:tiny"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr
  counts = count_params(decoder.get_config("tiny"))
  assert f"{counts['total']:,} parameters" in proc.stdout
  missing = subprocess.run(
    [sys.executable, "-m", "mav_jax.count_params"], cwd=REPO, capture_output=True, text=True
  )
  assert missing.returncode != 0 and "pass --config" in missing.stderr


def test_decoder_config_variants_and_unknown_variant():
  assert decoder.get_config().variant == "tiny"
  base = decoder.get_config("base")
  assert (base.data.num_frames, base.data.resolution) == (16, 64)
  with pytest.raises(ValueError, match="unknown decoder variant"):
    decoder.get_config("huge")


def test_video_writer_round_trips_gif_and_mp4(tmp_path):
  video = np.linspace(-1, 1, 4 * 8 * 8 * 3).reshape(4, 8, 8, 3)
  frames = video_io.to_uint8(video)
  assert frames.dtype == np.uint8 and frames.min() == 0 and frames.max() == 255
  for ext in (".gif", ".mp4"):
    path = str(tmp_path / f"v{ext}")
    video_io.write_video(path, frames, fps=4, scale=2)
    decoded = _frames(path)
    assert len(decoded) == 4 and decoded[0].shape == (16, 16, 3)
  with pytest.raises(ValueError, match="even frame sizes"):
    video_io.write_video(str(tmp_path / "odd.mp4"), np.zeros((2, 5, 5, 3), np.uint8))
  with pytest.raises(ValueError, match="supported video types"):
    video_io.check_output_path(str(tmp_path / "v.avi"), overwrite=False)
