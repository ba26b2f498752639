"""Model summaries computed from abstract shapes (`jax.eval_shape`): nothing is allocated."""

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from mav_jax.models.inflate import is_temporal
from mav_jax.models.unet import unet_from_config


def count_params(config) -> dict[str, int]:
  """{"total", "temporal", "spatial"} parameter counts of `config.model` at `config.data`'s shape."""
  model = unet_from_config(config.model)
  d = config.data
  x = jnp.zeros((1, d.num_frames, d.resolution, d.resolution, config.model.out_channels))
  kwargs = {"scalars": {name: jnp.ones((1,)) for name in model.conditioning_scalars}}
  if model.use_global_embedding:
    kwargs["global_embedding"] = jnp.zeros((1, d.embedding_dim))
  if model.use_cross_attention:
    kwargs["context"] = jnp.zeros((1, d.context_length, d.context_dim))
  if model.extra_input_channels:
    kwargs["extra_inputs"] = jnp.zeros(x.shape[:4] + (model.extra_input_channels,))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, jnp.zeros((1,)), **kwargs))
  flat = traverse_util.flatten_dict(nn.unbox(shapes)["params"])
  temporal = sum(v.size for p, v in flat.items() if is_temporal(p))
  total = sum(v.size for v in flat.values())
  return {"total": total, "temporal": temporal, "spatial": total - temporal}
