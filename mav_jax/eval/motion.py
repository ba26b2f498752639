"""Pixel measurements for the synthetic motion benchmark: what a generated clip shows, from its
frames alone.

The synthetic world draws one flat-coloured shape on a known dark background, so a generated clip
can be read back without a learned model:
  object:     pixels further than `threshold` (RGB distance, 0-255) from the background; each
              pixel's coverage is its distance over the object's core distance (90th percentile),
              clipped to [0, 1], so anti-aliased edges count in part.
  colour:     the palette colour nearest to the mean colour of the core pixels (coverage > 0.8).
  shape:      per frame, the triangle (apex up) has its mass below the middle of its extent
              (centroid offset > 0.04 of the height; ~0.15 when sharp, 0 for the symmetric
              shapes); otherwise the fill ratio area / (width x height) separates the square (1)
              from the circle (pi/4). The most common answer over frames wins.
  direction:  the least-squares slope of the object's centroid over time (frame widths per clip);
              the larger axis and its sign give left/right/up/down; under `min_travel` it is
              "none" (a static clip is wrong for every caption).
  temporal consistency: the coefficient of variation of the object's area over frames (size) and
              the mean frame-to-frame change of its mean colour (0-1 RGB units).

`measure_clip` returns these for one clip; `score` compares them with the caption's attributes.
Each measure's own accuracy on rendered ground truth is a ceiling that the benchmark reports beside
the generated rows (small objects at 16x16 are a few pixels wide, where a triangle is hard to tell).
"""

import dataclasses

import numpy as np

from mav_jax import errors
from mav_jax.data import synthetic

_PALETTE_NAMES = tuple(synthetic.COLOURS)
_PALETTE = np.asarray([synthetic.COLOURS[c] for c in _PALETTE_NAMES], np.float64)


@dataclasses.dataclass(frozen=True)
class ClipMeasure:
  """What one clip shows.

  Attributes:
    colour: nearest palette colour name ("none" if no object was found).
    shape: "circle", "square", "triangle" or "none".
    direction: "left", "right", "up", "down" or "none".
    travel: centroid displacement over the clip, frame widths (x, y).
    size_variation: std / mean of the object's area over frames (0 = constant size).
    colour_change: mean frame-to-frame change of the object's mean colour, RGB in [0, 1].
    visible_fraction: fraction of frames where an object was found.
  """

  colour: str
  shape: str
  direction: str
  travel: tuple[float, float]
  size_variation: float
  colour_change: float
  visible_fraction: float


def coverage(frames: np.ndarray, threshold: float = 60.0) -> np.ndarray:
  """Float [t, h, w] in [0, 1]: how much of each pixel the object covers (0 = background)."""
  distance = np.linalg.norm(frames.astype(np.float64) - np.asarray(synthetic.BACKGROUND), axis=-1)
  found = distance > threshold
  if not found.any():
    return np.zeros(distance.shape)
  core = np.percentile(distance[found], 90)
  return np.where(found, np.clip(distance / core, 0.0, 1.0), 0.0)


def _shape(cover: np.ndarray) -> str | None:
  if np.count_nonzero(cover) < 3:
    return None
  rows, cols = cover.max(axis=1), cover.max(axis=0)
  height, width = rows.sum(), cols.sum()
  y = np.arange(len(rows)) + 0.5
  offset = ((cover.sum(axis=1) * y).sum() / cover.sum() - (rows * y).sum() / height) / height
  if offset > 0.04:
    return "triangle"
  return "square" if cover.sum() / (height * width) > 0.93 else "circle"


def measure_clip(
  frames: np.ndarray, threshold: float = 60.0, min_travel: float = 0.05
) -> ClipMeasure:
  """Measures one clip of uint8 frames [t, h, w, 3] (any resolution)."""
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise errors.UserError(f"frames must be [time, height, width, 3], got shape {frames.shape}")
  t, h, w, _ = frames.shape
  cover = coverage(frames, threshold)
  areas = cover.sum(axis=(1, 2))
  visible = areas > 0
  if not visible.any():
    return ClipMeasure("none", "none", "none", (0.0, 0.0), 0.0, 0.0, 0.0)
  pixels = frames.astype(np.float64)
  core = cover > 0.8
  mean_colour = pixels[core].mean(axis=0) if core.any() else pixels[cover > 0].mean(axis=0)
  colour = _PALETTE_NAMES[int(np.argmin(np.linalg.norm(_PALETTE - mean_colour, axis=-1)))]
  shapes = [s for s in (_shape(cover[i]) for i in range(t)) if s is not None]
  shape = max(sorted(set(shapes)), key=shapes.count) if shapes else "none"
  seen = np.nonzero(visible)[0]
  weights = cover[seen] / areas[seen, None, None]
  cx = np.einsum("thw,w->t", weights, (np.arange(w) + 0.5) / w)
  cy = np.einsum("thw,h->t", weights, (np.arange(h) + 0.5) / h)
  if len(seen) >= 2:
    # Slope per frame times the clip's span: the displacement of the best straight path.
    span = t - 1
    travel = (
      float(np.polyfit(seen, cx, 1)[0] * span),
      float(np.polyfit(seen, cy, 1)[0] * span),
    )
  else:
    travel = (0.0, 0.0)
  if max(abs(travel[0]), abs(travel[1])) < min_travel:
    direction = "none"
  elif abs(travel[0]) >= abs(travel[1]):
    direction = "right" if travel[0] > 0 else "left"
  else:
    direction = "down" if travel[1] > 0 else "up"
  colours = np.stack([pixels[i][cover[i] > 0].mean(axis=0) for i in seen])
  change = np.linalg.norm(np.diff(colours, axis=0), axis=-1).mean() / 255 if len(seen) > 1 else 0
  return ClipMeasure(
    colour,
    shape,
    direction,
    travel,
    float(areas[seen].std() / areas[seen].mean()),
    float(change),
    float(visible.mean()),
  )


def score(measures: list[ClipMeasure], captions: list[tuple[str, str, str]]) -> dict[str, float]:
  """Accuracies against (shape, colour, direction) per clip, and mean consistency figures."""
  if len(measures) != len(captions) or not measures:
    raise errors.UserError(
      f"need one caption per measured clip, got {len(measures)} and {len(captions)}"
    )
  n = len(measures)
  pairs = list(zip(measures, captions, strict=True))
  return {
    "clips": n,
    "colour_accuracy": sum(m.colour == c[1] for m, c in pairs) / n,
    "shape_accuracy": sum(m.shape == c[0] for m, c in pairs) / n,
    "direction_accuracy": sum(m.direction == c[2] for m, c in pairs) / n,
    "all_correct": sum((m.shape, m.colour, m.direction) == tuple(c) for m, c in pairs) / n,
    "size_variation": float(np.mean([m.size_variation for m in measures])),
    "colour_change": float(np.mean([m.colour_change for m in measures])),
    "visible_fraction": float(np.mean([m.visible_fraction for m in measures])),
  }
