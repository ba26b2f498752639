r"""Prints a stage model's parameter count, split into spatial and temporal, without allocating it.

  python -m mav_jax.count_params --config configs/decoder.py:base

Shapes come from `jax.eval_shape` of the model's init, so even a paper-scale model is counted in
seconds on a laptop.
"""

from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Stage config, e.g. configs/decoder.py:base."
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("pass --config, e.g. --config configs/decoder.py:base")
  from mav_jax.models.summary import count_params

  counts = count_params(_CONFIG.value)
  name = f"{_CONFIG.value.stage}:{_CONFIG.value.variant}"
  print(
    f"{name}: {counts['total']:,} parameters "
    f"({counts['spatial']:,} spatial, {counts['temporal']:,} temporal)"
  )


if __name__ == "__main__":
  app.run(main)
