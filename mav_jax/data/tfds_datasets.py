r"""TFDS datasets: builders for the two layouts `prepare` reads, and the `tfds:` data source.

Builders (`tfds.core.GeneratorBasedBuilder`, written as ArrayRecord and read back with
`tfds.data_source`, the random access Grain needs):
  mav_video_text: a folder of videos + a WebVid-style captions CSV (columns videoid,name[,page_dir])
  mav_image_text: a folder of images + a captions CSV (columns image,caption)

The manual folder holds the files (videos also in their <page_dir>/ subfolders, as WebVid's
downloader writes them) and one captions CSV per split, named <split>.csv (train.csv,
validation.csv, ...). Build with

  python -m mav_jax.data.prepare videos --videos DIR --captions results.csv --output OUT \
      --format tfds [--split train] [--name CONFIG]

(one CSV, one split), or with `builder.download_and_prepare(download_config=
tfds.download.DownloadConfig(manual_dir=DIR))`, which is what `tfds build --imports
mav_jax.data.tfds_datasets mav_video_text --manual_dir DIR --file_format array_record` runs; TFDS
4.9.10's `tfds` command itself needs apache-beam installed (its CLI imports Beam at start-up).

Files are checked as `prepare` checks them (the same code); unreadable and missing ones are skipped
and listed per split in the dataset's metadata.json. Videos and images stay encoded (bytes as found),
as in `prepare`'s own records: decoding happens in the input pipeline.

A stage reads any TFDS dataset with the right features via `data.source = "tfds:NAME[/CONFIG][:SPLIT]"`
(and `data.tfds_data_dir`); see `TfdsSource` for the features it needs.
"""

import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from mav_jax import errors
from mav_jax.data import prepare

FILE_FORMAT = "array_record"

_MANUAL = """\
Put the {what} in one folder (videos may sit in <page_dir>/ subfolders, as WebVid's downloader
writes them) with one captions CSV per split named <split>.csv ({columns}), and pass the folder as
--manual_dir (tfds build) or build with `python -m mav_jax.data.prepare {sub} --format tfds`.
"""

_VIDEO_FEATURES = {
  "id": tfds.features.Text(),
  "caption": tfds.features.Text(),
  "video": tfds.features.Tensor(shape=(), dtype=np.object_),  # the encoded file, as found
  "fps": np.float32,  # frames / duration: the average real frame rate
  "frames": np.int32,  # frames counted from the packets
  "span": np.float32,  # seconds from the first frame's timestamp to the last's
  "duration": np.float32,
  "height": np.int32,
  "width": np.int32,
}
_IMAGE_FEATURES = {
  "id": tfds.features.Text(),
  "caption": tfds.features.Text(),
  "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # the encoded file, as found
  "height": np.int32,
  "width": np.int32,
}


class _CaptionedFiles(tfds.core.GeneratorBasedBuilder):
  """Files + captions CSV(s) -> one split per CSV."""

  KIND = ""
  FEATURES: dict = {}
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: encoded files, captions, probed sizes and times."}

  # TFDS finds a builder's folder (for checksums and README metadata) through `code_path`, whose
  # default imports `importlib_resources`, a package TFDS 4.9.10 declares only for Python < 3.9:
  # name the folder directly.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def __init__(
    self, *, captions: dict[str, str] | None = None, encoding: str = "utf-8", log=None, **kwargs
  ):
    """`captions`: {split: CSV path} instead of the manual folder's <split>.csv files; `encoding`:
    the CSVs' text encoding; `log`: where duplicate-id notes go (default: absl logging)."""
    self._captions, self._encoding, self._log = captions, encoding, log
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      description=self.__doc__,
      features=tfds.features.FeaturesDict(dict(self.FEATURES)),
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    folder = os.fspath(dl_manager.manual_dir)
    captions = self._captions or {
      name[: -len(".csv")]: os.path.join(folder, name)
      for name in sorted(os.listdir(folder))
      if name.endswith(".csv")
    }
    if not captions:
      raise errors.UserFileNotFoundError(
        f"{folder} holds no captions CSV: name one <split>.csv per split, e.g. train.csv"
      )
    return {split: self._generate_examples(folder, path, split) for split, path in captions.items()}

  def _generate_examples(self, folder: str, captions: str, split: str):
    entries, duplicates, make = prepare.captioned_files(self.KIND, folder, captions, self._encoding)
    log = self._log or logging.info
    prepare.log_duplicates(duplicates, log, where="the dataset's metadata.json")
    skipped, written = [], 0
    for key, caption, path in entries:
      if path is None:
        skipped.append({"id": key, "reason": "file not found"})
        continue
      try:
        record = make(key, caption, path)
      except (ValueError, OSError) as e:
        skipped.append({"id": key, "file": os.path.basename(path), "reason": str(e)})
        continue
      written += 1
      yield key, {name: record[name] for name in self.FEATURES}
    if written == 0:
      raise errors.UserError(
        f"no readable {self.KIND} among {len(entries)} captioned entries of {captions}; "
        f"first problems: {skipped[:5]}"
      )
    # Written with the dataset info, once every split is generated.
    self.info.metadata[split] = {
      "count": written,
      "skipped_count": len(skipped),
      "skipped": skipped,
      "duplicate_ids": duplicates,
      "captions": os.path.abspath(captions),
    }


class MavVideoText(_CaptionedFiles):
  """Video-text pairs (WebVid layout): encoded videos, captions, probed frame counts and times."""

  KIND = "video"
  FEATURES = _VIDEO_FEATURES
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL.format(
    what="videos (<videoid>.mp4, .webm, .mkv, ...)", columns="videoid,name", sub="videos"
  )


class MavImageText(_CaptionedFiles):
  """Image-text pairs: encoded images and captions."""

  KIND = "image"
  FEATURES = _IMAGE_FEATURES
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL.format(
    what="images", columns="image,caption (image: a file name in the folder)", sub="images"
  )


BUILDERS = {"video": MavVideoText, "image": MavImageText}


def build(
  kind: str,
  inputs: str,
  captions: str,
  data_dir: str,
  split: str = "train",
  name: str = "",
  encoding: str = "utf-8",
  log=print,
) -> tuple[str, dict]:
  """Builds mav_video_text / mav_image_text[/name] from a folder and one CSV (split `split`) into
  `data_dir` as ArrayRecord -> (the `data.source` value that reads it, the split's metadata)."""
  if not os.path.isdir(inputs):
    raise errors.UserFileNotFoundError(f"input folder not found: {inputs}")
  if not os.path.isfile(captions):
    raise errors.UserFileNotFoundError(f"captions file not found: {captions}")
  cls = BUILDERS[kind]
  kwargs = {"config": tfds.core.BuilderConfig(name=name)} if name else {}
  builder = cls(
    data_dir=data_dir,
    file_format=FILE_FORMAT,
    captions={split: captions},
    encoding=encoding,
    log=log,
    **kwargs,
  )
  if epath.Path(builder.data_path).exists():
    raise errors.UserFileExistsError(
      f"{builder.data_path} already exists; choose another --output or --name, or delete it"
    )
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=inputs))
  source = f"tfds:{builder.name}{'/' + name if name else ''}:{split}"
  return source, dict(builder.info.metadata[split])


# -- reading ---------------------------------------------------------------------------------------


def parse_source(source: str) -> tuple[str, str]:
  """ "tfds:NAME[/CONFIG][:SPLIT]" -> ("NAME[/CONFIG]", SPLIT, "train" when left out). The split
  is everything after the first colon, so TFDS slices work ("train[:90%]"); the newest version in
  the data dir is read."""
  if not source.startswith("tfds:"):
    raise errors.UserError(f"not a TFDS source: {source!r}; expected tfds:NAME[/CONFIG][:SPLIT]")
  name, _, split = source[len("tfds:") :].partition(":")
  if not name:
    raise errors.UserError(f"{source!r} names no dataset; expected tfds:NAME[/CONFIG][:SPLIT]")
  return name, split or "train"


def _expected(kind: str) -> str:
  media = (
    "'video': the encoded file (a scalar string Tensor; 'fps', 'frames', 'span' scalars optional, "
    "probed when absent) or decoded frames (a Video feature / uint8 [T, H, W, 3], with an 'fps' "
    "scalar feature or data.tfds_fps)"
  )
  if kind == "image":
    media = (
      "'image': the encoded file (a scalar string Tensor) or an Image feature (uint8 [H, W, C]); "
      "or a 'video' as video stages read it"
    )
  return (
    f"a {kind} dataset needs {media}, and a caption: 'caption' (Text) or a ClassLabel 'label' "
    f"(its class name is the caption); 'id' (Text) is optional"
  )


def _describe(features) -> str:
  return ", ".join(f"{k}: {type(v).__name__}" for k, v in features.items())


def _layout(features, kind: str, fps: float, source: str) -> dict:
  """How to read a dataset's examples, or one UserError naming the missing feature."""

  def fail(missing: str):
    raise errors.UserError(
      f"{source}: the TFDS dataset has no usable {missing}; {_expected(kind)}. "
      f"Its features: {_describe(features)}"
    )

  def dtype(feature):
    value = getattr(feature, "np_dtype", None)  # a nested FeaturesDict has none
    return None if value is None else np.dtype(value)

  def encoded(feature) -> bool:
    return getattr(feature, "shape", None) == () and dtype(feature) == np.object_

  def frames(feature, rank: int) -> bool:
    shape = getattr(feature, "shape", None)
    return shape is not None and len(shape) == rank and dtype(feature) == np.uint8

  layout = {}
  media = [m for m in (("image", "video") if kind == "image" else ("video",)) if m in features]
  if not media:
    fail("'image' or 'video' feature" if kind == "image" else "'video' feature")
  layout["media"] = media[0]
  feature = features[media[0]]
  if encoded(feature):
    layout["encoded"] = True
  elif frames(feature, 3 if media[0] == "image" else 4):
    layout["encoded"] = False
    if media[0] == "video" and "fps" not in features and not fps > 0:
      fail("'fps' feature (decoded frames need one, or set data.tfds_fps)")
  else:
    fail(f"'{media[0]}' feature ({type(feature).__name__} {getattr(feature, 'shape', '')})")
  if "caption" in features and isinstance(features["caption"], tfds.features.Text):
    layout["caption"] = "caption"
  elif "label" in features and isinstance(features["label"], tfds.features.ClassLabel):
    layout["caption"], layout["names"] = "label", list(features["label"].names)
  else:
    fail("'caption' feature (or ClassLabel 'label')")
  layout["fps"] = fps
  layout["fields"] = [k for k in ("fps", "frames", "span") if k in features]
  return layout


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TfdsSource:
  """A random-access source of mav records (dicts `pipeline.MakeExample` reads) from a TFDS
  dataset, through `tfds.data_source` (ArrayRecord: random access; Grain's per-host shards,
  shuffling and resumable state work as on `prepare`'s folders). Picklable for worker processes.

  Args:
    source: "tfds:NAME[/CONFIG][:SPLIT]".
    kind: "video" or "image" (the examples the stage wants).
    data_dir: the TFDS data dir ("" or None: TFDS's default, $TFDS_DATA_DIR or ~/tensorflow_datasets;
      TFDS reads gs:// paths too).
    fps: frame rate of videos stored as decoded frames without an 'fps' feature (0: refuse them).
  """

  def __init__(self, source: str, kind: str, data_dir: str | None = None, fps: float = 0.0):
    name, split = parse_source(source)
    try:
      builder = tfds.builder(name, data_dir=data_dir or None)
      self._data = builder.as_data_source(split=split)
    except (tfds.core.registered.DatasetNotFoundError, ValueError, KeyError, OSError) as e:
      where = data_dir or "TFDS's default data dir"
      raise errors.UserError(
        f"cannot read tfds:{name}:{split} from {where}: {str(e).splitlines()[0]} (build it with "
        f"`python -m mav_jax.data.prepare ... --format tfds`, and set data.tfds_data_dir)"
      ) from None
    self._source, self._kind = source, kind
    self._layout = _layout(builder.info.features, kind, fps, source)

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, index: int) -> dict:
    example, layout = self._data[index], self._layout
    media = layout["media"]
    if layout["caption"] == "label":
      caption = layout["names"][int(example["label"])]
    else:
      caption = _text(example["caption"])
    record = {
      "kind": media,
      "id": _text(example["id"]) if "id" in example else f"{self._source}#{index}",
      "caption": caption,
      media: example[media] if layout["encoded"] else np.asarray(example[media]),
    }
    if media == "video":
      for key in layout["fields"]:
        record[key] = np.asarray(example[key]).item()
      if not layout["encoded"]:
        record["frames"] = len(record["video"])
        record.setdefault("fps", layout["fps"])
    return record

  def __repr__(self) -> str:
    return f"TfdsSource({self._source!r}, {len(self)} records)"
