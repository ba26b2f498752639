r"""Converts pretrained weights of other frameworks into mav_jax model folders.

  python -m mav_jax.convert karlo --source DIR --output workdirs/karlo \
      [--vision CLIP_VIT_L14_DIR] [--overwrite]

`karlo`: Kakao Brain's Karlo v1 alpha in the diffusers layout (DIR as `UnCLIPPipeline.save_pretrained`
writes it; nothing is downloaded) -> OUT/clip, OUT/prior, OUT/decoder_image, OUT/sr_low_image,
OUT/sr_low_image_last (docs/karlo.md). `--vision`: a transformers CLIPModel folder
(openai/clip-vit-large-patch14) whose vision tower joins Karlo's text encoder; D^t, ↑F and the
prior need image embeddings to train, sampling does not.
"""

import sys

from absl import flags

from mav_jax import errors
from mav_jax.utils import cli

KINDS = ("karlo",)

_SOURCE = flags.DEFINE_string("source", None, "The folder to convert (see the kind's layout).")
_OUTPUT = flags.DEFINE_string("output", None, "Folder to write the model folders into.")
_VISION = flags.DEFINE_string(
  "vision", None, "karlo: a CLIPModel folder whose vision tower joins the text encoder."
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output folder.")


def main(argv):
  del argv
  kind = _KIND[0]
  if not _SOURCE.value or not _OUTPUT.value:
    raise errors.UserError(f"pass --source and --output (python -m mav_jax.convert {kind} ...)")
  from mav_jax.convert import karlo

  cli.run_user_command(
    lambda: karlo.convert_karlo(
      _SOURCE.value, _OUTPUT.value, vision=_VISION.value, overwrite=_OVERWRITE.value
    )
  )


_KIND: list[str] = []

if __name__ == "__main__":
  # The kind is the first argument (python -m mav_jax.convert karlo --source ...).
  if len(sys.argv) < 2 or sys.argv[1] not in KINDS:
    given = sys.argv[1] if len(sys.argv) > 1 else "nothing"
    cli.fail(
      f"name what to convert first, one of {KINDS} (got {given}): python -m mav_jax.convert karlo --source DIR --output OUT"
    )
  _KIND.append(sys.argv.pop(1))
  cli.main(main)
