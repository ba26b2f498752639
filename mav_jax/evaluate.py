r"""Evaluates a cascade: the synthetic motion benchmark, or a zero-shot protocol of the paper.

  python -m mav_jax.evaluate --protocol motion --output outputs/eval/motion
  python -m mav_jax.evaluate --config configs/eval/msrvtt.py --config.captions=... --output ...
  python -m mav_jax.evaluate --config configs/eval/ucf101.py --config.class_index=... --output ...

With no checkpoint flags it reads the shipped tiny cascade (checkpoints/tiny/<stage>); any stage can
be replaced (--decoder workdirs/my_decoder) and the cascade cut short (--until decoder).

Motion: for every (shape, colour, direction) caption, `--per_combination` clips go through the
cascade; each stage's output is measured from its pixels (colour, shape, direction, temporal
consistency) beside rendered ground truth of the same size. Writes results.json, results.md (the
table) and, per stage, a GIF of one clip per direction (stage_<name>.gif).

Protocols (--config configs/eval/<name>.py; see their docstrings): prompts from MSR-VTT captions or
UCF-101 class names go through the cascade into FID, CLIPSIM, IS and FVD against a folder of real
videos, from weight files the user supplies (mav_jax.eval.protocols). Writes results.json,
results.md, preview.gif and the Fréchet statistics (gen_*.npz, real_*.npz).

An existing output folder's results are kept unless --overwrite.
"""

import json
import os
import sys

from absl import flags
from ml_collections import config_flags

from mav_jax import errors
from mav_jax.utils import cli, distributed

STAGES = ("prior", "decoder", "interp", "sr_low", "sr_high")

_PROTOCOL = flags.DEFINE_enum("protocol", "motion", ["motion"], "What to evaluate.")
_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "A protocol config (configs/eval/msrvtt.py, ucf101.py); replaces --protocol."
)
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
_PER = flags.DEFINE_integer("per_combination", 2, "Motion: clips per caption.")
_BATCH = flags.DEFINE_integer("batch_size", 60, "Motion: clips per cascade call.")
_FPS = flags.DEFINE_float("fps", None, "Motion: D^t's frame rate (default: the decoder's).")
_STEPS = flags.DEFINE_string("steps", None, "Sampler steps, or stage=n,... (default: configs).")
_GUIDANCE = flags.DEFINE_string("guidance", None, "Guidance scale, or stage=scale,...")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_STRATEGY = flags.DEFINE_enum(
  "strategy",
  "data_parallel",
  ["data_parallel", "fsdp", "tensor", "fsdp_tensor"],
  "How the cascade's parameters are sharded over the devices (fsdp for stages too large for one "
  "device); the batch is split over the devices either way.",
)
_TENSOR = flags.DEFINE_integer(
  "tensor", None, "Devices on the tensor axis for --strategy tensor / fsdp_tensor (default 2)."
)

_FILES = ("results.json", "results.md", "preview.gif")
_PREFIXES = ("stage_", "gen_", "real_")


def log(message: str) -> None:
  import jax

  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


def _check_output() -> None:
  out = _OUTPUT.value
  if os.path.isdir(out) and not _OVERWRITE.value:
    taken = [f for f in os.listdir(out) if f in _FILES or f.startswith(_PREFIXES)]
    if taken:
      raise errors.UserFileExistsError(
        f"{out} already holds results ({', '.join(sorted(taken))}); choose another --output or "
        f"pass --overwrite"
      )


def _cascade(until: str):
  from mav_jax import sample_lib

  if until not in STAGES[1:]:
    raise errors.UserError(f"until must be one of {STAGES[1:]}, got {until!r}")
  last = STAGES.index(until)
  needed = [s for s in STAGES if STAGES.index(s) <= last]
  checkpoints = {s: _STAGE_PATHS[s].value or f"{_CHECKPOINTS.value}/{s}" for s in needed}
  cascade = sample_lib.Cascade(
    checkpoints,
    clip=_CLIP.value,
    steps=sample_lib._per_stage(_STEPS.value, "steps", int),
    guidance=sample_lib._per_stage(_GUIDANCE.value, "guidance", float),
    # Benchmark captions are what they are: cut at the text encoder's context, as CLIP-based
    # evaluations do, and said once.
    truncate_prompts=True,
    strategy=_STRATEGY.value,
    tensor=_TENSOR.value,
  )
  return cascade, checkpoints


def run_protocol() -> dict:
  from mav_jax.eval import protocols

  config = _CONFIG.value
  _check_output()
  # Cheap checks first: no cascade is loaded for a run that would fail on its inputs.
  protocols.parse_metrics(config)
  protocols.prompts_for(config)
  protocols.check_real_side(config, protocols.parse_metrics(config))
  cascade, _ = _cascade(config.until)
  values = protocols.run(config, cascade, _OUTPUT.value, _SEED.value, log)
  import jax

  if jax.process_index() == 0:  # every process has the same results; process 0 wrote them
    print(json.dumps(values, indent=2))
    log(f"[evaluate] wrote {_OUTPUT.value}/results.json, results.md, preview.gif, *.npz")
  return values


def run_motion() -> list[dict]:
  import numpy as np

  from mav_jax import sample_lib
  from mav_jax.eval import motion_benchmark
  from mav_jax.utils import video_io

  if _PER.value < 1 or _BATCH.value < 1:
    raise errors.UserError("--per_combination and --batch_size must be >= 1")
  if _FPS.value is not None and _FPS.value <= 0:
    raise errors.UserError(f"--fps must be > 0, got {_FPS.value}")
  _check_output()
  out = _OUTPUT.value
  cascade, checkpoints = _cascade(_UNTIL.value)
  rows, clips = motion_benchmark.run(
    cascade, _PER.value, _SEED.value, fps=_FPS.value, batch_size=_BATCH.value, log=log
  )
  os.makedirs(out, exist_ok=True)
  meta = {
    "checkpoints": checkpoints,
    "per_combination": _PER.value,
    "seed": _SEED.value,
    # The sampling overrides as given (None: the checkpoints' configs).
    **{f.name: f.value for f in (_STEPS, _GUIDANCE)},
  }
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
  del argv  # cli.main rejects positional arguments
  distributed.start()
  cli.run_user_command(run_protocol if _CONFIG.value is not None else run_motion)


if __name__ == "__main__":
  cli.main(main)
