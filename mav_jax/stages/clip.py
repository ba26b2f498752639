"""CLIP stage (C_x and the image encoder): contrastive training on image-text pairs.

The symmetric InfoNCE loss of CLIP over the global batch: each image's caption is its positive and
every other caption in the batch a negative, and vice versa. On the embedded default this trains on
the synthetic image-text pairs (captions name shape and colour), so the cascade needs no download;
pretrained OpenAI / Hugging Face weights load through `mav_jax.models.clip_convert` instead.
"""

import jax
import jax.numpy as jnp
import optax

from mav_jax.models.clip import CLIP, ClipConfig, TowerConfig
from mav_jax.models.common import Array
from mav_jax.stages.common import IMAGE_MEAN, IMAGE_STD


def clip_config(config) -> ClipConfig:
  """The ClipConfig of a stage config's `model` section."""
  m = config.model
  return ClipConfig(
    embed_dim=m.embed_dim,
    vocab_size=m.vocab_size,
    context_length=config.data.max_tokens,
    text=TowerConfig(m.text_width, m.text_layers, m.text_heads),
    image_size=config.data.resolution,
    patch_size=m.patch_size,
    vision=TowerConfig(m.vision_width, m.vision_layers, m.vision_heads),
    activation=m.activation,
    eos_token_id=m.eos_token_id if m.eos_token_id >= 0 else None,
  )


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
