"""What the caption probes (caption_loss_probe.py, caption_field_probe.py) share: a text-aware D^t
loaded from a workdir or exported model, its frozen CLIP, one training batch of synthetic clips, and
the same batch's captions with their direction words swapped (left<->right, up<->down)."""

import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mav_jax import checkpointing
from mav_jax.data import pipeline, tokenizers
from mav_jax.stages import video

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


class Probe(NamedTuple):
  config: Any
  model: Any
  params: Any
  frozen: Any
  batch: dict  # a training batch, as jax arrays
  swapped: dict  # the same batch with every caption's direction word swapped


def swap_directions(captions: list[str]) -> list[str]:
  """'a red circle moving left' -> 'a red circle moving right' (the direction is the last word)."""
  out = []
  for caption in captions:
    head, _, word = caption.rpartition(" ")
    if word not in OPPOSITE:
      raise ValueError(f"caption {caption!r} does not end in a direction ({sorted(OPPOSITE)})")
    out.append(f"{head} {OPPOSITE[word]}")
  return out


def load(path: str, batch_size: int, needs: str, ok) -> Probe:
  """The decoder at `path` (exits with `needs` in the message unless `ok(config)`), with one batch
  of `batch_size` training clips and its direction-swapped twin."""
  config = checkpointing.load_config(path)
  if config.stage != "decoder" or not ok(config):
    sys.exit(f"error: {path} is not a decoder with {needs}")
  if config.data.tokenizer != "byte":
    sys.exit("error: the caption probes decode byte-tokenized captions only")
  with config.unlocked():
    config.diffusion.cond_dropout = 0.0  # compare conditions, never drop them
    config.conditioning.caption_only_dropout = 0.0
  model = video.DECODER.make_model(config)
  params = jax.tree.map(jnp.asarray, checkpointing.restore_params(path, "params"))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  frozen = video.DECODER.load_frozen(model, config, mesh)
  data, _ = pipeline.pipeline_from_config(config.data, "train", batch_size=batch_size)
  batch = next(iter(data))
  tokenizer = tokenizers.make_tokenizer(config.data.tokenizer, None)
  captions = [tokenizer.decode(ids) for ids in batch["tokens"]]
  ids, mask = tokenizers.tokenize_batch(
    tokenizer, swap_directions(captions), config.data.max_tokens
  )
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  swapped = dict(batch, tokens=jnp.asarray(ids), token_mask=jnp.asarray(mask))
  return Probe(config, model, params, frozen, batch, swapped)
