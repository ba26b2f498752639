"""Grain input pipelines for video-text clips and image-text pairs, per host, checkpointable.

  source (synthetic scenes, `prepare`'s ArrayRecord shards, or a TFDS dataset via tfds.data_source)
    -> shuffle(seed) -> repeat (reshuffled every epoch; the same permutation on every host)
    -> this host's positions [process_index::process_count]   (hosts read disjoint records)
    -> random_map(make example)  (decode, random fps or frame skip, crop, tokenise; per-example RNG)
    -> to_iter_dataset (threads) -> [mp_prefetch (worker processes)]
    -> skip undecodable examples, counting them -> batch(per-host batch) -> prefetch

The iterator is a `grain.DatasetIterator`: `get_state()` / `set_state()` (or Grain's Orbax
handler) restore it exactly, so a resumed run sees the batches an uninterrupted run would have.
`global_batch` assembles each host's batch into global `jax.Array`s on the mesh.
"""

import dataclasses
from typing import Any

import grain
import jax
import numpy as np

from mav_jax import errors
from mav_jax.data import records, synthetic, tokenizers, video

Example = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Skipped:
  """Placeholder for an example that could not be made (an undecodable video, a corrupt record)."""

  name: str
  reason: str


@dataclasses.dataclass(frozen=True)
class ClipSpec:
  """What one example looks like.

  Attributes:
    kind: "video" (clips) or "image" (single frames, captions without motion).
    num_frames: frames per clip (1 for images).
    resolution: height and width.
    fps_min, fps_max, fps_alpha, fps_beta: the clip fps is fps_min + (fps_max - fps_min) * Beta.
    frame_skip: > 0 takes every `frame_skip`-th source frame instead of a random fps.
    frame_masks: add a random interpolation / extrapolation mask per clip ("frame_mask") and the
      spacing of its given frames ("mask_skip").
    mask_max_skip: largest interpolation skip of the random masks.
    mask_max_context: most given frames of an extrapolation mask.
    random_crop: random rather than centre crops of real data.
    max_tokens: caption length after tokenisation.
  """

  kind: str = "video"
  num_frames: int = 16
  resolution: int = 64
  fps_min: float = 1.0
  fps_max: float = 30.0
  fps_alpha: float = 1.0
  fps_beta: float = 1.0
  frame_skip: int = 0
  frame_masks: bool = False
  mask_max_skip: int = 4
  mask_max_context: int = 4
  random_crop: bool = False
  max_tokens: int = 32

  @property
  def synthetic_duration(self) -> float:
    """Seconds of motion a synthetic scene needs so its slowest clip fits inside the frame."""
    slowest = self.fps_max / self.frame_skip if self.frame_skip else self.fps_min
    return max(self.num_frames - 1, 1) / min(self.fps_min, slowest)


class MakeExample:
  """Turns a source record into a training example (picklable, for worker processes)."""

  def __init__(self, spec: ClipSpec, tokenizer: tokenizers.Tokenizer):
    self.spec, self.tokenizer = spec, tokenizer

  def __call__(self, record, rng: np.random.Generator) -> Example | Skipped:
    spec = self.spec
    name = "?"
    try:
      if isinstance(record, dict) and "scene" in record:
        name = f"synthetic-{record['index']}"
        frames, fps, caption = self._synthetic(record, rng)
      else:
        if isinstance(record, dict):  # read from TFDS (TfdsSource)
          name = str(record.get("id", "?"))
          if record.get("kind") == "video" and isinstance(record.get("video"), bytes):
            if not {"frames", "fps"} <= record.keys():  # a dataset without them: probe the file
              record = {**video.probe(record["video"]), **record}
          record = records.check_record(record)
        else:
          record = records.decode_record(record)
        name = str(record.get("id", "?"))
        frames, fps, caption = self._decoded(record, rng)
    except (records.CorruptRecord, video.UnreadableVideo, ValueError, OSError) as e:
      return Skipped(name, str(e))
    ids, mask = tokenizers.tokenize_batch(self.tokenizer, [caption], spec.max_tokens)
    example = {"frames": frames, "tokens": ids[0], "token_mask": mask[0]}
    # Unlabelled clips (empty caption) still train the video stages; text-aware temporal layers
    # (model.text_motion) skip their caption for them.
    example["has_caption"] = np.bool_(bool(caption.strip()))
    if spec.kind == "video":
      example["fps"] = np.float32(fps)
      if spec.frame_skip:
        example["frame_skip"] = np.int32(spec.frame_skip)
      if spec.frame_masks:
        mask, skip = video.random_frame_mask(
          rng, spec.num_frames, spec.mask_max_skip, spec.mask_max_context
        )
        example["frame_mask"], example["mask_skip"] = mask, np.float32(skip)
    return example

  def _synthetic(self, record, rng):
    spec, scene = self.spec, record["scene"]
    if spec.kind == "image":
      times = np.array([rng.uniform(0.0, scene.duration)])
      return synthetic.render(scene, times, spec.resolution), 0.0, scene.image_caption
    if spec.frame_skip:
      fps = spec.fps_max / spec.frame_skip  # the skip is counted in frames of the fastest rate
    else:
      fps = video.sample_fps(rng, spec.fps_min, spec.fps_max, spec.fps_alpha, spec.fps_beta)
    times = synthetic.clip_times(scene, fps, spec.num_frames, rng)
    return synthetic.render(scene, times, spec.resolution), fps, scene.video_caption

  def _decoded(self, record, rng):
    spec = self.spec
    crop_rng = rng if spec.random_crop else None
    if record["kind"] == "image":
      if spec.kind != "image":
        raise errors.UserError("an image record in a video pipeline: prepare videos with `videos`")
      frames = _frames_of(record["image"][None]) if _decoded(record["image"]) else None
      if frames is None:
        frames = video.decode(record["image"], max_frames=1)[0]
      return video.resize_and_crop(frames, spec.resolution, crop_rng), 0.0, record["caption"]
    # Frames are chosen by their timestamps (seconds from the first frame). `span` (the first to
    # the last frame's timestamp) comes from `prepare`; records written before it was stored
    # assume evenly spaced frames, (frames - 1) / fps.
    num_source, source_fps = int(record["frames"]), float(record["fps"]) or 30.0
    span = record.get("span")
    if isinstance(span, bool) or not isinstance(span, (int, float)) or not span >= 0:
      span = max(num_source - 1, 0) / source_fps
    span = float(span)
    if spec.kind == "image":  # the frame on screen at a random time
      times, fps = np.array([rng.uniform(0.0, span)]), 0.0
    elif spec.frame_skip:  # every frame_skip-th frame of the average frame rate, in real time
      fps = source_fps / spec.frame_skip
      times, _ = video.clip_times(span, fps, spec.num_frames, rng, fit=False)
    else:
      target = video.sample_fps(rng, spec.fps_min, spec.fps_max, spec.fps_alpha, spec.fps_beta)
      times, fps = video.clip_times(span, target, spec.num_frames, rng)
    if _decoded(record["video"]):  # decoded frames (a TFDS Video feature), evenly spaced
      all_frames = _frames_of(record["video"])
      indices = video.indices_at_times(np.arange(len(all_frames)) / source_fps, times)
      frames = all_frames[indices]
    else:
      frames, _ = video.decode_at_times(record["video"], times)
    return video.resize_and_crop(frames, spec.resolution, crop_rng), fps, record["caption"]


def _decoded(media) -> bool:
  return isinstance(media, np.ndarray) and media.ndim > 0


def _frames_of(array: np.ndarray) -> np.ndarray:
  """uint8 [n, h, w, 3] from decoded frames [n, h, w, c] (grey repeated, alpha dropped)."""
  if array.ndim != 4 or array.shape[-1] not in (1, 3, 4) or len(array) < 1:
    raise ValueError(f"decoded frames of shape {array.shape}: expected [n, h, w, 1, 3 or 4]")
  array = np.asarray(array, np.uint8)
  return np.repeat(array, 3, -1) if array.shape[-1] == 1 else array[..., :3]


@dataclasses.dataclass
class PipelineStats:
  """Counts of examples made and skipped by one host's pipeline (restored with its state)."""

  valid: int = 0
  skipped: int = 0
  last_skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)


class _SkipInvalidIterator(grain.DatasetIterator):
  def __init__(self, parent, stats: PipelineStats, max_consecutive: int):
    super().__init__(parent)
    self._counts, self._max_consecutive = stats, max_consecutive

  def __next__(self):
    consecutive = 0
    while True:
      try:
        element = next(self._parent)
      except StopIteration:
        if self._counts.valid == 0 and self._counts.skipped:
          raise RuntimeError(self._all_bad_message()) from None
        raise
      if not isinstance(element, Skipped):
        self._counts.valid += 1
        return element
      self._counts.skipped += 1
      self._counts.last_skipped = (self._counts.last_skipped + [(element.name, element.reason)])[
        -5:
      ]
      consecutive += 1
      if consecutive >= self._max_consecutive:
        raise RuntimeError(self._all_bad_message())

  def _all_bad_message(self) -> str:
    return (
      f"the input pipeline could not make a single example from the last {self._counts.skipped} "
      f"records (all undecodable or corrupt); e.g. {self._counts.last_skipped}. Check the dataset "
      f"(re-run `python -m mav_jax.data.prepare`)"
    )

  def get_state(self):
    return {
      "parent": self._parent.get_state(),
      "valid": self._counts.valid,
      "skipped": self._counts.skipped,
    }

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._counts.valid, self._counts.skipped = state["valid"], state["skipped"]


class SkipInvalid(grain.IterDataset):
  """Drops `Skipped` placeholders, counting them in `stats`; fails if nothing is decodable."""

  def __init__(self, parent: grain.IterDataset, stats: PipelineStats, max_consecutive: int = 1000):
    super().__init__(parent)
    self._counts, self._max_consecutive = stats, max_consecutive

  def __iter__(self):
    return _SkipInvalidIterator(self._parent.__iter__(), self._counts, self._max_consecutive)


def make_source(data_config, split: str, spec: ClipSpec):
  """The random-access source named by the config: "synthetic", a prepared dataset folder, or a
  TFDS dataset, "tfds:NAME[/CONFIG][:SPLIT]" (in data.tfds_data_dir)."""
  if data_config.source == "synthetic":
    count = data_config.num_train if split == "train" else data_config.num_eval
    return synthetic.SyntheticSource(split, count, spec.synthetic_duration, data_config.seed)
  folder = data_config.source if split == "train" else data_config.get("eval_source", "")
  if not folder:
    raise errors.UserError(
      f"no {split} data: set data.eval_source to a prepared dataset folder or a tfds: source"
    )
  if folder.startswith("tfds:"):
    from mav_jax.data import tfds_datasets  # imports TensorFlow Datasets: only when asked for

    return tfds_datasets.TfdsSource(
      folder,
      spec.kind,
      data_config.get("tfds_data_dir", ""),
      data_config.get("tfds_fps", 0.0),
    )
  return records.array_record_source(folder)


def make_pipeline(
  source,
  make_example: MakeExample,
  *,
  batch_size: int,
  seed: int = 0,
  shuffle: bool = True,
  num_epochs: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  num_threads: int = 2,
  worker_count: int = 0,
  drop_remainder: bool = True,
) -> tuple[grain.IterDataset, PipelineStats]:
  """This host's batched pipeline over `source`, and the stats object its iterator updates.

  Args:
    source: a random-access source (`SyntheticSource` or an ArrayRecord source).
    make_example: the per-record transform.
    batch_size: examples per batch on this host.
    seed: shuffling and per-example randomness (fps, crops, masks).
    shuffle: shuffle records (reshuffled each epoch).
    num_epochs: None repeats forever.
    process_index, process_count: this host and the number of hosts (default: from JAX).
    num_threads: threads reading and transforming records.
    worker_count: > 0 moves the transforms to that many worker processes (`mp_prefetch`).
    drop_remainder: drop a last partial batch (a finite pipeline).
  """
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise errors.UserError(f"process_index {index} out of range for process_count {count}")
  if len(source) < count:
    raise errors.UserError(f"{len(source)} records cannot be split over {count} hosts")
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)  # one global permutation (the same on every host) ...
  ds = ds.repeat(num_epochs)
  ds = ds[index::count]  # ... of which each host takes every count-th position: disjoint shards
  # Each host draws its own per-example randomness (fps, crops) from its own stream.
  ds = ds.random_map(make_example, seed=seed * 1_000_003 + index)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=8))
  if worker_count > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  stats = PipelineStats()
  it = SkipInvalid(it, stats)
  return it.batch(batch_size, drop_remainder=drop_remainder), stats


def global_batch(
  local: dict[str, np.ndarray],
  mesh: jax.sharding.Mesh,
  batch_axes: tuple[str, ...] | str | None = None,
) -> dict[str, jax.Array]:
  """Assembles every host's batch into global arrays whose leading axis is split over `batch_axes`.

  Args:
    local: this host's batch (numeric arrays with the per-host batch leading).
    mesh: the device mesh.
    batch_axes: mesh axes the batch is split over; default: all of them.
  """
  axes = tuple(mesh.axis_names) if batch_axes is None else batch_axes
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes))
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
  }


def spec_from_config(data_config) -> ClipSpec:
  """The ClipSpec of a config's `data` section."""
  d = data_config
  return ClipSpec(
    kind=d.kind,
    num_frames=d.num_frames if d.kind == "video" else 1,
    resolution=d.resolution,
    fps_min=d.fps_min,
    fps_max=d.fps_max,
    fps_alpha=d.fps_alpha,
    fps_beta=d.fps_beta,
    frame_skip=d.frame_skip,
    frame_masks=d.frame_masks,
    mask_max_skip=d.mask_max_skip,
    mask_max_context=d.mask_max_context,
    random_crop=d.random_crop,
    max_tokens=d.max_tokens,
  )


def pipeline_from_config(
  data_config, split: str, batch_size: int, **kwargs
) -> tuple[grain.IterDataset, PipelineStats]:
  """This host's pipeline for `split` ("train" or "eval") as the config describes it.

  Training data is shuffled and repeats forever; evaluation data is read once, in order.
  `kwargs` go to `make_pipeline` (e.g. process_index / process_count in tests).
  """
  spec = spec_from_config(data_config)
  tokenizer = tokenizers.make_tokenizer(data_config.tokenizer, data_config.tokenizer_path or None)
  train = split == "train"
  options = dict(
    seed=data_config.seed,
    shuffle=train,
    num_epochs=None if train else 1,
    drop_remainder=train,
    num_threads=data_config.num_threads,
    worker_count=data_config.worker_count,
  )
  options.update(kwargs)
  source = make_source(data_config, split, spec)
  return make_pipeline(source, MakeExample(spec, tokenizer), batch_size=batch_size, **options)
