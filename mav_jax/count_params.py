r"""Prints a stage model's parameter count, split into spatial and temporal, without allocating it.

  python -m mav_jax.count_params --config configs/decoder.py:base

Shapes come from `jax.eval_shape` of the model's init, so even a paper-scale model is counted in
seconds on a laptop.
"""

from ml_collections import config_flags

from mav_jax import errors
from mav_jax.utils import cli

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Stage config, e.g. configs/decoder.py:base."
)


def main(argv):
  del argv  # cli.main rejects positional arguments
  if _CONFIG.value is None:
    raise errors.UserError("pass --config, e.g. --config configs/decoder.py:base")
  from mav_jax.models.summary import count_params

  counts = count_params(_CONFIG.value)
  name = f"{_CONFIG.value.stage}:{_CONFIG.value.variant}"
  print(
    f"{name}: {counts['total']:,} parameters "
    f"({counts['spatial']:,} spatial, {counts['temporal']:,} temporal)"
  )


if __name__ == "__main__":
  cli.main(main)
