"""Pieces every cascade stage shares: model-space frames and the frozen CLIP that conditions them.

Stages that condition on CLIP (prior, D^t, ↑F) read a CLIP model checkpoint named by
`config.conditioning.clip` (a training workdir or a model exported by `mav_jax.export`). CLIP is
frozen: its parameters are not part of the train state; the trainer places them on the mesh with the
same sharding rules as the trained model and passes them to the loss as `frozen["clip"]`.

Embeddings are L2-normalised and scaled by sqrt(width), so each component has unit variance: the
prior's diffusion target and the UNet's conditioning input are then on the scale of the noise.
"""

import dataclasses
import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mav_jax import checkpointing, errors, paths
from mav_jax.models.common import Array
from mav_jax.parallel import sharding

# CLIP's input normalisation (OpenAI's image mean and std).
IMAGE_MEAN = jnp.array([0.48145466, 0.4578275, 0.40821073])
IMAGE_STD = jnp.array([0.26862954, 0.26130258, 0.27577711])


def to_model_space(frames: Array) -> Array:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return frames.astype(jnp.float32) / 127.5 - 1.0


def clip_resize_and_crop(images: Array, size: int) -> Array:
  """OpenAI CLIP's image transform on floats: [b, h, w, c] in [0, 1] -> [b, size, size, c] in [0, 1].

  As clip.load's preprocess (torchvision Resize(size, BICUBIC) then CenterCrop(size) on PIL
  images): the shorter side becomes `size` and the longer int(size * long / short) (torchvision's
  rounding), resampled as PIL does: bicubic (Keys, a = -0.5) with the kernel widened when
  shrinking (antialiasing), width first, then height, each pass clipped to [0, 1] (PIL's 8-bit
  passes clip the overshoot); then the centre size x size crop (offsets rounded as CenterCrop
  does). PIL also rounds each pass to 8 bits, which floats skip: the two differ by under 1.25
  grey levels (tests/test_clip.py, on real photos).
  """
  b, h, w, c = images.shape
  if (h, w) == (size, size):
    return images
  short, long = min(h, w), max(h, w)
  new_long = int(size * long / short)
  new_h, new_w = (size, new_long) if h <= w else (new_long, size)
  if new_w != w:
    images = jnp.clip(jax.image.resize(images, (b, h, new_w, c), "bicubic", antialias=True), 0, 1)
  if new_h != h:
    images = jnp.clip(
      jax.image.resize(images, (b, new_h, new_w, c), "bicubic", antialias=True), 0, 1
    )
  top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
  return images[:, top : top + size, left : left + size]


def scaled_unit(x: Array) -> Array:
  """x / |x| * sqrt(width): unit-variance components."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12) * x.shape[-1] ** 0.5


@dataclasses.dataclass(frozen=True)
class FrozenClip:
  """A CLIP model definition and where its parameters are (they are loaded and placed separately).

  Attributes:
    path: the checkpoint (resolved).
    config: the CLIP stage config the checkpoint was trained with.
  """

  path: str
  config: Any

  @functools.cached_property
  def module(self):
    from mav_jax.stages import clip as clip_stage

    return clip_stage.make_model(self.config)

  @property
  def embed_dim(self) -> int:
    return int(self.config.model.embed_dim)

  @property
  def has_vision(self) -> bool:
    """False for a text encoder converted alone (`model.vision_width = 0`): no image embeddings."""
    return "model" not in self.config or bool(self.config.model.vision_width)

  def init_fn(self):
    """rng -> boxed CLIP parameters (random: for shapes, shardings and benchmarks)."""
    from mav_jax.stages import clip as clip_stage

    return functools.partial(clip_stage.init, self.module, self.config)

  def shardings(self, mesh: jax.sharding.Mesh, strategy: str) -> tuple[Any, Any]:
    """(abstract parameters, their shardings on `mesh` by `strategy`'s rules)."""
    boxed = jax.eval_shape(self.init_fn(), jax.random.key(0))
    return nn.unbox(boxed), sharding.tree_shardings(boxed, sharding.strategy_rules(strategy), mesh)

  def load(self, mesh: jax.sharding.Mesh, strategy: str) -> Any:
    """The parameters on `mesh`, sharded by `strategy`'s rules like a trained model's."""
    abstract, shardings = self.shardings(mesh, strategy)

    def shapes(tree):
      return {
        jax.tree_util.keystr(p): tuple(a.shape)
        for p, a in jax.tree_util.tree_leaves_with_path(tree)
      }

    if shapes(checkpointing.params_metadata(self.path)) != shapes(abstract):
      raise errors.UserError(
        f"{self.path}: the parameters do not match the CLIP config saved with them"
      )
    # Each host reads only the slices its devices hold.
    return checkpointing.restore_params(self.path, shardings=shardings)

  def image_embedding(self, params: Any, images: Array, raw: bool = False) -> Array:
    """Model-space images [b, h, w, 3] in [-1, 1] -> scaled-unit CLIP image embeddings [b, d]
    (with `raw`, the projection as it is: Karlo's models read raw embeddings).

    Images of another size are brought to CLIP's input size as OpenAI's CLIP does
    (`clip_resize_and_crop`: shorter side bicubic, centre crop). A CLIP with no vision tower
    raises a UserError saying how to convert one with it."""
    if not self.has_vision:
      from mav_jax.models import clip

      raise errors.UserError(f"the CLIP at {self.path!r}: {clip.NO_VISION}")
    size = int(self.config.data.resolution)
    images = clip_resize_and_crop((images.astype(jnp.float32) + 1.0) / 2.0, size)
    images = (images - IMAGE_MEAN) / IMAGE_STD
    embedding = self.module.apply({"params": params}, images, method=type(self.module).encode_image)
    return embedding.astype(jnp.float32) if raw else scaled_unit(embedding)

  def null_tokens(self, batch: int) -> tuple[Array, Array]:
    """(ids, mask) [batch, max_tokens] of the empty caption "": Karlo's null condition (its
    encoding, not zeros, is what the unconditional branch of guidance reads)."""
    from mav_jax.data import tokenizers

    ids, mask = tokenizers.tokenize_batch(self.tokenizer, [""], int(self.config.data.max_tokens))
    return (
      jnp.broadcast_to(jnp.asarray(ids), (batch, ids.shape[1])),
      jnp.broadcast_to(jnp.asarray(mask, bool), (batch, mask.shape[1])),
    )

  @functools.cached_property
  def tokenizer(self):
    """The tokenizer of the captions this CLIP was trained on. A relative `data.tokenizer_path`
    that exists inside the CLIP's folder is read there (a converted model folder carries its
    merges file, `stages.clip.write_clip_folder`); otherwise as `paths.resolve` finds it."""
    from mav_jax.data import tokenizers

    d = self.config.data
    path = d.tokenizer_path
    inside = os.path.join(self.path, path) if path and not os.path.isabs(path) else ""
    path = inside if inside and os.path.isfile(inside) else paths.resolve(path)
    return tokenizers.make_tokenizer(d.tokenizer, path or None)

  def text(self, params: Any, tokens: Array, raw: bool = False) -> tuple[Array, Array]:
    """Token ids [b, l] -> (scaled-unit text embeddings [b, d], or with `raw` the projection as
    it is (Karlo's models read raw embeddings), token features [b, l, width])."""
    embedding, features = self.module.apply({"params": params}, tokens, method=_text_tower)
    embedding = embedding.astype(jnp.float32) if raw else scaled_unit(embedding)
    return embedding, features.astype(jnp.float32)


def use_clip(model: Any, clip: FrozenClip) -> None:
  """Makes a stage model read `clip` instead of the checkpoint its config names (the sampler shares
  one CLIP among stages; benchmarks use a CLIP of a given shape with no weights)."""
  model.__dict__["clip"] = clip  # replaces the model's lazily loaded `clip` property


def _text_tower(module, tokens):
  return module.text(tokens)


def load_clip(given: str, label: str, hint: str = "") -> FrozenClip:
  """The CLIP checkpoint at `given` (a workdir or model folder), with a clear error, led by
  `label` (how the user named it, e.g. "--config.clip=") and followed by `hint`, when it is
  missing or holds another stage."""
  path = paths.resolve(given)
  try:
    clip_config = checkpointing.load_config(path)
  except FileNotFoundError as e:
    raise errors.UserFileNotFoundError(
      f"{label}{given!r}: {e}" + (f"; {hint}" if hint else "")
    ) from None
  if clip_config.get("stage") != "clip":
    raise errors.UserError(
      f"{label}{given!r} holds a {clip_config.get('stage')!r} checkpoint, not CLIP"
    )
  return FrozenClip(path, clip_config)


def frozen_clip(config, check_tokens: bool = False) -> FrozenClip:
  """The CLIP named by `config.conditioning.clip`, with a clear error when it is missing or unfit.

  `check_tokens`: the stage feeds its own caption tokens to CLIP (the prior), so the tokenizer and
  length must match CLIP's.
  """
  given = config.conditioning.clip
  path = paths.resolve(given)
  hint = (
    "train one with `python -m mav_jax.train --config configs/clip.py:tiny --workdir W` (or "
    "convert pretrained weights with mav_jax.models.clip_convert) and pass "
    "--config.conditioning.clip=W"
  )
  if not path:
    raise errors.UserError(
      f"stage {config.stage} is conditioned on CLIP: set conditioning.clip; {hint}"
    )
  clip = load_clip(given, "conditioning.clip = ", hint)
  want = config.conditioning.embedding_dim
  if clip.embed_dim != want:
    raise errors.UserError(
      f"conditioning.clip = {given!r} embeds into {clip.embed_dim} dimensions but "
      f"conditioning.embedding_dim is {want}; set --config.conditioning.embedding_dim="
      f"{clip.embed_dim} (and retrain this stage) or use a matching CLIP"
    )
  if check_tokens and (
    clip.config.data.max_tokens != config.data.max_tokens
    or clip.config.data.tokenizer != config.data.tokenizer
  ):
    raise errors.UserError(
      f"conditioning.clip = {given!r} reads {clip.config.data.tokenizer} tokens of length "
      f"{clip.config.data.max_tokens}, this stage's data makes {config.data.tokenizer} tokens of "
      f"length {config.data.max_tokens}; make data.tokenizer and data.max_tokens match"
    )
  own_vocab = config.model.text_motion.vocab_size if "text_motion" in config.model else 0
  if check_tokens and own_vocab and own_vocab < clip.config.model.vocab_size:
    raise errors.UserError(
      f"model.text_motion.vocab_size = {own_vocab} is smaller than the vocabulary of the tokens it "
      f"embeds (conditioning.clip = {given!r} reads {clip.config.model.vocab_size}); set "
      f"--config.model.text_motion.vocab_size={clip.config.model.vocab_size}"
    )
  return clip


def raw_embeddings(config) -> bool:
  """Whether the stage reads CLIP embeddings raw (`conditioning.embedding_norm == "raw"`)."""
  norm = config.conditioning.get("embedding_norm", "scaled_unit")
  if norm not in ("scaled_unit", "raw"):
    raise errors.UserError(
      f"unknown conditioning.embedding_norm {norm!r}: use 'scaled_unit' or 'raw'"
    )
  return norm == "raw"


DISCRETE_SCHEDULES = ("squaredcos_cap_v2",)


def discrete_schedule(config, sampling=None):
  """The stage's `diffusion.discrete.DiscreteSchedule` when `diffusion.schedule` is a discrete
  one (Karlo's "squaredcos_cap_v2"), else None (continuous time). Variance: learned range for a
  model with twice the data channels (6), else fixed small; prediction from `diffusion.target`
  (eps or x0); x0 clipped to +-`sampling.clip_x0` (default 1). With `sampling` (the section a
  sampler runs with), its sampler must be the ancestral "ddpm"."""
  if config.diffusion.schedule not in DISCRETE_SCHEDULES:
    return None
  from mav_jax.diffusion.discrete import DiscreteSchedule

  target = config.diffusion.target
  if target not in ("eps", "x0"):
    raise errors.UserError(
      f"diffusion.schedule={config.diffusion.schedule!r} trains and samples eps or x0 "
      f"predictions, not diffusion.target={target!r}"
    )
  if sampling is not None and sampling.sampler != "ddpm":
    raise errors.UserError(
      f"the {config.stage} (diffusion.schedule={config.diffusion.schedule!r}) samples with its "
      f"ancestral step: --sampler=ddpm (sampling.sampler), not {sampling.sampler!r}"
    )
  model = config.get("model", {})
  learned = int(model.get("out_channels", 3)) == 6
  return DiscreteSchedule(
    beta_schedule=config.diffusion.schedule,
    variance_type="learned_range" if learned else "fixed_small_log",
    prediction_type="epsilon" if target == "eps" else "sample",
    clip_sample=True,
    clip_sample_range=float((sampling or config.sampling).get("clip_x0", 1.0)),
  )
