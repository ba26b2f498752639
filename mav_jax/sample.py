r"""Generates videos with the cascade: text -> video, and the paper's other applications.

  python -m mav_jax.sample --prompt "a red circle moving left" --output out.gif

With no checkpoint flags it uses the shipped tiny cascade (checkpoints/tiny/<stage>). Modes:
  --mode=text         --prompt "..." (or --prompts_file, one caption per line)
  --mode=image        --image photo.png                 animate an image (it stays the first frame)
  --mode=variation    --video clip.mp4 [--strength 0.7]  variations of a video
  --mode=interpolate  --image first.png,last.png        a clip between two images
  --mode=extend       --video clip.mp4 --extend_times 2 continue a video forwards
  --mode=image_only   --prompt "..." --output img.png    text to image with the image stages
                      (prior, decoder, sr_low; e.g. Karlo's, converted by mav_jax.convert karlo:
                      --prior=K/prior --decoder=K/decoder_image --sr_low=K/sr_low_image)
Any part of the cascade: --until=decoder|interp|sr_low|sr_high; stage checkpoints with --prior,
--decoder, --interp, --sr_low, --sr_high (model folders from mav_jax.export or training workdirs).
Per-stage sampling: --steps=20 or --steps=decoder=30,sr_high=8 (likewise --sampler, --guidance).
Writes the video (.gif or .mp4) and a contact sheet of its frames (<output>.png); a prompts file
gives <output>_000.gif, <output>_001.gif, ..., made --batch_size videos at a time.
At scale: every stage is compiled once and reused by every batch; the batch is split over all the
devices (--strategy shards the parameters too: fsdp for stages too large for one device); several
processes (a pod, or `python launch/local.py --module mav_jax.sample --num_processes 2 -- ...`) each
make and write their share of the videos, under the same names as one process would.
"""

import os
import sys

from absl import flags

from mav_jax import errors
from mav_jax.utils import cli, distributed

MODES = ("text", "image", "variation", "interpolate", "extend", "image_only")
STAGES = ("prior", "decoder", "interp", "sr_low", "sr_high")

_MODE = flags.DEFINE_enum("mode", "text", MODES, "What to generate from.")
_PROMPT = flags.DEFINE_string("prompt", None, "Caption (text mode).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "File of captions, one per line.")
_NEGATIVE = flags.DEFINE_string("negative_prompt", None, "Caption that guidance steers away from.")
_IMAGE = flags.DEFINE_list("image", None, "Image file (image mode), or two (interpolate mode).")
_VIDEO = flags.DEFINE_string("video", None, "Video file (variation and extend modes).")
_STRENGTH = flags.DEFINE_float("strength", 0.7, "Variation: how much of the video is re-drawn.")
_EXTEND = flags.DEFINE_integer("extend_times", 1, "Extend: rounds of extrapolation.")
_CONTEXT = flags.DEFINE_integer("context", None, "Extend: given frames per round.")
_OUTPUT = flags.DEFINE_string("output", "outputs/sample.gif", "Video to write (.gif or .mp4).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing output files.")
_SHEET = flags.DEFINE_bool("contact_sheet", True, "Also write the frames side by side as a PNG.")
_CHECKPOINTS = flags.DEFINE_string(
  "checkpoints", "checkpoints/tiny", "Folder with one model checkpoint per stage."
)
_STAGE_PATHS = {
  s: flags.DEFINE_string(s, None, f"{s} checkpoint (default <checkpoints>/{s}).") for s in STAGES
}
_CLIP = flags.DEFINE_string("clip", None, "CLIP checkpoint (default: the one the prior used).")
_UNTIL = flags.DEFINE_enum("until", "sr_high", STAGES[1:], "Last cascade stage to run.")
_SAMPLER = flags.DEFINE_string("sampler", None, "ddpm, ddim or dpm++2m, or stage=name,...")
_STEPS = flags.DEFINE_string("steps", None, "Sampler steps, or stage=n,... (default: configs).")
_GUIDANCE = flags.DEFINE_string("guidance", None, "Guidance scale, or stage=scale,...")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_FRAMES = flags.DEFINE_integer("num_frames", None, "D^t frames (default: the decoder's).")
_FPS = flags.DEFINE_float(
  "fps",
  None,
  "Frame rate: D^t's in text, image and variation modes (default: the decoder's sampling fps, or "
  "the input video's); the output's in interpolate and extend modes.",
)
_SKIP = flags.DEFINE_integer("frame_skip", None, "↑F expansion factor (1: no interpolation).")
_TRUNCATE = flags.DEFINE_bool(
  "truncate_prompts",
  False,
  "Cut prompts longer than the text encoder's context (default: such a prompt is an error).",
)
_STRATEGY = flags.DEFINE_enum(
  "strategy",
  "data_parallel",
  ["data_parallel", "fsdp", "tensor", "fsdp_tensor"],
  "How parameters are sharded over the devices (fsdp for stages too large for one device); the "
  "batch is split over the devices either way.",
)
_TENSOR = flags.DEFINE_integer(
  "tensor", None, "Devices on the tensor axis for --strategy tensor / fsdp_tensor (default 2)."
)
_BATCH = flags.DEFINE_integer(
  "batch_size",
  8,
  "Videos per cascade call (text mode): a prompts file goes through in batches of this size, the "
  "last one padded (each batch is padded to a multiple of the devices too; a video depends on the "
  "seed, the batch size and its line, not on the devices).",
)


def _prompts() -> list[str]:
  if _PROMPTS_FILE.value:
    try:
      with open(_PROMPTS_FILE.value) as f:
        prompts = [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
      raise errors.UserFileNotFoundError(
        f"--prompts_file {_PROMPTS_FILE.value!r} does not exist"
      ) from None
    if not prompts:
      raise errors.UserError(f"--prompts_file {_PROMPTS_FILE.value!r} holds no captions")
    return prompts
  if _PROMPT.value is None:
    raise errors.UserError(f"{_MODE.value} mode needs --prompt 'a caption' or --prompts_file")
  if not _PROMPT.value.strip():
    raise errors.UserError(
      "empty --prompt: pass a caption, e.g. --prompt 'a red circle moving left'"
    )
  return [_PROMPT.value]


def log(message: str) -> None:
  import jax

  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


def _outputs(n: int) -> list[str]:
  """Output paths for n videos (numbered when n > 1), all checked before any work is done."""
  from mav_jax.utils import video_io

  stem, ext = os.path.splitext(_OUTPUT.value)
  paths = [_OUTPUT.value] if n == 1 else [f"{stem}_{i:03d}{ext}" for i in range(n)]
  if _MODE.value == "image_only":
    if ext.lower() != ".png":
      raise errors.UserError(f"--mode=image_only writes PNG images: --output=NAME.png, not {ext!r}")
    for p in paths:
      if os.path.exists(p) and not _OVERWRITE.value:
        raise errors.UserFileExistsError(
          f"{p} already exists; choose another --output or pass --overwrite"
        )
    return paths
  for p in paths:
    video_io.check_output_path(p, _OVERWRITE.value)
    sheet = os.path.splitext(p)[0] + ".png"
    if _SHEET.value and os.path.exists(sheet) and not _OVERWRITE.value:
      raise errors.UserFileExistsError(
        f"{sheet} already exists; choose another --output or pass --overwrite"
      )
  return paths


def run() -> list[str]:
  import time

  distributed.start()
  import jax
  import jax.numpy as jnp
  import numpy as np

  from mav_jax import sample_lib
  from mav_jax.utils import video_io

  mode = _MODE.value
  prompts = _prompts() if mode in ("text", "image_only") else None
  images = _IMAGE.value or []
  if mode == "image" and len(images) != 1:
    raise errors.UserError("image mode needs one --image")
  if mode == "interpolate" and len(images) != 2:
    raise errors.UserError("interpolate mode needs two images: --image first.png,last.png")
  if mode in ("variation", "extend") and not _VIDEO.value:
    raise errors.UserError(f"{mode} mode needs --video")
  for name, value, ok, rule in [
    ("batch_size", _BATCH.value, lambda v: v >= 1, ">= 1"),
    ("tensor", _TENSOR.value, lambda v: v >= 1, ">= 1"),
    ("frame_skip", _SKIP.value, lambda v: v >= 1, ">= 1 (1: no interpolation)"),
    ("num_frames", _FRAMES.value, lambda v: v >= 2, ">= 2"),
    ("strength", _STRENGTH.value, lambda v: 0 < v <= 1, "in (0, 1]"),
    ("extend_times", _EXTEND.value, lambda v: v >= 1, ">= 1"),
    ("context", _CONTEXT.value, lambda v: v >= 1, ">= 1"),
    ("fps", _FPS.value, lambda v: v > 0, "> 0"),
  ]:
    if value is not None and not ok(value):
      raise errors.UserError(f"--{name} must be {rule}, got {value}")
  outputs = _outputs(len(prompts) if prompts else 1)
  # Inputs are read before any model is loaded, so a bad file fails fast.
  pictures = [sample_lib.read_image(p) for p in images]
  video, video_times = (None, None)
  if mode in ("variation", "extend"):
    video, video_times = sample_lib.read_video(_VIDEO.value)

  last = STAGES.index(_UNTIL.value)
  if mode == "image_only":  # the image stages: prior, decoder, sr_low (Karlo has no SR_h)
    if flags.FLAGS["until"].present and _UNTIL.value not in ("decoder", "sr_low"):
      raise errors.UserError("--mode=image_only runs up to the decoder or sr_low: --until=sr_low")
    last = min(last, STAGES.index("sr_low"))
  elif mode not in ("text", "variation") and last < STAGES.index("interp"):
    raise errors.UserError(f"{mode} mode runs ↑F: --until must be interp or later")
  first = {"text": ["prior", "decoder"], "variation": ["decoder"], "image": ["decoder"]}
  first["image_only"] = first["text"]
  needed = first.get(mode, []) + [s for s in STAGES[2:] if STAGES.index(s) <= last]
  if (_SKIP.value == 1 and mode in ("text", "variation")) or mode == "image_only":
    needed.remove("interp")  # no interpolation: ↑F is not needed
  checkpoints = {s: _STAGE_PATHS[s].value or f"{_CHECKPOINTS.value}/{s}" for s in needed}
  steps = sample_lib._per_stage(_STEPS.value, "steps", int)
  samplers = sample_lib._per_stage(_SAMPLER.value, "sampler", str)
  guidance = sample_lib._per_stage(_GUIDANCE.value, "guidance", float)
  if _FRAMES.value is not None and "decoder" in checkpoints:
    # From the decoder's config alone: no model is loaded for a request it cannot do.
    from mav_jax import checkpointing, paths

    try:
      decoder_config = checkpointing.load_config(paths.resolve(checkpoints["decoder"]))
    except FileNotFoundError:
      decoder_config = None  # loading it below names the problem
    if decoder_config is not None:
      sample_lib.check_frames(decoder_config, _FRAMES.value)

  start = time.time()
  cascade = sample_lib.Cascade(
    checkpoints,
    clip=_CLIP.value,
    strategy=_STRATEGY.value,
    steps=steps,
    samplers=samplers,
    guidance=guidance,
    truncate_prompts=_TRUNCATE.value,
    tensor=_TENSOR.value,
    images=mode == "image_only",
  )
  log(
    f"[sample] {mode}: stages {', '.join(cascade.stages)} on {len(jax.devices())} device(s) "
    f"({jax.process_count()} process(es), mesh {dict(cascade.mesh.shape)}), loaded in "
    f"{time.time() - start:.1f}s"
  )
  rng = jax.random.key(_SEED.value)
  base = cascade.base_resolution
  until = STAGES[last]

  def write(index: int, video, fps: float) -> None:
    path = outputs[index]
    if mode == "image_only":
      from PIL import Image

      image = video_io.to_uint8(np.asarray(video))[0]
      Image.fromarray(image).save(path)
      print(
        f"[sample] wrote {path} ({image.shape[0]}x{image.shape[1]}) in {time.time() - start:.1f}s",
        file=sys.stderr,
      )
      return
    frames = video_io.to_uint8(np.asarray(video))
    scale = sample_lib.scale_for(frames.shape[1])
    video_io.write_video(path, frames, fps=fps, scale=scale)
    if _SHEET.value:
      video_io.contact_sheet(frames, os.path.splitext(path)[0] + ".png", scale=scale)
    print(
      f"[sample] wrote {path} ({len(frames)} frames, {frames.shape[1]}x{frames.shape[2]}, "
      f"{fps:g} fps) in {time.time() - start:.1f}s",
      file=sys.stderr,
    )

  if mode in ("text", "image_only"):
    images = mode == "image_only"  # one-frame images: no fps, frame count or interpolation
    video = {} if images else dict(fps=_FPS.value, num_frames=_FRAMES.value, frame_skip=_SKIP.value)
    sample_lib.text_batches(
      cascade,
      prompts,
      _BATCH.value,
      rng,
      write,
      log,
      images=images,
      negative_prompt=_NEGATIVE.value,
      until=until,
      **video,
    )
    return outputs
  elif mode == "image":
    image = jnp.asarray(sample_lib.to_model_frames(pictures[0][None], base))
    clip, fps = cascade.image_to_video(
      image, rng, fps=_FPS.value, num_frames=_FRAMES.value, frame_skip=_SKIP.value, until=until
    )
  elif mode == "interpolate":
    first, last_image = (jnp.asarray(sample_lib.to_model_frames(p[None], base)) for p in pictures)
    clip, fps = cascade.interpolate(first, last_image, rng, fps=_FPS.value, until=until)
  elif mode == "variation":
    count = _FRAMES.value or int(cascade.stages["decoder"].config.data.num_frames)
    # Frames evenly spaced in time over the whole video: their rate, unless --fps says otherwise.
    picked, spaced_fps = sample_lib.frames_in_time(video, video_times, count=count)
    clip, fps = cascade.variation(
      jnp.asarray(sample_lib.to_model_frames(picked, base))[None],
      rng,
      strength=_STRENGTH.value,
      fps=_FPS.value or spaced_fps,
      frame_skip=_SKIP.value,
      until=until,
    )
  else:
    # The video at --fps (default: its average real rate), frames chosen by their timestamps.
    picked, video_fps = sample_lib.frames_in_time(video, video_times, fps=_FPS.value)
    clip, fps = cascade.extend(
      jnp.asarray(sample_lib.to_model_frames(picked, base))[None],
      rng,
      times=_EXTEND.value,
      context=_CONTEXT.value,
      fps=video_fps,
      until=until,
    )
  for row, video in sample_lib.local_rows(clip).items():
    write(row, video, fps)
  return outputs


def main(argv):
  del argv  # cli.main rejects positional arguments
  from mav_jax.utils import cli

  cli.run_user_command(run)


if __name__ == "__main__":
  cli.main(main)
