"""The train state, its optimizer (AdamW, warmup + cosine, clipping, freezing) and EMA."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from mav_jax import errors
from mav_jax.models import is_temporal

TRAINABLE = ("all", "temporal")


@struct.dataclass
class TrainState:
  """Everything a step changes, and so everything a checkpoint saves (with the data iterator).

  Attributes:
    step: steps taken.
    params: model parameters (float32).
    ema_params: exponential moving average of the parameters (used for sampling).
    opt_state: optimizer state.
    rng: the run's base key (as raw uint32 data); step i uses fold_in(rng, i).
  """

  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array


def learning_rate_schedule(opt_config, num_steps: int) -> optax.Schedule:
  """Linear warmup to the peak, then cosine decay to `final_lr_ratio` of it at `num_steps`."""
  peak = opt_config.learning_rate
  warmup = min(opt_config.warmup_steps, max(num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
    0.0 if warmup else peak,
    peak,
    warmup,
    max(num_steps, warmup + 1),
    end_value=peak * opt_config.final_lr_ratio,
  )


def is_video_only(path: tuple[str, ...]) -> bool:
  """Parameters an image model does not have: temporal layers, scalar-condition embeddings (fps,
  frame skip, ...) and the extra-input conv. `trainable=temporal` trains exactly these."""
  return is_temporal(path) or any(
    p == "conv_in_extra" or (p.endswith("_embed") and p not in ("time_embed", "global_embed"))
    for p in path
  )


TEXT_PATHWAY_PREFIXES = ("temporal_cross_", "temporal_caption_", "temporal_text_")


def is_text_pathway(path: tuple[str, ...]) -> bool:
  """Parameters of the text-aware motion option (model.text_motion and its parts)."""
  return any(p.startswith(TEXT_PATHWAY_PREFIXES) for p in path)


def _by_name(fn):
  """params -> a tree of fn(parameter path names) (boxed Partitioned leaves count as leaves)."""

  def tree(params):
    def one(path, _):
      return fn(tuple(str(getattr(p, "key", p)) for p in path))

    return jax.tree_util.tree_map_with_path(
      one, params, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )

  return tree


_text_mask = _by_name(is_text_pathway)


def is_trained(path: tuple[str, ...], trainable: str) -> bool:
  """Whether `train.trainable` trains the parameter at `path` (the train step differentiates the
  loss with respect to exactly these; the others get no gradient and no update)."""
  return trainable == "all" or is_video_only(path)


def _labels(trainable: str):
  return _by_name(lambda names: "train" if is_trained(names, trainable) else "freeze")


# Lookup tables, not maps: the token / position embeddings of the text pathway and the relative-
# position bias table of temporal attention (whose leaf is named "table").
EMBEDDING_TABLES = ("temporal_text_tokens", "temporal_text_positions", "table")


def is_decayed(path: tuple[str, ...], ndim: int) -> bool:
  """Whether AdamW's weight decay applies to a parameter: kernels and projection matrices do; not
  1-D / 0-D parameters (norm scales, biases, CLIP's class embedding, learned queries, CLIP's
  `logit_scale`), nor embedding tables: leaves named `*embedding` (CLIP's and the prior's token /
  positional embeddings) or in EMBEDDING_TABLES. (Modules named `*_embed`, e.g. `time_embed`,
  `fps_embed`, CLIP's `patch_embed`, are MLPs and convolutions: their kernels decay.)"""
  leaf = path[-1] if path else ""
  return (
    ndim >= 2
    and leaf != "logit_scale"
    and not leaf.endswith("embedding")
    and leaf not in EMBEDDING_TABLES
  )


def _decay_mask(params):
  """params -> a tree of is_decayed (boxed Partitioned leaves count as leaves)."""

  def one(path, leaf):
    names = tuple(str(getattr(p, "key", p)) for p in path)
    return is_decayed(names, len(getattr(leaf, "value", leaf).shape))

  return jax.tree_util.tree_map_with_path(
    one, params, is_leaf=lambda x: isinstance(x, nn.Partitioned)
  )


def _masked_weight_decay(weight_decay: float) -> optax.GradientTransformation:
  """optax.add_decayed_weights on the parameters `is_decayed` picks, with its state (EmptyState)."""

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    if not weight_decay:
      return updates, state
    updates = jax.tree.map(
      lambda g, p, decayed: g + weight_decay * p if decayed else g,
      updates,
      params,
      _decay_mask(params),
    )
    return updates, state

  return optax.GradientTransformation(init, update)


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW with warmup + cosine decay and global-norm clipping; frozen parameters get no update.

  Weight decay applies to kernels and projection matrices only (`is_decayed`): not to norm scales,
  biases, embedding tables or CLIP's `logit_scale`. The clipping norm is over the trained
  parameters' gradients (a frozen parameter has none).

  `config.train.trainable`: "all", or "temporal" to train only what video adds to an image model
  (temporal layers, fps / frame-skip embeddings, extra-input conv), the spatial layers frozen.
  `config.optimizer.text_lr_multiplier` scales the learning rate of the text-aware motion
  parameters (zero-initialised layers added to a trained model learn faster with a larger one).
  """
  o, trainable = config.optimizer, config.train.trainable
  if trainable not in TRAINABLE:
    raise errors.UserError(f"unknown train.trainable {trainable!r}; choose one of {TRAINABLE}")
  tx = optax.chain(
    optax.clip_by_global_norm(o.grad_clip),
    # optax.adamw's chain, its decay masked in place: adamw(mask=...) would wrap the decay's
    # state in a MaskedState, and checkpoints of earlier runs would no longer restore.
    optax.chain(
      optax.scale_by_adam(b1=o.b1, b2=o.b2),
      _masked_weight_decay(o.weight_decay),
      optax.scale_by_learning_rate(learning_rate_schedule(o, config.train.num_steps)),
    ),
  )
  multiplier = o.get("text_lr_multiplier", 1.0)
  if multiplier <= 0:
    raise errors.UserError(f"optimizer.text_lr_multiplier must be > 0, got {multiplier}")
  if multiplier != 1.0:  # AdamW's update is lr x (direction + decay): scaling it scales the lr
    tx = optax.chain(tx, optax.masked(optax.scale(multiplier), _text_mask))
  if trainable == "all":
    return tx
  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, _labels(trainable))


def ema_update(ema, params, step: jax.Array, decay: float):
  """EMA with the usual warm start: the effective decay is min(decay, (1 + step) / (10 + step))."""
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


def global_norm(tree) -> jax.Array:
  return optax.tree.norm(tree)
