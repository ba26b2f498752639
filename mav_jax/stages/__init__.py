"""Cascade stages: what each stage feeds its model, how its loss is formed, how it samples.

A stage provides make_model(config), init(model, config, rng), loss_fn(model, config, params,
batch, rng, frozen) and optionally load_frozen(model, config, mesh) (frozen models it reads, e.g.
CLIP) and sample(model, config, params, batch, rng, frozen) (training-time video samples).
"""

from mav_jax import errors
from mav_jax.stages import clip, prior, video

STAGES = {
  "clip": clip,
  "prior": prior,
  "decoder": video.DECODER,
  "interp": video.INTERP,
  "sr_low": video.SR_LOW,
  "sr_high": video.SR_HIGH,
}


def get_stage(name: str):
  """The stage for a config's `stage` field."""
  if name not in STAGES:
    raise errors.UserError(f"unknown stage {name!r}; available: {sorted(STAGES)}")
  return STAGES[name]
