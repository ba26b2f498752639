r"""Exports a training run's parameters as a model checkpoint for sampling and for other stages.

  python -m mav_jax.export --workdir workdirs/decoder --output checkpoints/tiny/decoder

Writes `<output>/params` (Orbax, EMA parameters by default) and `<output>/config.json` (the config
the run was trained with): no optimizer or data-iterator state, so the folder is about a third of a
training checkpoint. `mav_jax.sample` and `conditioning.clip` / `train.init_from` accept either.
"""

from absl import flags

from mav_jax import errors
from mav_jax.utils import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (or step folder) to export.")
_OUTPUT = flags.DEFINE_string("output", None, "Folder to write the model checkpoint to.")
_ITEM = flags.DEFINE_enum(
  "params", "ema_params", ["ema_params", "params"], "Which parameters to export."
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output folder.")


def main(argv):
  del argv  # cli.main rejects positional arguments
  if not _WORKDIR.value or not _OUTPUT.value:
    raise errors.UserError("pass --workdir and --output")
  from mav_jax import checkpointing

  try:
    config, params = checkpointing.export_model(
      _WORKDIR.value, _OUTPUT.value, overwrite=_OVERWRITE.value, item=_ITEM.value
    )
  except KeyError as e:  # --item names no entry of the state
    raise errors.UserError(f"--item={_ITEM.value!r}: the checkpoint has no such entry ({e})") from e
  import jax

  n = sum(x.size for x in jax.tree.leaves(params))
  print(f"[export] {config.stage} ({config.variant}): {n:,} parameters -> {_OUTPUT.value}")


if __name__ == "__main__":
  cli.main(main)
