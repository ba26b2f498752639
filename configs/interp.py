r"""Frame interpolation ↑F: D^t fine-tuned to fill in masked frames (interpolation and extrapolation).

Inputs beyond D^t's: the masked clip and the mask as 4 extra input channels (zero-initialised, so the
fine-tuning starts from D^t exactly) and the spacing of the given frames ("frame_skip", a scalar
condition next to fps). Training masks are random: every k-th frame given (interpolation, k up to
`data.mask_max_skip`) or the first / last frames given (extrapolation). At sampling time ↑F expands
f frames to (f - 1) * sampling.frame_skip + 1, animates an image (first frame given), interpolates
between two images (both end frames given) and extends videos (last frames of one clip given as the
first frames of the next).

Variants:
  tiny: 10 frames of 16x16 (4 -> 10 with skip 3), the tiny D^t's UNet.
  paper: 76 frames of 64x64 (16 -> 76 with skip 5), the paper D^t's UNet.
  karlo: 76 frames of 64x64 on the Karlo D^t (configs/decoder.py:karlo), from its trained
        workdir; the spatial (Karlo) weights stay frozen.

Train from a D^t checkpoint (its parameters; the extra conv and frame-skip embedding start at zero):
  python -m mav_jax.train --config configs/interp.py:tiny --workdir workdirs/interp \
      --config.train.init_from=workdirs/decoder
"""

import ml_collections

from mav_jax import config_defaults

VARIANTS = ("tiny", "paper", "karlo")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the interpolation config for variant `arg` (default "tiny")."""
  config = config_defaults.new_config("interp", arg, VARIANTS)
  config_defaults.add_data(config)
  config.data.num_frames = 76
  # Clips at D^t's fps times the frame skip: the rate ↑F produces (D^t's 8 fps x 5 = 40).
  config.data.fps_min = 5.0
  config.data.fps_max = 60.0
  config.data.frame_masks = True
  config.data.mask_max_skip = 75
  config.data.mask_max_context = 8
  config_defaults.add_conditioning(config, clip="workdirs/clip")
  config_defaults.add_unet_stage(config)
  config.model.conditioning_scalars = ("fps", "frame_skip")
  config.model.conditioning_scalar_scales = (1.0, 1.0)
  config.model.extra_input_channels = 4
  config.sampling.fps = 40.0  # D^t's 8 fps times the frame skip 5
  config.sampling.guidance_scale = 1.5
  config_defaults.add_optimizer(config)
  config_defaults.add_runtime(config)

  if config.variant == "tiny":
    config_defaults.make_tiny(config)
    config.data.num_frames = 10
    config.data.fps_min = 4.0
    config.data.fps_max = 24.0
    config.data.mask_max_skip = 9
    config.data.mask_max_context = 4
    config.sampling.fps = 12.0
  elif config.variant == "paper":
    config.model.channels = 320
    config.model.num_res_blocks = 3
    config.model.head_dim = 128  # D^t paper's (it starts from D^t's weights)
    config.model.remat = True  # 76 frames per clip
    config.batch_size = 64
  else:
    config_defaults.make_karlo_unet(config)
    config.batch_size = 64
  return config
