r"""Prior P: a diffusion transformer from a caption (CLIP text embedding and token features) to a
CLIP image embedding, trained on image-text pairs only (never on video), as in DALL-E 2.

Variants:
  tiny: a 4-layer, width-128 prior over the shipped tiny CLIP (embedding 32).
  paper: DALL-E 2's prior shape (width 2048, 24 layers) over CLIP ViT-B/32 (configs/clip.py:base).
  karlo: Kakao Brain's Karlo prior (1.02B; width 2048, 20 layers, causal, over ViT-L/14's raw
        embeddings), as `python -m mav_jax.convert karlo` writes it: the form its converted
        weights load into (docs/karlo.md).

Train (the CLIP checkpoint is read frozen):
  python -m mav_jax.train --config configs/prior.py:tiny --workdir workdirs/prior \
      --config.conditioning.clip=workdirs/clip
"""

import ml_collections

from mav_jax import config_defaults

VARIANTS = ("tiny", "paper", "karlo")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the prior config for variant `arg` (default "tiny")."""
  config = config_defaults.new_config("prior", arg, VARIANTS)
  config_defaults.add_data(config)
  # Image-text pairs: image captions (shape and colour), one image each.
  config.data.kind = "image"
  config.data.resolution = 224
  config.data.tokenizer = "clip_bpe"
  config.data.max_tokens = 77
  config_defaults.add_conditioning(config, clip="workdirs/clip")

  # The prior transformer (mav_jax.models.prior.DiffusionPrior).
  config.model = ml_collections.ConfigDict()
  # Transformer width.
  config.model.width = 2048
  # Transformer blocks.
  config.model.layers = 24
  # Attention heads.
  config.model.heads = 32
  # MLP activation ("gelu" tanh-approximate, "gelu_exact", "quick_gelu").
  config.model.activation = "gelu"
  # Causal attention mask over the whole sequence (Karlo's prior).
  config.model.causal = False
  # Multiplier of the diffusion time before its sinusoidal features (1: integer timesteps).
  config.model.time_scale = 1000.0
  # Learned CLIP image-embedding mean and std the network's space is normalised by (Karlo's).
  config.model.clip_stats = False
  # Compute dtype.
  config.model.dtype = "bfloat16"
  # Parameter dtype.
  config.model.param_dtype = "float32"

  # Diffusion over the (scaled-unit) image embedding: DALL-E 2 predicts the clean embedding.
  config.diffusion = ml_collections.ConfigDict()
  # Noise schedule kind.
  config.diffusion.schedule = "cosine"
  # Resolution shift (none for embeddings).
  config.diffusion.shift = 1.0
  # Parameterisation: the clean embedding.
  config.diffusion.target = "x0"
  # Loss weighting.
  config.diffusion.weighting = "plain"
  # Gamma of min-SNR weighting (unused with "plain").
  config.diffusion.min_snr_gamma = 5.0
  # Probability of dropping the caption (classifier-free guidance).
  config.diffusion.cond_dropout = 0.1

  # Sampling.
  config.sampling = ml_collections.ConfigDict()
  # "ddpm", "ddim" or "dpm++2m".
  config.sampling.sampler = "ddim"
  # Model evaluations per sample.
  config.sampling.num_steps = 64
  # DDIM eta.
  config.sampling.eta = 0.0
  # Classifier-free guidance scale.
  config.sampling.guidance_scale = 2.0
  # Discrete schedule ("squaredcos_cap_v2"): the x0 prediction is clipped to +-clip_x0.
  config.sampling.clip_x0 = 1.0

  config_defaults.add_optimizer(config)
  config.optimizer.weight_decay = 0.05
  config.batch_size = 256
  config_defaults.add_runtime(config)
  config.train.sample_every = 0  # the prior writes no videos

  if config.variant == "tiny":
    config.data.resolution = 16
    config.data.tokenizer = "byte"
    config.data.max_tokens = 32
    config.data.num_threads = 1
    config.conditioning.clip = config_defaults.TINY_CLIP
    config.conditioning.embedding_dim = 32
    config.conditioning.text_width = 32
    config.model.width = 128
    config.model.layers = 4
    config.model.heads = 4
    config.model.dtype = "float32"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 10
    config.optimizer.weight_decay = 0.0
    config.batch_size = 16
    config.train.num_steps = 300
    config.train.ema_decay = 0.99
    config.train.log_every = 25
    config.train.checkpoint_every = 100
    config.sampling.num_steps = 16
  elif config.variant == "karlo":
    config.data.tokenizer_path = f"{config_defaults.KARLO}/clip/tokenizer/merges.txt"
    config.conditioning.clip = f"{config_defaults.KARLO}/clip"
    config.conditioning.embedding_dim = 768
    config.conditioning.text_width = 768
    config.model.layers = 20
    config.model.activation = "gelu_exact"
    config.model.causal = True
    config.model.time_scale = 1.0
    config.model.clip_stats = True
    config.conditioning.embedding_norm = "raw"
    config.diffusion.schedule = "squaredcos_cap_v2"
    config.sampling.sampler = "ddpm"
    config.sampling.num_steps = 25
    config.sampling.guidance_scale = 4.0
    config.sampling.clip_x0 = 5.0
  return config
