"""Video decoding (PyAV), clip sampling at a random fps or a fixed frame skip, resizing, frame masks.

Make-A-Video samples 16-frame clips at a random frame rate per clip (between 1 and 30 fps, from a
beta distribution) and feeds the fps to the model; the interpolation stage masks frames. These are
pure numpy functions of the decoded frames and a `np.random.Generator`, so a Grain `random_map`
makes them deterministic per example.

Clips are time-true: frames are chosen by their presentation timestamps, not by their position in
the stream, so a clip sampled at f fps spans (n - 1) / f seconds of real time for constant- and
variable-frame-rate files alike (web video often has irregular timestamps: an AVI whose header
counts 444 slots at 15 fps may hold 68 frames spread over 29.6 s). The frame chosen for a wanted
time t is the one on screen at t: the last frame whose timestamp is at or before t (within
`TIME_TOLERANCE`, since containers round timestamps, e.g. to milliseconds); times before the first
frame get the first, times after the last get the last. Times are seconds from the first frame.
"""

import io

import av
import numpy as np
from PIL import Image

from mav_jax import errors

MASK_KINDS = ("interpolate", "first", "last")

# A frame whose timestamp is at most this much after a wanted time still counts as "at or before"
# it: Matroska stores milliseconds, so a 30 fps frame k sits at round(k * 33.33) ms, up to 0.5 ms
# after k / 30 s.
TIME_TOLERANCE = 1e-3

_DECODE_ERRORS = (av.FFmpegError, IndexError, StopIteration, ValueError)


class UnreadableVideo(ValueError):
  """A video that PyAV cannot open or that has no decodable frames."""


def _nominal_rate(stream) -> float:
  rate = stream.average_rate or stream.guessed_rate
  return float(rate) if rate else 0.0


class _Clock:
  """Frame times in seconds from the first frame, never going backwards: a frame without a
  timestamp comes one nominal frame (1 / rate, else 1/30 s) after the previous one, and one whose
  timestamp is earlier than the previous frame's gets the previous frame's time."""

  def __init__(self, rate: float):
    self.step, self.origin, self.last = 1.0 / (rate or 30.0), None, None

  def __call__(self, frame) -> float:
    t = frame.time
    if t is None:
      t = 0.0 if self.last is None else self.last + self.step
    elif self.origin is None:
      self.origin = float(t) - (self.last or 0.0)
      t = self.last or 0.0
    else:
      t = float(t) - self.origin
    if self.last is not None:
      t = max(t, self.last)
    self.last = t
    return t


def _frame_times(data: bytes) -> tuple[list[float], float]:
  """(seconds of every decoded frame from the first, nominal rate): decodes the whole stream
  (without colour conversion); for files whose packets lack timestamps."""
  with av.open(io.BytesIO(data)) as container:
    stream = container.streams.video[0]
    rate = _nominal_rate(stream)
    clock = _Clock(rate)
    return [clock(frame) for frame in container.decode(stream)], rate


def probe(data: bytes) -> dict:
  """Frame count, real duration, frame rate and size of an encoded video.

  Decodes only the first frame (to check the video is decodable and read its size); frames are
  counted and timed from the demuxed packets: every non-empty, non-discarded packet of the video
  stream carries one frame, and its presentation timestamp is the frame's. The container's frame
  count is not used: AVI headers count time slots (444 for 68 real frames), Matroska has none. A
  file whose packets lack timestamps is decoded in full instead.

  Returns:
    {"frames": frames counted, "span": seconds from the first frame's timestamp to the last's,
     "duration": span + one frame time (the median positive spacing of the frames; 1 / the
     container's rate for a lone frame, or 0 without one), "fps": frames / duration (the average
     real frame rate; the container's rate when the duration is 0), "height", "width"}.
  """
  try:
    with av.open(io.BytesIO(data)) as container:
      stream = container.streams.video[0]
      rate = _nominal_rate(stream)
      first, stamps, missing = None, [], False
      for packet in container.demux(stream):
        if packet.size == 0 or packet.is_discard:  # the end-of-stream flush packet, skipped slots
          continue
        if first is None:
          first = next(iter(packet.decode()), None)
        pts = packet.pts if packet.pts is not None else packet.dts
        missing |= pts is None
        stamps.append(None if pts is None else float(pts * packet.time_base))
      if first is None:  # decoders with a delay (B-frames) hold frames until flushed
        first = next(iter(stream.decode(None)), None)
      if first is None:
        raise UnreadableVideo("the video has no decodable frames")
      height, width = first.height, first.width
  except _DECODE_ERRORS as e:
    raise UnreadableVideo(f"cannot decode video: {e}") from e
  if missing:
    try:
      stamps, rate = _frame_times(data)
    except _DECODE_ERRORS as e:
      raise UnreadableVideo(f"cannot decode video: {e}") from e
  times = np.sort(np.asarray(stamps, np.float64))
  span = float(times[-1] - times[0]) if len(times) else 0.0
  gaps = np.diff(times)
  gaps = gaps[gaps > 0]
  frame_time = float(np.median(gaps)) if len(gaps) else (1.0 / rate if rate else 0.0)
  duration = span + frame_time
  fps = len(times) / duration if duration > 0 else rate
  return {
    "fps": fps,
    "frames": len(times),
    "span": span,
    "duration": duration,
    "height": height,
    "width": width,
  }


def _decode_timed(data: bytes, max_frames: int | None) -> tuple[np.ndarray, np.ndarray, float]:
  try:
    with av.open(io.BytesIO(data)) as container:
      stream = container.streams.video[0]
      rate = _nominal_rate(stream)
      clock = _Clock(rate)
      frames, times = [], []
      for frame in container.decode(stream):
        times.append(clock(frame))
        frames.append(frame.to_ndarray(format="rgb24"))
        if max_frames is not None and len(frames) >= max_frames:
          break
  except _DECODE_ERRORS as e:
    raise UnreadableVideo(f"cannot decode video: {e}") from e
  if not frames:
    raise UnreadableVideo("the video has no decodable frames")
  return np.stack(frames), np.asarray(times, np.float64), rate


def decode_timed(data: bytes, max_frames: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Decodes up to `max_frames` frames -> (uint8 [n, h, w, 3], float64 [n] seconds from the first
  frame: presentation timestamps, non-decreasing as described in `_Clock`)."""
  return _decode_timed(data, max_frames)[:2]


def decode(data: bytes, max_frames: int | None = None) -> tuple[np.ndarray, float]:
  """Decodes up to `max_frames` frames of an encoded video -> (uint8 [n, h, w, 3], fps).

  The fps is the container's rate when the frames' timestamps agree with it (within 1%), else
  their average real rate (n - 1) / (last - first timestamp): a variable-frame-rate file's frames
  then play at the right speed on average. Callers that need each frame's real time use
  `decode_timed` or `decode_at_times`.
  """
  frames, times, rate = _decode_timed(data, max_frames)
  span = float(times[-1] - times[0])
  if len(times) > 1 and span > 0:
    real = (len(times) - 1) / span
    if not rate or abs(real - rate) > 0.01 * rate:
      rate = real
  return frames, rate or 30.0


def decode_at_times(
  data: bytes, times, tolerance: float = TIME_TOLERANCE
) -> tuple[np.ndarray, np.ndarray]:
  """The frames on screen at `times` (seconds from the first frame) -> (uint8 [len(times), h, w,
  3], float64 [len(times)] the chosen frames' times).

  Streams through the video, converting only the chosen frames to RGB and stopping once past the
  last wanted time; chooses the same frames as `indices_at_times` on `decode_timed`'s times.
  """
  times = np.asarray(times, np.float64).reshape(-1)
  order = np.argsort(times, kind="stable")
  out, chosen = [None] * len(times), np.zeros(len(times))
  j, prev = 0, None

  def take(entry):
    nonlocal j
    if entry[2] is None:
      entry[2] = entry[0].to_ndarray(format="rgb24")
    out[order[j]], chosen[order[j]] = entry[2], entry[1]
    j += 1

  try:
    with av.open(io.BytesIO(data)) as container:
      stream = container.streams.video[0]
      clock = _Clock(_nominal_rate(stream))
      for frame in container.decode(stream):
        t = clock(frame)
        if prev is not None:
          while j < len(times) and times[order[j]] + tolerance < t:
            take(prev)
          if j == len(times):
            break
        prev = [frame, t, None]
      if prev is None:
        raise UnreadableVideo("the video has no decodable frames")
      while j < len(times):
        take(prev)
  except _DECODE_ERRORS as e:
    raise UnreadableVideo(f"cannot decode video: {e}") from e
  if not len(times):
    h, w = prev[0].height, prev[0].width
    return np.zeros((0, h, w, 3), np.uint8), chosen
  return np.stack(out), chosen


def indices_at_times(timestamps, times, tolerance: float = TIME_TOLERANCE) -> np.ndarray:
  """Index of the frame on screen at each wanted time: the last frame whose timestamp is at or
  before it (within `tolerance`), the first frame for earlier times. `timestamps` must be
  non-decreasing (as `decode_timed` returns them)."""
  timestamps = np.asarray(timestamps, np.float64)
  if len(timestamps) < 1:
    raise errors.UserError("the video has no frames")
  idx = np.searchsorted(timestamps, np.asarray(times, np.float64) + tolerance, side="right") - 1
  return np.clip(idx, 0, len(timestamps) - 1)


def sample_fps(
  rng: np.random.Generator, fps_min: float, fps_max: float, alpha: float = 1.0, beta: float = 1.0
) -> float:
  """fps_min + (fps_max - fps_min) * Beta(alpha, beta): the clip's frame rate."""
  if not 0 < fps_min <= fps_max:
    raise errors.UserError(f"need 0 < fps_min <= fps_max, got {fps_min}, {fps_max}")
  return float(fps_min + (fps_max - fps_min) * rng.beta(alpha, beta))


def clip_times(
  span: float,
  fps: float,
  num_frames: int,
  rng: np.random.Generator | None = None,
  fit: bool = True,
) -> tuple[np.ndarray, float]:
  """Wanted times (seconds from the first frame) of a `num_frames` clip at `fps` in a video whose
  last frame is `span` seconds after its first, and the fps actually used.

  A clip at fps spans (num_frames - 1) / fps seconds. With `fit`, a video shorter than that raises
  the fps to the lowest that fits; without, the clip runs past the end (its last frame repeats).
  The start is uniform over the starts that fit when `rng` is given, else 0.
  """
  if not fps > 0:
    raise errors.UserError(f"the clip fps must be positive, got {fps}")
  if not span >= 0:
    raise errors.UserError(f"the video's span must be >= 0 seconds, got {span}")
  if fit and num_frames > 1 and span > 0:
    fps = max(fps, (num_frames - 1) / span)
  length = (num_frames - 1) / fps if num_frames > 1 else 0.0
  start = 0.0 if rng is None else float(rng.uniform(0.0, max(span - length, 0.0)))
  return start + np.arange(num_frames) / fps, float(fps)


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
