"""Video decoding (PyAV), clip sampling at a random fps or a fixed frame skip, resizing, frame masks.

Make-A-Video samples 16-frame clips at a random frame rate per clip (between 1 and 30 fps, from a
beta distribution) and feeds the fps to the model; the interpolation stage masks frames. These are
pure numpy functions of the decoded frames and a `np.random.Generator`, so a Grain `random_map`
makes them deterministic per example.
"""

import io

import av
import numpy as np
from PIL import Image

from mav_jax import errors

MASK_KINDS = ("interpolate", "first", "last")


class UnreadableVideo(ValueError):
  """A video that PyAV cannot open or that has no decodable frames."""


def probe(data: bytes) -> dict:
  """Frame rate, frame count and size of an encoded video, decoding only its first frame."""
  try:
    with av.open(io.BytesIO(data)) as container:
      stream = container.streams.video[0]
      first = next(container.decode(stream))
      rate = stream.average_rate or stream.guessed_rate
      fps = float(rate) if rate else 0.0
      frames = stream.frames
      if not frames:  # Matroska / WebM headers carry no frame count: count the frames instead.
        frames = 1 + sum(1 for _ in container.decode(stream))
      return {"fps": fps, "frames": frames, "height": first.height, "width": first.width}
  except (av.FFmpegError, IndexError, StopIteration, ValueError) as e:
    raise UnreadableVideo(f"cannot decode video: {e}") from e


def decode(data: bytes, max_frames: int | None = None) -> tuple[np.ndarray, float]:
  """Decodes up to `max_frames` frames of an encoded video -> (uint8 [n, h, w, 3], fps)."""
  try:
    with av.open(io.BytesIO(data)) as container:
      stream = container.streams.video[0]
      rate = stream.average_rate or stream.guessed_rate
      frames = []
      for frame in container.decode(stream):
        frames.append(frame.to_ndarray(format="rgb24"))
        if max_frames is not None and len(frames) >= max_frames:
          break
  except (av.FFmpegError, IndexError, ValueError) as e:
    raise UnreadableVideo(f"cannot decode video: {e}") from e
  if not frames:
    raise UnreadableVideo("the video has no decodable frames")
  return np.stack(frames), float(rate) if rate else 30.0


def sample_fps(
  rng: np.random.Generator, fps_min: float, fps_max: float, alpha: float = 1.0, beta: float = 1.0
) -> float:
  """fps_min + (fps_max - fps_min) * Beta(alpha, beta): the clip's frame rate."""
  if not 0 < fps_min <= fps_max:
    raise errors.UserError(f"need 0 < fps_min <= fps_max, got {fps_min}, {fps_max}")
  return float(fps_min + (fps_max - fps_min) * rng.beta(alpha, beta))


def indices_at_fps(
  num_source: int,
  source_fps: float,
  fps: float,
  num_frames: int,
  rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, float]:
  """Source frame indices of a `num_frames` clip at `fps`, and the fps actually used.

  A clip at fps spans (num_frames - 1) / fps seconds. If the video is shorter than that, the fps
  is raised to the lowest that fits; if it exceeds the source fps, frames repeat. The start is
  random when `rng` is given, else the clip starts at frame 0.
  """
  if num_source < 1:
    raise errors.UserError("the video has no frames")
  duration = (num_source - 1) / source_fps
  if num_frames > 1 and duration > 0:
    fps = max(fps, (num_frames - 1) / duration)
  span = (num_frames - 1) / fps if num_frames > 1 else 0.0
  start = 0.0 if rng is None else float(rng.uniform(0.0, max(duration - span, 0.0)))
  times = start + np.arange(num_frames) / fps
  idx = np.clip(np.round(times * source_fps).astype(int), 0, num_source - 1)
  return idx, float(fps)


def indices_with_skip(
  num_source: int, skip: int, num_frames: int, rng: np.random.Generator | None = None
) -> np.ndarray:
  """Source indices start, start + skip, ...: a fixed frame skip (clipped to the video's end)."""
  if skip < 1:
    raise errors.UserError(f"frame skip must be >= 1, got {skip}")
  last_start = max(num_source - 1 - skip * (num_frames - 1), 0)
  start = 0 if rng is None else int(rng.integers(0, last_start + 1))
  return np.minimum(start + skip * np.arange(num_frames), num_source - 1)


def resize_and_crop(
  frames: np.ndarray, resolution: int, rng: np.random.Generator | None = None
) -> np.ndarray:
  """Resizes the shorter side to `resolution` (bilinear) and crops a square (random if rng given)."""
  n, h, w, _ = frames.shape
  scale = resolution / min(h, w)
  nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
  if (nh, nw) != (h, w):
    frames = np.stack(
      [np.asarray(Image.fromarray(f).resize((nw, nh), Image.BILINEAR)) for f in frames]
    )
  top, left = (nh - resolution) // 2, (nw - resolution) // 2
  if rng is not None:
    top, left = int(rng.integers(0, nh - resolution + 1)), int(rng.integers(0, nw - resolution + 1))
  return frames[:, top : top + resolution, left : left + resolution]


def frame_mask(kind: str, num_frames: int, k: int) -> np.ndarray:
  """Boolean [num_frames], True where a frame is given to the interpolation model.

  "interpolate": every k-th frame (0, k, 2k, ...) and the last frame, so every generated frame lies
  between two given ones (with num_frames = (m - 1) k + 1 the last is itself a k-th frame);
  "first" / "last": the first / last k frames (extrapolation forwards / backwards).
  """
  if kind not in MASK_KINDS:
    raise errors.UserError(f"unknown mask kind {kind!r}; choose one of {MASK_KINDS}")
  if k < 1:
    raise errors.UserError(f"k must be >= 1, got {k}")
  mask = np.zeros(num_frames, bool)
  if kind == "interpolate":
    mask[::k] = True
    mask[-1] = True
  elif kind == "first":
    mask[:k] = True
  else:
    mask[-k:] = True
  return mask


def random_frame_mask(
  rng: np.random.Generator, num_frames: int, max_skip: int = 4, max_context: int = 4
) -> tuple[np.ndarray, int]:
  """A mask for training the interpolation stage and the spacing of its given frames.

  Interpolation with a random skip in [2, max_skip] (capped at num_frames - 1: the two end frames),
  or extrapolation keeping the first / last 1..max_context frames (spacing 1).

  Returns:
    (mask [num_frames] bool, skip): skip is the frame distance between given frames, the "frame
    skip" the interpolation model is conditioned on.
  """
  if num_frames < 2:
    raise errors.UserError(f"frame masks need clips of at least 2 frames, got {num_frames}")
  kind = MASK_KINDS[rng.integers(len(MASK_KINDS))]
  if kind == "interpolate":
    skip = int(rng.integers(2, max(2, min(max_skip, num_frames - 1)) + 1))
    return frame_mask(kind, num_frames, skip), skip
  context = int(rng.integers(1, min(max_context, num_frames - 1) + 1))
  return frame_mask(kind, num_frames, context), 1
