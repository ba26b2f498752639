"""Logical axis names for every parameter and constrained activation in mav_jax.

Models name their axes with these constants and nothing else; a sharding strategy (a table of
logical-to-mesh rules, see `mav_jax.parallel` in the trainer) decides which mesh axis, if any, each
name is split over. Keeping the names in one module makes a strategy a config line, not a code change.

Parameter axes:
  CONV_T, CONV_H, CONV_W: kernel taps of temporal / spatial convolutions (never worth sharding).
  CHANNELS_IN, CHANNELS_OUT: input and output feature axes of trunk convolutions and projections.
  NORM: the channel axis of a normalisation scale or bias.
  EMBED: width of the conditioning embedding (time, fps, global embedding).
  EMBED_IN: sinusoidal features that an embedding MLP reads.
  CONTEXT: feature width of cross-attention context tokens (e.g. text encoder width).
  HEADS, HEAD_DIM: attention heads and per-head features.
  MLP: hidden features of feed-forward blocks.
  REL_POS: buckets of the temporal relative-position bias.
  POSITION: positions of a learned positional embedding (CLIP).

A parameter never repeats a name (Flax would reject the partition spec), so an axis that is
mapped to a mesh axis by a strategy is split on exactly one dimension of each parameter. When two
names of one parameter map to the same mesh axis, the rule listed first wins (Flax's rule order).

Activation axes (used with `nn.with_logical_constraint`):
  ACT_BATCH, ACT_FRAMES, ACT_HEIGHT, ACT_WIDTH, ACT_CHANNELS for video tensors
  [batch, frames, height, width, channels]; ACT_TOKENS for a frame's flattened H*W tokens (temporal
  sequences use ACT_FRAMES).
"""

from collections.abc import Callable

import flax.linen as nn
import jax

CONV_T = "conv_t"
CONV_H = "conv_h"
CONV_W = "conv_w"
CHANNELS_IN = "channels_in"
CHANNELS_OUT = "channels_out"
NORM = "norm"
EMBED = "embed"
EMBED_IN = "embed_in"
CONTEXT = "context"
HEADS = "heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
REL_POS = "rel_pos"
POSITION = "position"

ACT_BATCH = "activation_batch"
ACT_FRAMES = "activation_frames"
ACT_HEIGHT = "activation_height"
ACT_WIDTH = "activation_width"
ACT_CHANNELS = "activation_channels"
ACT_TOKENS = "activation_tokens"

PARAM_AXES = (
  CONV_T,
  CONV_H,
  CONV_W,
  CHANNELS_IN,
  CHANNELS_OUT,
  NORM,
  EMBED,
  EMBED_IN,
  CONTEXT,
  HEADS,
  HEAD_DIM,
  MLP,
  REL_POS,
  POSITION,
)
ACTIVATION_AXES = (ACT_BATCH, ACT_FRAMES, ACT_HEIGHT, ACT_WIDTH, ACT_CHANNELS, ACT_TOKENS)

VIDEO = (ACT_BATCH, ACT_FRAMES, ACT_HEIGHT, ACT_WIDTH, ACT_CHANNELS)


def partitioned(init: Callable, *names: str | None) -> Callable:
  """Wraps an initialiser so the parameter it makes carries logical axis `names`."""
  return nn.with_logical_partitioning(init, names)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  """Constrains an activation's sharding by logical names (a no-op outside a mesh with rules)."""
  return nn.with_logical_constraint(x, names)
