r"""Decoder D^t: the spatiotemporal UNet that turns a CLIP image embedding (and fps) into 16 frames.

D^t is conditioned on the frozen CLIP's image embedding of a random frame of each clip (so it trains
on unlabelled video); at sampling time the prior's embedding of the caption takes its place.

Variants (the part after the colon):
  tiny: a ~0.3M-parameter model on 4 frames of 16x16 that trains and samples on one CPU core,
        conditioned on the shipped tiny CLIP (checkpoints/tiny/clip).
  base: 16 frames of 64x64 (the paper's D^t resolution), a mid-sized UNet for one accelerator.
  paper: 16 frames of 64x64 with a UNet sized like DALL-E 2's 64px decoder (~1.2B parameters).
  karlo: 16 frames of 64x64 on Kakao Brain's Karlo decoder (885M + 8M unCLIP projection), from its
        converted image weights (python -m mav_jax.convert karlo), training only the temporal
        layers and the fps embedding (docs/karlo.md).
  tiny_text: the tiny D^t made text-aware (beyond the paper, docs/text_motion.md): the caption
        steers motion (model.text_motion), trained on with a time per frame
        (diffusion.frame_noise) from the shipped paper-faithful tiny D^t (train.init_from); the
        recipe of checkpoints/tiny/decoder_text as one schedule (scripts/train_decoder_text.sh).

Train (images first, then video from that checkpoint with temporal layers added):
  python -m mav_jax.train --config configs/decoder.py:tiny --workdir workdirs/tiny_image \
      --config.data.kind=image
  python -m mav_jax.train --config configs/decoder.py:tiny --workdir workdirs/tiny_video \
      --config.train.init_from=workdirs/tiny_image
Override any field: --config.model.channels=32 (unknown fields are an error).
"""

import ml_collections

from mav_jax import config_defaults

VARIANTS = ("tiny", "tiny_text", "base", "paper", "karlo")


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

  if config.variant in ("tiny", "tiny_text"):
    config_defaults.make_tiny(config)
  if config.variant == "tiny_text":
    text = config.model.text_motion
    text.enabled = True
    text.vocab_size = 259  # the tiny CLIP's byte tokenizer: 256 bytes + 3 special tokens
    text.conv_size = 3
    # Half the clips train with a noise level per frame: the caption must say where things go.
    config.diffusion.frame_noise = 0.5
    config.diffusion.shift = 2.0
    config.diffusion.weighting = "plain"  # equal weight on every noise level
    config.data.fps_max = 4.0  # training clips at 2-4 fps
    config.batch_size = 16
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 100
    config.optimizer.final_lr_ratio = 0.05
    config.optimizer.text_lr_multiplier = 3.0  # the text pathway's learning rate: 3e-3
    config.train.init_from = "checkpoints/tiny/decoder"  # the shipped paper-faithful D^t
    config.train.num_steps = 4500
    config.train.checkpoint_every = 500
    config.train.sample_every = 0
  elif config.variant == "paper":
    config.model.channels = 320
    config.model.num_res_blocks = 3
    # Heads of 128 fill the TPU's 128-wide matmul units (the 960-wide level: 8 heads of 120). No
    # remat: 2 clips per v5p chip take ~40 GiB without it and the step is ~25% faster
    # (docs/benchmarks.md, "Per op"); on 16-32 GiB chips (v4, v5e, v6e) add
    # --config.model.remat=True.
    config.model.head_dim = 128
    config.model.remat = False
    config.batch_size = 256
  elif config.variant == "karlo":
    config_defaults.make_karlo_unet(config)
    config.batch_size = 256
  return config
