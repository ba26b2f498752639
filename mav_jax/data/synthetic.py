"""The embedded default dataset: coloured shapes moving on a dark background, generated on the fly.

Every example is a deterministic function of (split, seed, index), so nothing is downloaded or
stored. A scene is one shape of one colour moving in one direction at constant speed, given in
frame widths per *second*; a clip renders it at any frame rate, so a low fps shows more motion per
frame than a high fps, as in real video. Image-text pairs come from the same world but their
captions name only what one image shows (shape and colour); motion exists only in video captions.

The evaluation split enumerates every (shape, colour, direction) combination in turn, so a
benchmark over it is balanced.
"""

import dataclasses
import itertools

import numpy as np

from mav_jax import errors

SHAPES = ("circle", "square", "triangle")
COLOURS = {
  "red": (230, 40, 40),
  "green": (40, 200, 60),
  "blue": (50, 90, 240),
  "yellow": (240, 220, 40),
  "white": (245, 245, 245),
}
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
BACKGROUND = (14, 14, 22)
COMBINATIONS = tuple(itertools.product(SHAPES, COLOURS, DIRECTIONS))
SPLITS = ("train", "eval")
# Distinct seed streams per split, so the splits never share a scene.
_SPLIT_SALT = {"train": 0x5EED_0001, "eval": 0x5EED_0002}
# Supersampling factor per axis for anti-aliased edges.
_SUPERSAMPLE = 4


def video_caption(shape: str, colour: str, direction: str) -> str:
  """The caption of a clip of this world, e.g. "a red circle moving left"."""
  return f"a {colour} {shape} moving {direction}"


@dataclasses.dataclass(frozen=True)
class Scene:
  """One moving object.

  Attributes:
    shape: one of SHAPES.
    colour: one of COLOURS.
    direction: one of DIRECTIONS.
    size: object diameter as a fraction of the frame width.
    speed: frame widths per second.
    start: (x, y) centre at time 0, fractions of the frame.
    duration: seconds over which the object stays fully inside the frame.
  """

  shape: str
  colour: str
  direction: str
  size: float
  speed: float
  start: tuple[float, float]
  duration: float

  def centre(self, time_s: float) -> tuple[float, float]:
    dx, dy = DIRECTIONS[self.direction]
    return self.start[0] + dx * self.speed * time_s, self.start[1] + dy * self.speed * time_s

  @property
  def video_caption(self) -> str:
    return video_caption(self.shape, self.colour, self.direction)

  @property
  def image_caption(self) -> str:
    return f"a {self.colour} {self.shape}"


def sample_scene(
  rng: np.random.Generator,
  duration: float,
  combination: tuple[str, str, str] | None = None,
  size_range: tuple[float, float] = (0.2, 0.3),
  travel_range: tuple[float, float] = (0.4, 0.7),
) -> Scene:
  """Draws a scene whose object stays inside the frame for `duration` seconds.

  Args:
    rng: the generator (seeded per example by the caller).
    duration: seconds the motion must fit in: (frames - 1) / lowest fps of the clips to render.
    combination: fixed (shape, colour, direction), else drawn uniformly.
    size_range: object size, fraction of the frame.
    travel_range: distance travelled over `duration`, fraction of the frame (clipped to the room).
  """
  if combination is None:
    combination = COMBINATIONS[rng.integers(len(COMBINATIONS))]
  shape, colour, direction = combination
  size = float(rng.uniform(*size_range))
  room = 1.0 - size  # centre positions keeping the object inside: [size/2, 1 - size/2]
  travel = min(float(rng.uniform(*travel_range)), room)
  dx, dy = DIRECTIONS[direction]
  lo = size / 2
  along = lo + float(rng.uniform(0.0, room - travel))  # start of the path, low side
  across = lo + float(rng.uniform(0.0, room))
  if dx:
    start = (along if dx > 0 else 1.0 - along, across)
  else:
    start = (across, along if dy > 0 else 1.0 - along)
  return Scene(shape, colour, direction, size, travel / duration, start, duration)


def _mask(shape: str, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
  dx, dy = xs - cx, ys - cy
  if shape == "circle":
    return dx**2 + dy**2 <= r**2
  if shape == "square":
    return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
  # Upward-pointing equilateral-ish triangle inscribed in the circle of radius r.
  top, bottom = cy - r, cy + 0.6 * r
  half_width = (dy + r) / (1.6 * r) * r  # widens linearly from the apex
  return (ys >= top) & (ys <= bottom) & (np.abs(dx) <= half_width)


def render(scene: Scene, times: np.ndarray, resolution: int) -> np.ndarray:
  """Renders the scene at `times` (seconds) as uint8 frames [len(times), res, res, 3]."""
  n = resolution * _SUPERSAMPLE
  coords = (np.arange(n) + 0.5) / n
  xs, ys = coords[None, :], coords[:, None]
  colour = np.asarray(COLOURS[scene.colour], np.float32)
  background = np.asarray(BACKGROUND, np.float32)
  frames = np.empty((len(times), resolution, resolution, 3), np.uint8)
  for i, time_s in enumerate(times):
    cx, cy = scene.centre(float(time_s))
    cover = _mask(scene.shape, xs, ys, cx, cy, scene.size / 2).astype(np.float32)
    cover = cover.reshape(resolution, _SUPERSAMPLE, resolution, _SUPERSAMPLE).mean(axis=(1, 3))
    frame = background + cover[..., None] * (colour - background)
    frames[i] = np.clip(np.round(frame), 0, 255).astype(np.uint8)
  return frames


def clip_times(
  scene: Scene, fps: float, num_frames: int, rng: np.random.Generator | None = None
) -> np.ndarray:
  """Frame times of a clip at `fps`: a window of the motion, placed at random when rng is given."""
  span = (num_frames - 1) / fps
  if span > scene.duration + 1e-6:
    raise errors.UserError(
      f"{num_frames} frames at {fps} fps span {span:.2f}s but the scene lasts {scene.duration:.2f}s;"
      f" raise the scene duration (lower the lowest fps it was made for)"
    )
  offset = 0.0 if rng is None else float(rng.uniform(0.0, scene.duration - span))
  return offset + np.arange(num_frames) / fps


class SyntheticSource:
  """Random-access source of scenes (Grain's RandomAccessDataSource protocol).

  Each record is a dict: the scene's attributes, its index, and both captions. Rendering happens
  later, per clip, at the clip's sampled fps.

  Attributes:
    split: "train" (random scenes) or "eval" (every combination in turn).
    num_examples: number of records.
    duration: seconds of motion that fit in the frame ((frames - 1) / lowest fps).
    seed: dataset seed.
  """

  def __init__(self, split: str, num_examples: int, duration: float, seed: int = 0):
    if split not in SPLITS:
      raise errors.UserError(f"unknown split {split!r}; choose one of {SPLITS}")
    if num_examples < 1:
      raise errors.UserError(f"num_examples must be positive, got {num_examples}")
    self.split, self.num_examples, self.duration, self.seed = split, num_examples, duration, seed

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {self.num_examples} examples")
    rng = np.random.default_rng([_SPLIT_SALT[self.split], self.seed, index])
    combination = COMBINATIONS[index % len(COMBINATIONS)] if self.split == "eval" else None
    scene = sample_scene(rng, self.duration, combination)
    return {
      "index": index,
      "scene": scene,
      "video_caption": scene.video_caption,
      "image_caption": scene.image_caption,
    }

  def __repr__(self) -> str:
    return (
      f"SyntheticSource(split={self.split!r}, num_examples={self.num_examples}, seed={self.seed})"
    )
