r"""CLIP (C_x and the image encoder): contrastive training on image-text pairs.

Variants (the part after the colon):
  tiny: a small CLIP on 16x16 synthetic images and byte-level captions, for this CPU.
  base: ViT-B/32 shapes (OpenAI's CLIP ViT-B/32: 224px images, 77 tokens, 49,408-token BPE).
  vit_l14: ViT-L/14 shapes (OpenAI's CLIP ViT-L/14, the one Karlo reads: 768-wide embeddings and
        text tower, a 24-layer 1024-wide vision tower on 14px patches); the shape the Karlo
        stages' benchmarks read (--clip_config), weights from `mav_jax.convert karlo --vision`.

Train on the synthetic image-text pairs:
  python -m mav_jax.train --config configs/clip.py:tiny --workdir workdirs/clip_tiny
Pretrained OpenAI / Hugging Face weights load with mav_jax.models.clip_convert instead.
"""

import ml_collections

from mav_jax import config_defaults

VARIANTS = ("tiny", "base", "vit_l14")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the CLIP config for variant `arg` (default "tiny")."""
  config = config_defaults.new_config("clip", arg, VARIANTS)

  config_defaults.add_data(config)
  # CLIP trains on single images with captions of shape and colour.
  config.data.kind = "image"
  config.data.resolution = 224
  config.data.tokenizer = "clip_bpe"
  config.data.max_tokens = 77

  # CLIP towers (mav_jax.models.clip).
  config.model = ml_collections.ConfigDict()
  # Joint embedding width.
  config.model.embed_dim = 512
  # Text vocabulary (must cover the tokenizer's ids).
  config.model.vocab_size = 49408
  # Text tower width, layers and heads.
  config.model.text_width = 512
  # Text tower depth.
  config.model.text_layers = 12
  # Text tower heads.
  config.model.text_heads = 8
  # ViT patch side.
  config.model.patch_size = 32
  # Vision tower width.
  config.model.vision_width = 768
  # Vision tower depth.
  config.model.vision_layers = 12
  # Vision tower heads.
  config.model.vision_heads = 12
  # MLP activation: "quick_gelu" (OpenAI) or "gelu".
  config.model.activation = "quick_gelu"
  # End-of-text id that pools the text (-1: the highest id, as OpenAI's BPE).
  config.model.eos_token_id = -1
  # Compute dtype.
  config.model.dtype = "bfloat16"
  # Parameter dtype.
  config.model.param_dtype = "float32"

  config_defaults.add_optimizer(config)
  config.optimizer.learning_rate = 5e-4
  config.optimizer.weight_decay = 0.2
  config.optimizer.b2 = 0.98
  config.batch_size = 256
  config_defaults.add_runtime(config)
  config.train.sample_every = 0  # CLIP has no samples to write

  if config.variant == "tiny":
    config.data.resolution = 16
    config.data.tokenizer = "byte"
    config.data.max_tokens = 32
    config.data.num_threads = 1
    config.model.embed_dim = 32
    config.model.vocab_size = 259  # the byte tokenizer
    config.model.text_width = 32
    config.model.text_layers = 2
    config.model.text_heads = 2
    config.model.patch_size = 4
    config.model.vision_width = 32
    config.model.vision_layers = 2
    config.model.vision_heads = 2
    config.model.eos_token_id = 2  # the byte tokenizer's end token
    config.model.dtype = "float32"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 10
    config.optimizer.weight_decay = 0.0
    config.batch_size = 16
    config.train.num_steps = 300
    config.train.ema_decay = 0.99
    config.train.log_every = 25
    config.train.checkpoint_every = 100
  elif config.variant == "vit_l14":
    config.model.embed_dim = 768
    config.model.text_width = 768
    config.model.text_heads = 12
    config.model.patch_size = 14
    config.model.vision_width = 1024
    config.model.vision_layers = 24
    config.model.vision_heads = 16
  return config
