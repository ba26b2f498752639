"""Config sections shared by every stage (data, optimizer, mesh, sharding, training loop).

Stage configs (`configs/<stage>.py`) start from these and override what differs; every default has a
one-line comment here.
"""

import ml_collections


def new_config(stage: str, arg: str | None, variants: tuple[str, ...]) -> ml_collections.ConfigDict:
  """A config for `stage` with the variant parsed from `arg` (the first variant when empty)."""
  variant = arg or variants[0]
  if variant not in variants:
    raise ValueError(f"unknown {stage} variant {variant!r}; choose one of {variants}")
  config = ml_collections.ConfigDict()
  # Name of the cascade stage this config trains.
  config.stage = stage
  # Which named variant this is.
  config.variant = variant
  # Seed of parameter initialisation, data and sampling.
  config.seed = 0
  return config


def add_data(config: ml_collections.ConfigDict) -> None:
  """`config.data`: what an example is and where it comes from (mav_jax.data)."""
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


def add_optimizer(config: ml_collections.ConfigDict) -> None:
  """`config.optimizer` and `config.batch_size`."""
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


def add_runtime(config: ml_collections.ConfigDict) -> None:
  """`config.mesh`, `config.sharding` and `config.train` (mav_jax.parallel, mav_jax.train)."""
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
