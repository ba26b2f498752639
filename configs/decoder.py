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

VARIANTS = ("tiny", "base")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the decoder config for variant `arg` (default "tiny")."""
  variant = arg or "tiny"
  if variant not in VARIANTS:
    raise ValueError(f"unknown decoder variant {variant!r}; choose one of {VARIANTS}")
  config = ml_collections.ConfigDict()
  # Name of the cascade stage this config trains.
  config.stage = "decoder"
  # Which named variant this is.
  config.variant = variant
  # Seed of parameter initialisation, data and sampling.
  config.seed = 0

  # Data (mav_jax.data): what a clip is and where it comes from.
  config.data = ml_collections.ConfigDict()
  # "synthetic" (the embedded shapes-in-motion world) or a folder made by mav_jax.data.prepare.
  config.data.source = "synthetic"
  # Prepared folder for evaluation when `source` is a folder ("" for none).
  config.data.eval_source = ""
  # "video" clips (temporal training) or "image" single frames (spatial training).
  config.data.kind = "video"
  # Frames per clip (the paper's D^t makes 16).
  config.data.num_frames = 16
  # Height and width of each frame.
  config.data.resolution = 64
  # Clip frame rate: fps_min + (fps_max - fps_min) * Beta(fps_alpha, fps_beta) per clip.
  config.data.fps_min = 1.0
  # Highest clip frame rate.
  config.data.fps_max = 30.0
  # Beta distribution of the clip frame rate (1, 1: uniform).
  config.data.fps_alpha = 1.0
  # Second shape parameter of the fps Beta distribution.
  config.data.fps_beta = 1.0
  # > 0: a fixed frame skip instead of a random fps.
  config.data.frame_skip = 0
  # Random interpolation / extrapolation frame masks (the interpolation stage).
  config.data.frame_masks = False
  # Random instead of centre crops of real videos.
  config.data.random_crop = True
  # Synthetic world: number of training scenes.
  config.data.num_train = 100_000
  # Synthetic world: number of evaluation scenes (every shape, colour, direction in turn).
  config.data.num_eval = 600
  # Seed of the synthetic world.
  config.data.seed = 0
  # Caption tokenizer: "byte", "sentencepiece" or "clip_bpe".
  config.data.tokenizer = "byte"
  # Tokenizer file (SentencePiece model or CLIP merges file); "" for "byte".
  config.data.tokenizer_path = ""
  # Caption length in tokens.
  config.data.max_tokens = 77
  # Threads reading and transforming records, per host.
  config.data.num_threads = 4
  # Worker processes per host for decoding (0: threads only).
  config.data.worker_count = 0
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
  config.optimizer = ml_collections.ConfigDict()
  # Peak learning rate.
  config.optimizer.learning_rate = 1e-4
  # Steps of linear warmup.
  config.optimizer.warmup_steps = 1000
  # Final learning rate as a fraction of the peak.
  config.optimizer.final_lr_ratio = 0.1
  # AdamW weight decay.
  config.optimizer.weight_decay = 0.0
  # Adam beta1.
  config.optimizer.b1 = 0.9
  # Adam beta2.
  config.optimizer.b2 = 0.99
  # Global gradient-norm clip.
  config.optimizer.grad_clip = 1.0
  # Examples per step, over all hosts.
  config.batch_size = 8
  # Training steps of the demo (mav_jax.demo).
  config.demo_steps = 20

  # Device mesh (mav_jax.parallel.mesh): axis names, sizes within a slice, sizes across slices.
  config.mesh = ml_collections.ConfigDict()
  # Mesh axis names.
  config.mesh.axes = ("data", "fsdp", "tensor")
  # Sizes inside one slice (one -1 is inferred from the device count).
  config.mesh.ici = (1, -1, 1)
  # Sizes across slices (multi-slice TPU); (1, 1, 1) on one slice.
  config.mesh.dcn = (1, 1, 1)
  # Sharding strategy: data_parallel, fsdp, tensor or fsdp_tensor (mav_jax.parallel.sharding).
  config.sharding = ml_collections.ConfigDict()
  # Name of the strategy (its logical-axis rule table).
  config.sharding.strategy = "fsdp"

  # Training loop (mav_jax.train).
  config.train = ml_collections.ConfigDict()
  # Total optimizer steps.
  config.train.num_steps = 100_000
  # Micro-batches per step (gradient accumulation); batch_size must divide by it.
  config.train.grad_accum_steps = 1
  # EMA decay of the parameters used for sampling.
  config.train.ema_decay = 0.9999
  # "all" parameters, or only the "temporal" layers (spatial layers frozen).
  config.train.trainable = "all"
  # Image-stage checkpoint (workdir or step folder) to start a video stage from ("" for none).
  config.train.init_from = ""
  # Log metrics every this many steps.
  config.train.log_every = 100
  # Save a checkpoint every this many steps (and at the end, and on SIGTERM).
  config.train.checkpoint_every = 1000
  # Checkpoints kept.
  config.train.checkpoint_keep = 3
  # Save checkpoints in the background.
  config.train.async_checkpoints = True
  # Write sample videos every this many steps (0: never).
  config.train.sample_every = 5000
  # Videos per sample write.
  config.train.num_samples = 4
  # Capture a profile (clu.periodic_actions.Profile) early in the run.
  config.train.profile = False
  # Testing only: SIGKILL the process right after saving the checkpoint at this step (which must
  # be a checkpoint step; 0: never).
  config.train.kill_at_step = 0

  if variant == "tiny":
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
