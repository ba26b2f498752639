r"""Exports a training run's parameters as a model checkpoint for sampling and for other stages.

  python -m mav_jax.export --workdir workdirs/decoder --output checkpoints/tiny/decoder

Writes `<output>/params` (Orbax, EMA parameters by default) and `<output>/config.json` (the config
the run was trained with): no optimizer or data-iterator state, so the folder is about a third of a
training checkpoint. `mav_jax.sample` and `conditioning.clip` / `train.init_from` accept either.
"""

import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (or step folder) to export.")
_OUTPUT = flags.DEFINE_string("output", None, "Folder to write the model checkpoint to.")
_ITEM = flags.DEFINE_enum(
  "params", "ema_params", ["ema_params", "params"], "Which parameters to export."
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output folder.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value or not _OUTPUT.value:
    raise app.UsageError("pass --workdir and --output")
  from mav_jax import checkpointing

  try:
    config, params = checkpointing.export_model(
      _WORKDIR.value, _OUTPUT.value, overwrite=_OVERWRITE.value, item=_ITEM.value
    )
  except (FileNotFoundError, FileExistsError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  import jax

  n = sum(x.size for x in jax.tree.leaves(params))
  print(f"[export] {config.stage} ({config.variant}): {n:,} parameters -> {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
