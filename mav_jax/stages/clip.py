"""CLIP stage (C_x and the image encoder): contrastive training on image-text pairs.

The symmetric InfoNCE loss of CLIP over the global batch: each image's caption is its positive and
every other caption in the batch a negative, and vice versa. On the embedded default this trains on
the synthetic image-text pairs (captions name shape and colour), so the cascade needs no download;
pretrained OpenAI / Hugging Face weights load through `mav_jax.models.clip_convert` instead, and
`write_clip_folder` writes them as a model folder that `conditioning.clip` can name.

In a stage config, `model.vision_width = 0` means a CLIP with no vision tower (a text encoder
converted alone); `model.text_mlp_ratio` / `model.vision_mlp_ratio`, absent from configs/clip.py,
default to 4 (OpenAI's).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mav_jax import config_defaults, errors
from mav_jax.models.clip import CLIP, ClipConfig, TowerConfig
from mav_jax.models.common import Array
from mav_jax.stages.common import IMAGE_MEAN, IMAGE_STD

# The tokenizer's merges file inside a model folder written by `write_clip_folder`
# (`data.tokenizer_path` names it relative to the folder; FrozenClip.tokenizer reads it there).
TOKENIZER_DIR = "tokenizer"


def clip_config(config) -> ClipConfig:
  """The ClipConfig of a stage config's `model` section."""
  m = config.model
  vision = None
  if m.vision_width:
    vision = TowerConfig(
      m.vision_width, m.vision_layers, m.vision_heads, m.get("vision_mlp_ratio", 4.0)
    )
  return ClipConfig(
    embed_dim=m.embed_dim,
    vocab_size=m.vocab_size,
    context_length=config.data.max_tokens,
    text=TowerConfig(m.text_width, m.text_layers, m.text_heads, m.get("text_mlp_ratio", 4.0)),
    image_size=config.data.resolution,
    patch_size=m.patch_size,
    vision=vision,
    activation=m.activation,
    eos_token_id=m.eos_token_id if m.eos_token_id >= 0 else None,
  )


def stage_config(
  clip: ClipConfig, tokenizer_path: str, dtype: str = "float32"
) -> ml_collections.ConfigDict:
  """A CLIP stage config that `clip_config` turns back into `clip` (the inverse), with CLIP BPE
  tokens from the merges file `tokenizer_path`: the config.json of a converted model folder."""
  config = config_defaults.new_config("clip", "converted", ("converted",))
  config_defaults.add_data(config)
  config.data.kind = "image"
  config.data.resolution = clip.image_size
  config.data.tokenizer = "clip_bpe"
  config.data.tokenizer_path = tokenizer_path
  config.data.max_tokens = clip.context_length
  vision = clip.vision or TowerConfig(0, 0, 0)
  config.model = ml_collections.ConfigDict(
    dict(
      embed_dim=clip.embed_dim,
      vocab_size=clip.vocab_size,
      text_width=clip.text.width,
      text_layers=clip.text.layers,
      text_heads=clip.text.heads,
      text_mlp_ratio=float(clip.text.mlp_ratio),
      patch_size=clip.patch_size,
      vision_width=vision.width,  # 0: no vision tower
      vision_layers=vision.layers,
      vision_heads=vision.heads,
      vision_mlp_ratio=float(vision.mlp_ratio),
      activation=clip.activation,
      eos_token_id=-1 if clip.eos_token_id is None else clip.eos_token_id,
      dtype=dtype,
      param_dtype="float32",
    )
  )
  config_defaults.add_optimizer(config)
  config_defaults.add_runtime(config)
  config.train.sample_every = 0
  if clip_config(config) != clip:
    raise ValueError(f"stage_config does not round-trip: {clip_config(config)} != {clip}")
  return config


def write_clip_folder(
  output: str,
  clip: ClipConfig,
  params,
  merges_file: str,
  vocab_file: str | None = None,
  dtype: str = "float32",
  overwrite: bool = False,
) -> ml_collections.ConfigDict:
  """Writes converted CLIP weights as a model folder that `conditioning.clip` (and --clip) reads,
  the layout `mav_jax.export` writes: `config.json` (a CLIP stage config, `stage_config`),
  `params/` (Orbax), plus `tokenizer/` holding a copy of `merges_file` (and of `vocab_file`).

  The tokenizer is checked first: the vocabulary the merges build must have `clip.vocab_size`
  ids, equal `vocab_file` (Hugging Face's vocab.json) when given, and end with the end-of-text id
  that `clip` pools at. `params` must have the tree `CLIP(clip)` initialises. The folder is written
  beside `output` first and swapped in; an existing `output` is replaced only with `overwrite`.
  Returns the stage config.
  """
  from etils import epath

  from mav_jax import checkpointing
  from mav_jax.data import tokenizers

  checkpointing.check_new_output(output, overwrite)
  tokenizer = tokenizers.ClipBpeTokenizer(merges_file)
  if vocab_file:
    tokenizers.check_clip_vocab(tokenizer, vocab_file)
  if tokenizer.vocab_size != clip.vocab_size:
    raise errors.UserError(
      f"{merges_file} makes a vocabulary of {tokenizer.vocab_size} tokens, the text encoder "
      f"embeds {clip.vocab_size}; use the tokenizer of this text encoder"
    )
  if clip.eos_token_id is not None and clip.eos_token_id != tokenizer.eos_id:
    raise errors.UserError(
      f"the text encoder pools at token {clip.eos_token_id}, the tokenizer's end of text is "
      f"{tokenizer.eos_id}"
    )
  merges_name = "merges.txt.gz" if merges_file.endswith(".gz") else "merges.txt"
  config = stage_config(clip, f"{TOKENIZER_DIR}/{merges_name}", dtype)
  model = make_model(config)
  abstract = jax.eval_shape(lambda: init(model, config, jax.random.key(0)))
  shapes = jax.tree.map(lambda a: tuple(a.shape), nn.unbox(abstract))
  given = jax.tree.map(lambda a: tuple(a.shape), params)
  if shapes != given:
    raise ValueError(f"the params do not have the tree of CLIP({clip}): {given} != {shapes}")

  files = {f"{TOKENIZER_DIR}/{merges_name}": epath.Path(merges_file).read_bytes()}
  if vocab_file:
    files[f"{TOKENIZER_DIR}/vocab.json"] = epath.Path(vocab_file).read_bytes()
  checkpointing.write_model(output, config, params, overwrite, files)
  return config


def make_model(config) -> CLIP:
  return CLIP(
    clip_config(config),
    dtype=jnp.dtype(config.model.dtype),
    param_dtype=jnp.dtype(config.model.param_dtype),
  )


def preprocess(frames: Array) -> Array:
  """uint8 frames [b, 1, h, w, 3] (or [b, h, w, 3]) -> CLIP-normalised float images [b, h, w, 3]."""
  images = frames[:, 0] if frames.ndim == 5 else frames
  return (images.astype(jnp.float32) / 255.0 - IMAGE_MEAN) / IMAGE_STD


def init(model: CLIP, config, rng: Array):
  d = config.data
  tokens = jnp.zeros((1, d.max_tokens), jnp.int32)
  if not model.config.has_vision:  # a text encoder alone: its text tower's params only
    return model.init(rng, tokens, method=CLIP.encode_text)["params"]
  images = jnp.zeros((1, d.resolution, d.resolution, 3))
  return model.init(rng, tokens, images)["params"]


def contrastive_loss(text: Array, image: Array, logit_scale: Array) -> tuple[Array, Array]:
  """Symmetric InfoNCE over the batch -> (loss, image-to-text top-1 accuracy).

  In float32 whatever the towers' compute dtype: the normalised features, their products and the
  logits (scaled by up to 100: in bfloat16 a logit near 100 would be off by up to 0.25).
  """
  text, image = text.astype(jnp.float32), image.astype(jnp.float32)
  text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
  image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
  scale = jnp.exp(jnp.minimum(logit_scale.astype(jnp.float32), jnp.log(100.0)))
  logits = scale * jnp.matmul(image, text.T, precision=jax.lax.Precision.HIGHEST)
  labels = jnp.arange(logits.shape[0])
  loss = (
    optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
  ) / 2
  return loss, jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def loss_fn(model: CLIP, config, params, batch, rng: Array, frozen=None):
  del rng, config, frozen
  text, image, scale = model.apply({"params": params}, batch["tokens"], preprocess(batch["frames"]))
  loss, accuracy = contrastive_loss(text, image, scale)
  return loss, {"loss": loss, "accuracy": accuracy}


def embed_text(model: CLIP, params, tokens: Array) -> Array:
  return model.apply({"params": params}, tokens, method=CLIP.encode_text)


def embed_images(model: CLIP, params, frames: Array) -> Array:
  return model.apply({"params": params}, preprocess(frames), method=CLIP.encode_image)
