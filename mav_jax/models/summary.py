"""Model summaries computed from abstract shapes (`jax.eval_shape`): nothing is allocated."""

import jax
from flax import linen as nn
from flax import traverse_util

from mav_jax.models.inflate import is_temporal


def count_params(config) -> dict[str, int]:
  """{"total", "temporal", "spatial"} parameter counts of the trained model of `config.stage`
  (frozen models it reads, such as CLIP, are not counted)."""
  from mav_jax import stages

  stage = stages.get_stage(config.stage)
  model = stage.make_model(config)
  shapes = jax.eval_shape(lambda: stage.init(model, config, jax.random.key(0)))
  flat = traverse_util.flatten_dict(nn.unbox(shapes))
  temporal = sum(v.size for p, v in flat.items() if is_temporal(p))
  total = sum(v.size for v in flat.values())
  return {"total": total, "temporal": temporal, "spatial": total - temporal}
