r"""Spatiotemporal super-resolution SR_l^t: 64x64 clips -> 256x256, conditioned on the noise-augmented
low-resolution clip (3 extra input channels, upsampled) and its augmentation level (a scalar).

Trained on images first (`--config.data.kind=image`: the spatial SR_l), then on video from that
checkpoint (`--config.train.init_from=...`) with temporal layers added. Not conditioned on text.
Sampling upsamples every frame of ↑F's output at once (any number of frames: temporal layers are
convolutions and relative-position attention).

Variants:
  tiny: 16x16 -> 32x32, clips of 4 frames.
  paper: 64x64 -> 256x256, clips of 8 frames (the paper's output: 76 frames).
  karlo: 64x64 -> 256x256, clips of 8 frames, on Kakao Brain's Karlo SR (692M; its input is the
        bicubic-upsampled clip, no noise augmentation), from its converted image weights, training
        only the temporal layers (docs/karlo.md).
"""

import ml_collections

from mav_jax import config_defaults

VARIANTS = ("tiny", "paper", "karlo")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the SR_l^t config for variant `arg` (default "tiny")."""
  config = config_defaults.new_config("sr_low", arg, VARIANTS)
  config_defaults.add_data(config)
  config.data.num_frames = 8
  config.data.resolution = 256
  config.data.fps_min = 5.0
  config.data.fps_max = 30.0
  config_defaults.add_conditioning(config, clip="")
  config.conditioning.low_resolution = 64
  config_defaults.add_unet_stage(config)
  config.model.channels = 128
  config.model.channel_mults = (1, 2, 4, 4)
  config.model.attention_levels = (3,)
  config.model.use_global_embedding = False
  config.model.conditioning_scalars = ("noise_level",)
  # The level is a diffusion time in [0, 1]: scale it like the time embedding.
  config.model.conditioning_scalar_scales = (1000.0,)
  config.model.extra_input_channels = 3
  config.diffusion.cond_dropout = 0.0
  config.sampling.guidance_scale = 1.0
  config.sampling.fps = 40.0
  # A model folder of the same architecture used for the last sampling step only (Karlo's
  # super_res_last: `mav_jax.convert karlo` names it in the image SR it writes); "": none.
  config.sampling.last_step_model = ""
  config_defaults.add_optimizer(config)
  config_defaults.add_runtime(config)

  if config.variant == "tiny":
    config_defaults.make_tiny(config)
    config.data.resolution = 32
    config.data.fps_min = 4.0
    config.data.fps_max = 24.0
    config.conditioning.clip = ""
    config.model.attention_levels = ()
    config.model.mid_attention = True
    config.sampling.fps = 12.0
  elif config.variant == "paper":
    # No remat: 2 clips per v5p chip take ~32 GiB without it and the step is ~20% faster
    # (docs/benchmarks.md, "Per op"); on 16-32 GiB chips (v4, v5e, v6e) add
    # --config.model.remat=True.
    config.model.remat = False
    config.batch_size = 64
  else:
    config_defaults.make_karlo_unet(config)
    config.batch_size = 64
  return config
