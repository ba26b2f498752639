r"""Input-pipeline throughput: clips per second per CPU core, for the synthetic source and for mp4.

  python -m mav_jax.data.benchmark --config configs/decoder.py:base

Runs this host's pipeline single-threaded (one reader thread, no worker processes) and divides by
the process CPU time, so the figures are per core; multiply by the cores you give the pipeline.
  synthetic: the embedded shapes-in-motion world, rendered at the config's clip size.
  mp4: `--num_videos` clips of `--video_size` at 30 fps are encoded to H.264 with PyAV, prepared
       into ArrayRecord with `mav_jax.data.prepare`, then decoded, fps-sampled, resized and cropped
       to the config's clip size by the pipeline.
"""

import json

from absl import flags
from ml_collections import config_flags

from mav_jax import errors
from mav_jax.utils import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config, e.g. decoder.py:base.")
_SECONDS = flags.DEFINE_float("seconds", 15.0, "Measuring time per source.")
_NUM_VIDEOS = flags.DEFINE_integer("num_videos", 24, "mp4 files to encode for the mp4 source.")
_VIDEO_SIZE = flags.DEFINE_string("video_size", "320x180", "WIDTHxHEIGHT of the encoded mp4s.")
_VIDEO_SECONDS = flags.DEFINE_float("video_seconds", 6.0, "Length of each encoded mp4.")
_OUTPUT = flags.DEFINE_string("output", "", "Optional JSON file for the results.")


def main(argv):
  del argv  # cli.main rejects positional arguments
  if _CONFIG.value is None:
    raise errors.UserError("pass --config, e.g. --config configs/decoder.py:base")
  from mav_jax.data import throughput

  results = throughput.run(
    _CONFIG.value, _SECONDS.value, _NUM_VIDEOS.value, _VIDEO_SIZE.value, _VIDEO_SECONDS.value
  )
  print(f"\n{'source':<10} {'clips/s/core':>12} {'MB/s/core out':>14}   ({results['clip']})")
  for name in ("synthetic", "mp4"):
    r = results[name]
    print(f"{name:<10} {r['clips_per_cpu_s']:>12} {r['output_mb_per_cpu_s']:>14}")
  print(
    f"mp4 input: {results['mp4']['input_mb_per_cpu_s']} MB/s/core of encoded video "
    f"({results['mp4']['source']})"
  )
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  cli.main(main)
