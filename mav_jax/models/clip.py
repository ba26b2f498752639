"""CLIP (Radford et al., 2021) in Flax: a text transformer and a vision transformer in one space.

C_x of the cascade is the text tower; the decoder is conditioned on the image tower's embedding of a
frame. The parameter tree follows the structure of OpenAI's / Hugging Face's CLIPModel closely enough
that `mav_jax.models.clip_convert` maps a PyTorch checkpoint onto it one tensor at a time.

Attributes of `ClipConfig` mirror Hugging Face's CLIPConfig names where they exist. A CLIP may
have no vision tower (`ClipConfig.vision = None`: a text encoder converted alone, such as Karlo's
`text_encoder/`): its parameters are the text tower's only, and asking it for image embeddings is
a UserError (`NO_VISION`).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mav_jax import errors
from mav_jax.models import axes
from mav_jax.models.attention import MultiHeadAttention
from mav_jax.models.common import Array, Dtype, dense, layer_norm

ACTIVATIONS = {
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
  "gelu": nn.gelu,  # tanh approximation
  "gelu_exact": lambda x: nn.gelu(x, approximate=False),  # erf, as torch.nn.GELU()
}

NO_VISION = (
  "this CLIP has no vision tower (it was converted from a text encoder alone, such as Karlo's "
  "text_encoder/), so it cannot embed images; convert the text encoder together with the vision "
  "tower of a full Hugging Face CLIPModel folder whose text tower is the same (for Karlo: "
  "openai/clip-vit-large-patch14) with mav_jax.models.clip_convert.load_hf_text_encoder(folder, "
  "vision_from=CLIPMODEL_FOLDER)"
)


@dataclasses.dataclass(frozen=True)
class TowerConfig:
  """One transformer tower.

  Attributes:
    width: hidden size.
    layers: residual attention blocks.
    heads: attention heads.
    mlp_ratio: MLP hidden size / width.
  """

  width: int = 512
  layers: int = 12
  heads: int = 8
  mlp_ratio: float = 4.0


@dataclasses.dataclass(frozen=True)
class ClipConfig:
  """CLIP's two towers and their shared embedding space.

  Attributes:
    embed_dim: joint embedding width (projection_dim).
    vocab_size: text vocabulary (49,408 for OpenAI's BPE).
    context_length: text tokens (77).
    text: the text tower.
    image_size: input image side.
    patch_size: ViT patch side.
    vision: the vision tower; None for a text-only CLIP (no vision tower and no logit scale).
    activation: a key of ACTIVATIONS: "quick_gelu" (OpenAI), "gelu_exact" (Hugging Face's "gelu")
      or "gelu" (flax's tanh approximation, kept for existing checkpoints).
    eos_token_id: the end-of-text id whose position pools the text (None: the highest id, as OpenAI).
  """

  embed_dim: int = 512
  vocab_size: int = 49408
  context_length: int = 77
  text: TowerConfig = TowerConfig()
  image_size: int = 224
  patch_size: int = 32
  vision: TowerConfig | None = TowerConfig(width=768, layers=12, heads=12)
  activation: str = "quick_gelu"
  eos_token_id: int | None = None

  @property
  def has_vision(self) -> bool:
    return self.vision is not None


def _project(x: Array, proj: Array, dtype: Dtype) -> Array:
  """The embedding projection in the compute dtype, its result kept in float32 (the contrastive
  loss normalises it and scales the similarities by up to 100)."""
  return jnp.matmul(x, proj.astype(dtype), preferred_element_type=jnp.float32)


class Block(nn.Module):
  """Pre-LayerNorm residual block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

  tower: TowerConfig
  activation: str
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, bias: Array | None = None) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    w, h = self.tower.width, self.tower.heads
    y = layer_norm("ln_1", **kw)(x)
    x = x + MultiHeadAttention(h, w // h, name="attn", **kw)(y, bias=bias)
    y = layer_norm("ln_2", **kw)(x)
    y = dense(int(w * self.tower.mlp_ratio), axes.CHANNELS_IN, axes.MLP, name="fc1", **kw)(y)
    y = ACTIVATIONS[self.activation](y)
    return x + dense(w, axes.MLP, axes.CHANNELS_OUT, name="fc2", **kw)(y)


class TextTower(nn.Module):
  """Causal transformer over BPE tokens, pooled at the end-of-text token and projected."""

  config: ClipConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: Array) -> tuple[Array, Array]:
    """tokens [b, l] int -> (float32 embedding [b, embed_dim], token features [b, l, width])."""
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    w, length = c.text.width, tokens.shape[1]
    if length > c.context_length:
      raise errors.UserError(f"{length} tokens exceed the context length {c.context_length}")
    embed = self.param(
      "token_embedding",
      axes.partitioned(nn.initializers.normal(0.02), axes.EMBED_IN, axes.CHANNELS_OUT),
      (c.vocab_size, w),
      self.param_dtype,
    )
    pos = self.param(
      "positional_embedding",
      axes.partitioned(nn.initializers.normal(0.01), axes.POSITION, axes.CHANNELS_OUT),
      (c.context_length, w),
      self.param_dtype,
    )
    x = (jnp.take(embed, tokens, axis=0) + pos[:length]).astype(self.dtype)
    causal = jnp.tril(jnp.ones((length, length), bool))
    bias = jnp.where(causal, 0.0, -1e9)[None, None].astype(jnp.float32)
    for i in range(c.text.layers):
      x = Block(c.text, c.activation, name=f"block_{i}", **kw)(x, bias)
    x = layer_norm("ln_final", **kw)(x)
    if c.eos_token_id is None:
      pool = jnp.argmax(tokens, axis=-1)  # OpenAI: the end-of-text token has the highest id
    else:
      pool = jnp.argmax(tokens == c.eos_token_id, axis=-1)
    pooled = jnp.take_along_axis(x, pool[:, None, None], axis=1)[:, 0]
    proj = self.param(
      "projection",
      axes.partitioned(nn.initializers.normal(w**-0.5), axes.CHANNELS_IN, axes.CONTEXT),
      (w, c.embed_dim),
      self.param_dtype,
    )
    return _project(pooled, proj, self.dtype), x


class VisionTower(nn.Module):
  """ViT over image patches, the class token projected."""

  config: ClipConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: Array) -> Array:
    """images [b, h, w, 3] (CLIP-normalised) -> float32 embedding [b, embed_dim]."""
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    w, p = c.vision.width, c.patch_size
    if images.shape[1:3] != (c.image_size, c.image_size):
      raise errors.UserError(
        f"images must be {c.image_size}x{c.image_size}, got {images.shape[1:3]}"
      )
    x = nn.Conv(
      w,
      (p, p),
      strides=(p, p),
      padding="VALID",
      use_bias=False,
      name="patch_embed",
      kernel_init=axes.partitioned(
        nn.initializers.lecun_normal(),
        axes.CONV_H,
        axes.CONV_W,
        axes.CHANNELS_IN,
        axes.CHANNELS_OUT,
      ),
      **kw,
    )(images.astype(self.dtype))
    b = x.shape[0]
    x = x.reshape(b, -1, w)
    cls = self.param(
      "class_embedding",
      axes.partitioned(nn.initializers.normal(w**-0.5), axes.CHANNELS_OUT),
      (w,),
      self.param_dtype,
    )
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, w)), x], axis=1)
    pos = self.param(
      "positional_embedding",
      axes.partitioned(nn.initializers.normal(w**-0.5), axes.POSITION, axes.CHANNELS_OUT),
      (x.shape[1], w),
      self.param_dtype,
    )
    x = layer_norm("ln_pre", **kw)(x + pos.astype(self.dtype))
    for i in range(c.vision.layers):
      x = Block(c.vision, c.activation, name=f"block_{i}", **kw)(x)
    x = layer_norm("ln_post", **kw)(x[:, 0])
    proj = self.param(
      "projection",
      axes.partitioned(nn.initializers.normal(w**-0.5), axes.CHANNELS_IN, axes.CONTEXT),
      (w, c.embed_dim),
      self.param_dtype,
    )
    return _project(x, proj, self.dtype)


class CLIP(nn.Module):
  """Both towers and the learned temperature of the contrastive loss; the text tower alone when
  `config.vision` is None (then the image methods raise a UserError)."""

  config: ClipConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.text = TextTower(self.config, name="text", **kw)
    if not self.config.has_vision:
      return
    self.vision = VisionTower(self.config, name="vision", **kw)
    self.logit_scale = self.param(
      "logit_scale",
      axes.partitioned(nn.initializers.constant(jnp.log(1 / 0.07))),
      (),
      self.param_dtype,
    )

  def encode_text(self, tokens: Array) -> Array:
    return self.text(tokens)[0]

  def encode_image(self, images: Array) -> Array:
    if not self.config.has_vision:
      raise errors.UserError(NO_VISION)
    return self.vision(images)

  def __call__(self, tokens: Array, images: Array) -> tuple[Array, Array, Array]:
    """(text embeddings, image embeddings, logit scale); embeddings are float32, not
    normalised."""
    return self.encode_text(tokens), self.encode_image(images), self.logit_scale
