r"""Per-frame super-resolution SR_h: each 256x256 frame -> 768x768, an image model (no temporal
layers), conditioned on the noise-augmented low-resolution frame. At sampling time every frame of a
clip starts from the same noise (and stochastic samplers share their per-step noise across frames),
so the detail it hallucinates is the same in every frame.

Variants:
  tiny: 32x32 -> 64x64.
  paper: 256x256 -> 768x768.
"""

import ml_collections

from mav_jax import config_defaults

VARIANTS = ("tiny", "paper")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the SR_h config for variant `arg` (default "tiny")."""
  config = config_defaults.new_config("sr_high", arg, VARIANTS)
  config_defaults.add_data(config)
  # Trained on single images.
  config.data.kind = "image"
  config.data.resolution = 768
  config_defaults.add_conditioning(config, clip="")
  config.conditioning.low_resolution = 256
  config_defaults.add_unet_stage(config)
  config.model.channels = 128
  config.model.channel_mults = (1, 1, 2, 2, 4, 4)
  config.model.attention_levels = ()
  config.model.mid_attention = False
  config.model.use_global_embedding = False
  config.model.conditioning_scalars = ("noise_level",)
  config.model.conditioning_scalar_scales = (1000.0,)
  config.model.extra_input_channels = 3
  config.diffusion.cond_dropout = 0.0
  config.sampling.guidance_scale = 1.0
  config.sampling.fps = 40.0
  config_defaults.add_optimizer(config)
  config_defaults.add_runtime(config)

  if config.variant == "tiny":
    config_defaults.make_tiny(config)
    config.data.resolution = 64
    config.conditioning.clip = ""
    config.conditioning.low_resolution = 32
    config.model.attention_levels = ()
    config.model.mid_attention = False
    config.sampling.fps = 12.0
  else:
    config.model.remat = True
    config.batch_size = 64
  return config
