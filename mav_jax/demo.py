r"""Demo of the foundation: train the tiny decoder D^t a few steps on random videos, then sample.

  python -m mav_jax.demo --output outputs/demo.gif

It builds the SpaceTimeUNet from `configs/decoder.py:tiny`, fits a fixed batch of random videos with
random "CLIP" embeddings and fps for `config.demo_steps` AdamW steps with the configured diffusion
loss (conditioning dropout included), then draws one guided sample with the configured sampler and
writes it as a GIF / MP4 plus a PNG contact sheet. The data is noise, so the sample is noise too: the
demo shows the machinery end to end, not a trained model (the data and trainer issues make it real).
"""

import os

from absl import app, flags
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "decoder.py")

_CONFIG = config_flags.DEFINE_config_file(
  "config", f"{_DEFAULT_CONFIG}:tiny", "Stage config, e.g. configs/decoder.py:tiny."
)
_OUTPUT = flags.DEFINE_string(
  "output", "outputs/demo.gif", "Where to write the sample (.gif/.mp4)."
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --output if it already exists.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from mav_jax import demo_lib  # imported after flag parsing: `--help` answers without loading JAX

  try:
    demo_lib.run_demo(_CONFIG.value, _OUTPUT.value, _OVERWRITE.value)
  except (FileExistsError, ValueError) as e:
    raise app.UsageError(str(e)) from e


if __name__ == "__main__":
  app.run(main)
