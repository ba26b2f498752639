r"""Decoder D^t: the spatiotemporal UNet that turns a CLIP image embedding (and fps) into 16 frames.

Variants (the part after the colon):
  tiny: a ~0.3M-parameter model on 4 frames of 16x16 that trains and samples on one CPU core.
  base: 16 frames of 64x64 (the paper's D^t resolution), a mid-sized UNet for one accelerator.

Train (images first, then video from that checkpoint with temporal layers added):
  python -m mav_jax.train --config configs/decoder.py:tiny --workdir workdirs/tiny_image \
      --config.data.kind=image
  python -m mav_jax.train --config configs/decoder.py:tiny --workdir workdirs/tiny_video \
      --config.train.init_from=workdirs/tiny_image
Run the demo (a few training steps on random videos, then a DDIM sample written to a file):
  python -m mav_jax.demo --config configs/decoder.py:tiny --output outputs/demo.gif
Override any field: --config.model.channels=32 (unknown fields are an error).
"""

import ml_collections

from mav_jax import config_defaults

VARIANTS = ("tiny", "base")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the decoder config for variant `arg` (default "tiny")."""
  config = config_defaults.new_config("decoder", arg, VARIANTS)

  # Data (mav_jax.data): what a clip is and where it comes from.
  config_defaults.add_data(config)
  # Width of the global conditioning embedding (the CLIP image embedding in the full cascade).
  config.data.embedding_dim = 768

  # SpaceTimeUNet attributes (mav_jax.models.unet.SpaceTimeUNet).
  config.model = ml_collections.ConfigDict()
  # Output channels (RGB).
  config.model.out_channels = 3
  # Base width; level i has channels * channel_mults[i] channels.
  config.model.channels = 128
  # Width multiplier per resolution level.
  config.model.channel_mults = (1, 2, 3, 4)
  # Residual blocks per level.
  config.model.num_res_blocks = 2
  # Levels with pseudo-3D attention (indices into channel_mults).
  config.model.attention_levels = (1, 2, 3)
  # Attention block in the middle of the UNet.
  config.model.mid_attention = True
  # Features per attention head.
  config.model.head_dim = 64
  # Scalar conditions; D^t is conditioned on the clip's frame rate.
  config.model.conditioning_scalars = ("fps",)
  # Multiplier of each scalar before its sinusoidal features (1: fps in frames per second).
  config.model.conditioning_scalar_scales = (1.0,)
  # Condition on a global embedding vector (the CLIP image embedding).
  config.model.use_global_embedding = True
  # Cross-attention to context tokens (off: D^t sees text only through the embedding).
  config.model.use_cross_attention = False
  # Extra input channels (0 for D^t; 4 for frame interpolation; 3 for super-resolution).
  config.model.extra_input_channels = 0
  # Taps of every temporal conv.
  config.model.temporal_kernel_size = 3
  # Dropout inside residual blocks.
  config.model.dropout = 0.0
  # Rematerialise block activations in the backward pass.
  config.model.remat = False
  # jax.checkpoint_policies name: what remat may keep instead of recomputing.
  config.model.remat_policy = "nothing_saveable"
  # Compute dtype.
  config.model.dtype = "bfloat16"
  # Parameter dtype.
  config.model.param_dtype = "float32"

  # Diffusion process and loss.
  config.diffusion = ml_collections.ConfigDict()
  # Noise schedule kind: "cosine" or "linear".
  config.diffusion.schedule = "cosine"
  # Resolution shift: resolution / base resolution (1.0: none).
  config.diffusion.shift = 1.0
  # Model parameterisation: "eps", "x0" or "v".
  config.diffusion.target = "v"
  # Loss weighting: "plain" or "min_snr".
  config.diffusion.weighting = "min_snr"
  # Gamma of min-SNR weighting.
  config.diffusion.min_snr_gamma = 5.0
  # Probability of dropping the conditioning (classifier-free guidance training).
  config.diffusion.cond_dropout = 0.1

  # Sampling.
  config.sampling = ml_collections.ConfigDict()
  # "ddpm", "ddim" or "dpm++2m".
  config.sampling.sampler = "ddim"
  # Model evaluations per sample.
  config.sampling.num_steps = 50
  # DDIM eta (0: deterministic).
  config.sampling.eta = 0.0
  # Classifier-free guidance scale (1: no guidance).
  config.sampling.guidance_scale = 3.0
  # Frame rate the sample is conditioned on and written at.
  config.sampling.fps = 8.0

  # Optimisation: AdamW, linear warmup then cosine decay, global-norm clipping.
  config_defaults.add_optimizer(config)
  # Training steps of the demo (mav_jax.demo).
  config.demo_steps = 20

  # Device mesh, sharding strategy and training loop.
  config_defaults.add_runtime(config)

  if config.variant == "tiny":
    config.data.num_frames = 4
    config.data.resolution = 16
    config.data.fps_min = 2.0
    config.data.fps_max = 8.0
    config.data.max_tokens = 32
    config.data.num_threads = 1
    config.data.embedding_dim = 16
    config.model.channels = 16
    config.model.channel_mults = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attention_levels = (1,)
    config.model.head_dim = 16
    config.model.dtype = "float32"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 10
    config.batch_size = 8
    config.demo_steps = 20
    config.train.num_steps = 200
    config.train.ema_decay = 0.99
    config.train.log_every = 10
    config.train.checkpoint_every = 50
    config.train.sample_every = 100
    config.train.num_samples = 2
    config.sampling.num_steps = 10
  return config
