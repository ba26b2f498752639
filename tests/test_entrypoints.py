"""Entrypoints end to end: `mav_jax.sample` (README.md's main job) and count_params."""

import json
import os
import shutil
import subprocess
import sys
import types

import av
import numpy as np
import pytest

from configs import clip as clip_config
from configs import decoder
from mav_jax import errors, sample_lib
from mav_jax.data import tokenizers
from mav_jax.models.summary import count_params
from mav_jax.utils import video_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _frames(path):
  with av.open(path) as container:
    return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def _sample(*args, timeout=600):
  return subprocess.run(
    [sys.executable, "-m", "mav_jax.sample", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def test_main_job_command_writes_video_and_contact_sheet(tmp_path):
  """The README's main-job command with only the prompt and output (plus fewer sampler steps)."""
  out = tmp_path / "out.gif"
  proc = _sample("--prompt", "a red circle moving left", f"--output={out}", "--steps=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  frames = _frames(str(out))
  # The tiny cascade: 4 frames -> ↑F (skip 3) 10 frames -> 16 px -> 32 px -> 64 px, upscaled x3.
  assert len(frames) == 10 and frames[0].shape == (192, 192, 3)
  assert (tmp_path / "out.png").exists()
  for stage in ("prior", "decoder", "interp", "sr_low", "sr_high"):
    assert f"[sample] {stage}" in proc.stderr


def test_sample_cli_errors_exit_non_zero_and_touch_nothing(tmp_path):
  out = tmp_path / "taken.gif"
  out.write_bytes(b"precious")
  proc = _sample("--prompt", "a red circle", f"--output={out}")
  assert proc.returncode == 1 and "already exists" in proc.stderr
  assert out.read_bytes() == b"precious"
  fresh = tmp_path / "new.gif"
  # A model file cut short (a copy interrupted, a full disk): named, one line.
  damaged = tmp_path / "decoder"
  shutil.copytree(f"{REPO}/checkpoints/tiny/decoder", damaged)
  data = max((damaged / "params").glob("ocdbt.process_*/d/*"), key=lambda p: p.stat().st_size)
  os.truncate(data, 100)
  long_prompt = "a red circle moving left across a long and winding road"
  for args, message in [
    (["--prompt", "x", f"--decoder={damaged}"], f"{damaged}/params cannot be read"),
    (["--prompt", long_prompt, "--until=decoder"], "pass --truncate_prompts"),
    (["--prompt", "x", "--steps=decoder=0"], "--steps: 0 in 'decoder=0'; it must be >= 1"),
    (["--prompt", "x", "--num_frames=1000"], "the decoder samples 2 to 33 frames"),
    (["--prompt", "x", "--gudance=3"], "Did you mean: guidance"),
    (["--prompt", "  "], "empty --prompt"),
    (["--mode=image", f"--image={tmp_path / 'missing.png'}"], "does not exist"),
    (["--prompt", "x", f"--decoder={tmp_path}"], "no decoder checkpoint there"),
    (["--prompt", "x", f"--decoder={REPO}/checkpoints/tiny/prior"], "holds a 'prior' checkpoint"),
    (["--mode=interpolate", f"--image={out}"], "needs two images"),
  ]:
    proc = _sample(*args, f"--output={fresh}")
    assert proc.returncode == 1, (args, proc.stderr[-2000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], (args, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])
    assert not fresh.exists()


def _cascade_with_tiny_clip(truncate_prompts: bool):
  """A Cascade holding only what tokenizing reads: the tiny CLIP's config (32 byte tokens) and
  tokenizer, and the --truncate_prompts setting (no checkpoint is loaded)."""
  cascade = object.__new__(sample_lib.Cascade)
  config = clip_config.get_config("tiny")
  cascade.clip = types.SimpleNamespace(config=config)
  cascade.tokenizer = tokenizers.make_tokenizer(config.data.tokenizer)
  cascade.truncate_prompts, cascade._warned_truncation = truncate_prompts, False
  return cascade


def test_truncate_prompts_cuts_long_prompts_with_one_warning(capsys):
  """--truncate_prompts: prompts over the text encoder's context are cut to it (end token kept)
  with one warning line for the whole run; without it, an error names the prompt and its length."""
  long_prompt = "a red circle moving left across a long and winding road"  # 55 bytes: 57 tokens
  prompts = ["a red circle", long_prompt]
  cascade = _cascade_with_tiny_clip(truncate_prompts=True)
  for _ in range(2):  # said once, not per batch
    ids, mask = cascade.tokenize(prompts)
  err = capsys.readouterr().err
  assert err.count("warning") == 1 and "1 of 2 prompts cut to the text encoder's 32 tokens" in err
  assert ids.shape == (2, 32) and bool(mask[1].all()) and int(mask[0].sum()) == 14
  tokenizer = cascade.tokenizer
  assert list(ids[1]) == tokenizer.encode(long_prompt)[:31] + [tokenizer.eos_id]

  cascade = _cascade_with_tiny_clip(truncate_prompts=False)
  with pytest.raises(errors.UserError) as e:
    cascade.tokenize(prompts)
  message = str(e.value)
  assert "prompt 2 ('a red circle moving left across a long and winding road') is 57 tokens" in (
    message
  )
  assert "context of 32" in message and "pass --truncate_prompts" in message
  assert "warning" not in capsys.readouterr().err


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


@pytest.mark.long
def test_evaluate_motion_cli_writes_rows_per_stage_and_keeps_results(tmp_path):
  out = tmp_path / "motion"
  args = [sys.executable, "-m", "mav_jax.evaluate", "--protocol=motion", f"--output={out}"]
  args += ["--until=decoder", "--steps=2", "--per_combination=1", "--guidance=decoder=2"]
  proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((out / "results.json").read_text())
  rows = result["rows"]
  # The sampling overrides are recorded with the results.
  assert (result["setup"]["steps"], result["setup"]["guidance"]) == ("2", "decoder=2")
  # Every stage's rows: tests/test_eval.py runs the whole chain on a stand-in cascade.
  assert [(r["stage"], r["kind"]) for r in rows] == [
    ("decoder", "generated"),
    ("decoder", "ground truth"),
  ]
  assert all(r["clips"] == 60 and (r["frames"], r["resolution"]) == (4, 16) for r in rows)
  assert rows[1]["direction_accuracy"] == 1.0 and rows[1]["colour_accuracy"] == 1.0
  assert "| decoder | generated | 4 | 16 | 60 |" in proc.stdout
  assert (out / "stage_decoder.gif").exists()
  before = (out / "results.json").read_bytes()
  again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert again.returncode == 1 and "--overwrite" in again.stderr
  assert (out / "results.json").read_bytes() == before


@pytest.mark.long
def test_evaluate_msrvtt_protocol_cli_with_converted_inception(tmp_path):
  """The MSR-VTT protocol from the command line: captions file, real video folder, FID through a
  pytorch-fid Inception .pth (random weights, made by the reference in tests/reference) and
  CLIPSIM through the cascade's CLIP. The metrics' values are tested in test_protocols.py."""
  from mav_jax.data import synthetic
  from mav_jax.eval import motion_benchmark

  if not os.path.isdir(os.path.join(REPO, ".ref_pkgs", "pytorch_fid")):
    pytest.skip("the reference is not installed: make test installs requirements-ref.txt")
  env = dict(os.environ, PYTHONPATH=os.path.join(REPO, ".ref_pkgs"))
  script = os.path.join(REPO, "tests", "reference", "pytorch_fid_outputs.py")
  made = subprocess.run([sys.executable, script, str(tmp_path)], env=env, capture_output=True)
  assert made.returncode == 0, made.stderr[-2000:]
  combos = [("circle", "red", "left"), ("square", "blue", "up")]
  (tmp_path / "captions.txt").write_text("\n".join(synthetic.video_caption(*c) for c in combos))
  for i, clip in enumerate(motion_benchmark.ground_truth(combos, 12, 16, 24.0, 1.5)):
    video_io.write_video(str(tmp_path / "real" / f"{i}.mp4"), clip, fps=24.0)
  out = tmp_path / "eval"
  args = [sys.executable, "-m", "mav_jax.evaluate", "--config=configs/eval/msrvtt.py"]
  args += [
    f"--config.captions={tmp_path / 'captions.txt'}",
    f"--config.real_videos={tmp_path}/real",
  ]
  args += [f"--config.inception={tmp_path / 'pt_inception.pth'}", "--config.until=decoder"]
  args += ["--config.batch_size=2", "--steps=2", f"--output={out}"]
  proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((out / "results.json").read_text())
  assert set(result["metrics"]) == {"fid", "clipsim"}
  assert result["metrics"]["fid"] > 0 and -1 <= result["metrics"]["clipsim"] <= 1
  assert (result["setup"]["frames"], result["setup"]["size"], result["setup"]["videos"]) == (
    4,
    16,
    2,
  )
  assert "real side: 2 videos as 4 frames" in proc.stderr
  for name in ("results.md", "preview.gif", "gen_fid.npz", "real_fid.npz"):
    assert (out / name).exists(), name
  # One job of 2 processes: each makes its share of the videos; their features merge into the same
  # statistics, written once.
  two = _two_processes("mav_jax.evaluate", *args[3:-1], f"--output={tmp_path / 'eval2'}")
  assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
  merged = json.loads((tmp_path / "eval2" / "results.json").read_text())
  assert merged["setup"]["processes"] == 2 and merged["setup"]["videos"] == 2
  for name, value in result["metrics"].items():
    assert merged["metrics"][name] == pytest.approx(value, rel=1e-3, abs=1e-4), name
  # Kept results, and bad input named before any model loads: both exit 1 at once.
  again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert again.returncode == 1 and "--overwrite" in again.stderr
  args[4] = f"--config.captions={tmp_path / 'missing.txt'}"
  missing = subprocess.run(args + ["--overwrite"], cwd=REPO, capture_output=True, text=True)
  assert missing.returncode == 1 and "missing.txt' does not exist" in missing.stderr


def _two_processes(module, *args, timeout=600):
  """`module` with `args` as one job of 2 processes x 2 CPU devices (launch/local.py)."""
  command = [sys.executable, "launch/local.py", "--num_processes=2", "--cpu_devices=2"]
  command += [f"--module={module}", "--", *args]
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.long
def test_prompts_file_in_batches_on_two_processes_writes_what_one_process_writes(tmp_path):
  """A prompts file of 5 captions, --batch_size 4 (the last batch padded): 2 processes write each
  video once, under the names 1 process uses, with the same frames (same seed)."""
  prompts = tmp_path / "prompts.txt"
  prompts.write_text(
    "a red circle moving left\na blue square moving up\na green circle\n"
    "a red square moving down\na blue circle moving right\n"
  )
  args = [f"--prompts_file={prompts}", "--until=decoder", "--steps=2", "--batch_size=4"]
  args += ["--contact_sheet=false"]
  one = _sample(*args, f"--output={tmp_path / 'one' / 'v.mp4'}")
  assert one.returncode == 0, one.stderr[-3000:]
  two = _two_processes("mav_jax.sample", *args, f"--output={tmp_path / 'two' / 'v.mp4'}")
  assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
  names = [f"v_{i:03d}.mp4" for i in range(5)]
  assert sorted(os.listdir(tmp_path / "one")) == sorted(os.listdir(tmp_path / "two")) == names
  # Each video written once, by the process holding its row (rows 0-1, 4 on process 0).
  wrote = [line for line in two.stdout.splitlines() if "[sample] wrote" in line]
  assert len(wrote) == 5 and sum(line.startswith("[process 1]") for line in wrote) == 2, wrote
  assert "2 process(es)" in two.stdout
  for name in names:
    a, b = (np.asarray(_frames(str(tmp_path / d / name)), np.float32) for d in ("one", "two"))
    assert a.shape == b.shape and np.abs(a - b).mean() < 1.0, (name, np.abs(a - b).mean())
