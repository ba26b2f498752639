r"""Evaluates a cascade: the synthetic motion benchmark.

  python -m mav_jax.evaluate --protocol motion --output outputs/eval/motion

With no checkpoint flags it reads the shipped tiny cascade (checkpoints/tiny/<stage>); any stage can
be replaced (--decoder workdirs/my_decoder) and the cascade cut short (--until decoder). For every
(shape, colour, direction) caption, `--per_combination` clips go through the cascade; each stage's
output is measured from its pixels (colour, shape, direction, temporal consistency) beside rendered
ground truth of the same size. Writes results.json, results.md (the table) and, per stage, a GIF of
one clip per direction (stage_<name>.gif); an existing output folder is kept unless --overwrite.
"""

import json
import os
import sys

from absl import app, flags

STAGES = ("prior", "decoder", "interp", "sr_low", "sr_high")

_PROTOCOL = flags.DEFINE_enum("protocol", "motion", ["motion"], "What to evaluate.")
_OUTPUT = flags.DEFINE_string("output", "outputs/eval/motion", "Folder for the results.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output folder's files.")
_CHECKPOINTS = flags.DEFINE_string(
  "checkpoints", "checkpoints/tiny", "Folder with one model checkpoint per stage."
)
_STAGE_PATHS = {
  s: flags.DEFINE_string(s, None, f"{s} checkpoint (default <checkpoints>/{s}).") for s in STAGES
}
_CLIP = flags.DEFINE_string("clip", None, "CLIP checkpoint (default: the one the prior used).")
_UNTIL = flags.DEFINE_enum("until", "sr_high", STAGES[1:], "Last cascade stage to run.")
_PER = flags.DEFINE_integer("per_combination", 2, "Clips per (shape, colour, direction) caption.")
_BATCH = flags.DEFINE_integer("batch_size", 60, "Clips per cascade call.")
_FPS = flags.DEFINE_float("fps", None, "D^t's frame rate (default: the decoder's sampling fps).")
_STEPS = flags.DEFINE_string("steps", None, "Sampler steps, or stage=n,... (default: configs).")
_GUIDANCE = flags.DEFINE_string("guidance", None, "Guidance scale, or stage=scale,...")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")

_FILES = ("results.json", "results.md")


def run_motion() -> list[dict]:
  import numpy as np

  from mav_jax import sample_lib
  from mav_jax.eval import motion_benchmark
  from mav_jax.utils import video_io

  if _PER.value < 1 or _BATCH.value < 1:
    raise ValueError("--per_combination and --batch_size must be >= 1")
  if _FPS.value is not None and _FPS.value <= 0:
    raise ValueError(f"--fps must be > 0, got {_FPS.value}")
  out = _OUTPUT.value
  if os.path.isdir(out) and not _OVERWRITE.value:
    taken = [f for f in os.listdir(out) if f in _FILES or f.startswith("stage_")]
    if taken:
      raise FileExistsError(
        f"{out} already holds results ({', '.join(sorted(taken))}); choose another --output or "
        f"pass --overwrite"
      )
  last = STAGES.index(_UNTIL.value)
  needed = [s for s in STAGES if STAGES.index(s) <= last]
  checkpoints = {s: _STAGE_PATHS[s].value or f"{_CHECKPOINTS.value}/{s}" for s in needed}
  cascade = sample_lib.Cascade(
    checkpoints,
    clip=_CLIP.value,
    steps=sample_lib._per_stage(_STEPS.value, "steps", int),
    guidance=sample_lib._per_stage(_GUIDANCE.value, "guidance", float),
  )
  log = lambda m: print(m, file=sys.stderr)  # noqa: E731
  rows, clips = motion_benchmark.run(
    cascade, _PER.value, _SEED.value, fps=_FPS.value, batch_size=_BATCH.value, log=log
  )
  os.makedirs(out, exist_ok=True)
  meta = {"checkpoints": checkpoints, "per_combination": _PER.value, "seed": _SEED.value}
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump({"setup": meta, "rows": rows}, f, indent=2)
  table = motion_benchmark.format_table(rows)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(table + "\n")
  # One clip per direction (the first caption of each), side by side, per stage.
  combos = motion_benchmark.captions(_PER.value)
  picks = [
    next(i for i, c in enumerate(combos) if c[2] == d) for d in ("left", "right", "up", "down")
  ]
  for name, c in clips.items():
    strip = np.concatenate([c[i] for i in picks], axis=2)
    path = os.path.join(out, f"stage_{name}.gif")
    video_io.write_video(path, strip, fps=4.0, scale=sample_lib.scale_for(c.shape[2]))
  print(table)
  log(f"[evaluate] wrote {out}/results.json, results.md, stage_*.gif")
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from mav_jax.utils import cli

  cli.run_user_command(run_motion)


if __name__ == "__main__":
  app.run(main)
