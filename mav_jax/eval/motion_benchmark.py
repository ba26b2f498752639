"""The synthetic motion benchmark: captions of every (shape, colour, direction) through the cascade,
each stage's output read back by `mav_jax.eval.motion`.

For `per_combination` clips of each of the 60 captions ("a red circle moving left", ...) the cascade
runs prior -> D^t -> ↑F -> SR_l^t -> SR_h as far as its checkpoints go, and every stage's output is
measured: the rows say where colour, shape or direction is lost. A "ground truth" row per stage
renders real scenes of the same captions at that stage's frames, resolution and frame rate and
measures them the same way: the ceiling of the pixel measures at that size.
"""

import time
from collections.abc import Callable

import jax
import numpy as np

from mav_jax import errors
from mav_jax.data import synthetic
from mav_jax.eval import motion

STAGE_ORDER = ("decoder", "interp", "sr_low", "sr_high")


def captions(per_combination: int) -> list[tuple[str, str, str]]:
  """(shape, colour, direction) of every clip: each combination `per_combination` times."""
  if per_combination < 1:
    raise errors.UserError(f"per_combination must be >= 1, got {per_combination}")
  return [c for c in synthetic.COMBINATIONS for _ in range(per_combination)]


def ground_truth(
  combos: list[tuple[str, str, str]],
  num_frames: int,
  resolution: int,
  fps: float,
  duration: float,
  seed: int = 0,
) -> np.ndarray:
  """Rendered clips uint8 [n, f, r, r, 3] of the captions, drawn like the training data: scenes of
  `duration` seconds (the object crosses 40-70% of the frame in it), a random window at `fps`."""
  clips = []
  for i, combo in enumerate(combos):
    rng = np.random.default_rng([seed, i])
    scene = synthetic.sample_scene(rng, duration, combo)
    times = synthetic.clip_times(scene, fps, num_frames, rng)
    clips.append(synthetic.render(scene, times, resolution))
  return np.stack(clips)


def measure(clips: np.ndarray, combos: list[tuple[str, str, str]]) -> dict:
  """Scores uint8 clips [n, f, h, w, 3] against their captions."""
  return motion.score([motion.measure_clip(c) for c in clips], combos)


def run(
  cascade,
  per_combination: int = 2,
  seed: int = 0,
  fps: float | None = None,
  frame_skip: int | None = None,
  batch_size: int = 60,
  log: Callable[[str], None] = print,
) -> tuple[list[dict], dict[str, np.ndarray]]:
  """Runs the benchmark on a loaded `sample_lib.Cascade` (prior and decoder required).

  Args:
    fps: D^t's frame rate (default: its config's sampling fps).
    frame_skip: ↑F's expansion (default: its config's).
    batch_size: clips per cascade call.

  Returns:
    (rows, clips): one row per stage and kind ("generated", "ground truth") with the scores, the
    clips' size and the seconds taken; the generated uint8 clips per stage.
  """
  from mav_jax.utils import video_io

  cascade.require("prior", "decoder")
  combos = captions(per_combination)
  texts = [synthetic.video_caption(*c) for c in combos]
  dc = cascade.stages["decoder"].config
  fps = float(fps or dc.sampling.fps)
  frames = int(dc.data.num_frames)
  if "interp" in cascade.stages:
    skip = int(frame_skip or cascade.stages["interp"].config.sampling.frame_skip)
  else:
    skip = 1
  stages = [s for s in STAGE_ORDER if s in cascade.stages and (s != "interp" or skip > 1)]
  outputs = {s: [] for s in stages}
  seconds = dict.fromkeys(stages, 0.0)
  rng = jax.random.key(seed)
  for start in range(0, len(texts), batch_size):
    batch = texts[start : start + batch_size]
    log(f"[motion] clips {start + 1}-{start + len(batch)} of {len(texts)}")
    rng, prior_rng = jax.random.split(rng)
    tic = time.time()
    embedding = cascade.prior(batch, prior_rng)
    seconds["decoder"] += time.time() - tic
    clip = None
    for name in stages:
      rng, sub = jax.random.split(rng)
      tic = time.time()
      if name == "decoder":
        clip = cascade.decoder(embedding, fps, frames, sub, prompts=batch)
      elif name == "interp":
        clip = cascade.expand(clip, skip, fps, embedding, sub, batch)
      else:
        clip = cascade.super_resolve(name, clip, sub)
      outputs[name].append(video_io.to_uint8(np.asarray(clip)))
      seconds[name] += time.time() - tic
  clips = {name: np.concatenate(parts) for name, parts in outputs.items()}
  rows = []
  for name in stages:
    c = clips[name]
    stage_fps = fps * (skip if STAGE_ORDER.index(name) >= STAGE_ORDER.index("interp") else 1)
    size = {"frames": c.shape[1], "resolution": c.shape[2], "fps": stage_fps}
    # Scenes as long as in D^t's training data: (frames - 1) / its lowest fps.
    duration = (frames - 1) / min(float(dc.data.fps_min), fps)
    truth = ground_truth(combos, c.shape[1], c.shape[2], stage_fps, duration, seed)
    rows.append(
      {"stage": name, "kind": "generated", **size, **measure(c, combos), "seconds": seconds[name]}
    )
    rows.append({"stage": name, "kind": "ground truth", **size, **measure(truth, combos)})
  return rows, clips


COLUMNS = (
  ("stage", "{}"),
  ("kind", "{}"),
  ("frames", "{}"),
  ("resolution", "{}"),
  ("clips", "{}"),
  ("colour_accuracy", "{:.1%}"),
  ("shape_accuracy", "{:.1%}"),
  ("direction_accuracy", "{:.1%}"),
  ("all_correct", "{:.1%}"),
  ("size_variation", "{:.3f}"),
  ("colour_change", "{:.3f}"),
)


def format_table(rows: list[dict]) -> str:
  """A Markdown table of the benchmark rows."""
  header = "| " + " | ".join(c for c, _ in COLUMNS) + " |"
  lines = [header, "|" + "---|" * len(COLUMNS)]
  for r in rows:
    lines.append("| " + " | ".join(fmt.format(r[c]) for c, fmt in COLUMNS) + " |")
  return "\n".join(lines)
