r"""Decoder D^t: the spatiotemporal UNet that turns a CLIP image embedding (and fps) into 16 frames.

D^t is conditioned on the frozen CLIP's image embedding of a random frame of each clip (so it trains
on unlabelled video); at sampling time the prior's embedding of the caption takes its place.

Variants (the part after the colon):
  tiny: a ~0.3M-parameter model on 4 frames of 16x16 that trains and samples on one CPU core,
        conditioned on the shipped tiny CLIP (checkpoints/tiny/clip).
  base: 16 frames of 64x64 (the paper's D^t resolution), a mid-sized UNet for one accelerator.
  paper: 16 frames of 64x64 with a UNet sized like DALL-E 2's 64px decoder (~1.2B parameters).
  throughput: the CPU throughput benchmark's model (README, performance): 61.9M parameters on a
        batch of 2 clips of 8 frames at 32x32, float32, matched to make-a-video-pytorch's
        SpaceTimeUnet reference (scripts/reference_throughput_pytorch.py).
  throughput_efficient: the same parameter budget (62.7M) and input, spent where it is cheap: half
        the width at 32x32 (mults (1, 4, 8, 16) on 32 channels) and the frame count halved at every
        level (8, 4, 2, 1 frames), the upsampling convs narrowed to the level they enter
        (model.narrow_upsample), so the deep levels hold the parameters and the large ones little
        of the compute; 1.52-1.65x make-a-video-pytorch's samples/s on one CPU core (README,
        performance).

Train (images first, then video from that checkpoint with temporal layers added):
  python -m mav_jax.train --config configs/decoder.py:tiny --workdir workdirs/tiny_image \
      --config.data.kind=image
  python -m mav_jax.train --config configs/decoder.py:tiny --workdir workdirs/tiny_video \
      --config.train.init_from=workdirs/tiny_image
Override any field: --config.model.channels=32 (unknown fields are an error).
"""

import ml_collections

from mav_jax import config_defaults

VARIANTS = ("tiny", "base", "paper", "throughput", "throughput_efficient")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the decoder config for variant `arg` (default "tiny")."""
  config = config_defaults.new_config("decoder", arg, VARIANTS)
  # Data (mav_jax.data): what a clip is and where it comes from.
  config_defaults.add_data(config)
  # The frozen CLIP whose image embedding conditions D^t.
  config_defaults.add_conditioning(config, clip="workdirs/clip")
  # The UNet, diffusion process and sampler (D^t's values are the defaults).
  config_defaults.add_unet_stage(config)
  # Optimisation: AdamW, linear warmup then cosine decay, global-norm clipping.
  config_defaults.add_optimizer(config)
  # Device mesh, sharding strategy and training loop.
  config_defaults.add_runtime(config)

  if config.variant == "tiny":
    config_defaults.make_tiny(config)
  elif config.variant in ("throughput", "throughput_efficient"):
    # Width and depth matched to the reference's parameter count (61.9M vs its 60.5M).
    config.model.channels = 64
    config.model.channel_mults = (1, 2, 4, 8)
    config.model.num_res_blocks = 1
    config.model.attention_levels = (3,)
    config.model.mid_attention = False
    config.model.dtype = "float32"
    # XLA's CPU backend has no fast 3D conv (conv.TemporalConv).
    config.model.temporal_conv = "matmul"
    # ... nor a fast 3x3 conv on small frames: one im2col matmul at <= 8x8 (common.Im2colConv).
    config.model.spatial_conv = "auto"
    config.data.num_frames = 8
    config.data.resolution = 32
    config.batch_size = 2
    config.conditioning.clip = config_defaults.TINY_CLIP
    config.conditioning.embedding_dim = 32
    if config.variant == "throughput_efficient":
      # Efficient U-Net's allocation (Imagen): parameters at the small levels, FLOPs off the large.
      config.model.channels = 32
      config.model.channel_mults = (1, 4, 8, 16)
      config.model.temporal_downsample = (True, True, True)
      config.model.narrow_upsample = True
      # One more block at 8x8 (2 frames there) brings the count to 62.7M, 3.6% over the reference.
      config.model.level_res_blocks = (1, 1, 2, 1)
  elif config.variant == "paper":
    config.model.channels = 320
    config.model.num_res_blocks = 3
    config.model.remat = True
    config.batch_size = 256
  return config
