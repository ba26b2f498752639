"""Cascade stages: what each stage feeds its model, how its loss is formed, how it samples."""

from mav_jax.stages import clip, decoder

STAGES = {"clip": clip, "decoder": decoder}


def get_stage(name: str):
  """The stage module for a config's `stage` field."""
  if name not in STAGES:
    raise ValueError(f"unknown stage {name!r}; available: {sorted(STAGES)}")
  return STAGES[name]
