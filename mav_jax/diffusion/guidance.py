"""Classifier-free guidance: conditioning dropout in training, guided prediction in sampling.

Conditioning is any pytree whose leaves have a leading batch axis (an embedding, token ids, masks,
...). The null condition defaults to zeros: a zero CLIP embedding, as in DALL-E 2's decoder.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from mav_jax import errors

Array = jax.Array
Cond = Any
# model_fn(z, t, cond) -> prediction
ModelFn = Callable[[Array, Array, Cond], Array]


def null_like(cond: Cond) -> Cond:
  """The default null condition: zeros (False for boolean masks) shaped like `cond`."""
  return jax.tree.map(jnp.zeros_like, cond)


def drop_conditioning(rng: jax.Array, cond: Cond, rate: float, null: Cond | None = None) -> Cond:
  """Replaces each example's whole condition by the null condition with probability `rate`.

  The same per-example decision applies to every leaf, so a text embedding and its tokens are
  dropped together.
  """
  if not 0.0 <= rate <= 1.0:
    raise errors.UserError(f"conditioning dropout rate must be in [0, 1], got {rate}")
  null = null_like(cond) if null is None else null
  leaves = jax.tree.leaves(cond)
  if not leaves:
    return cond
  drop = jax.random.bernoulli(rng, rate, (leaves[0].shape[0],))

  def choose(c, n):
    keep = drop.reshape(drop.shape + (1,) * (c.ndim - 1))
    return jnp.where(keep, jnp.broadcast_to(n, c.shape), c)

  return jax.tree.map(choose, cond, null)


def guide(pred_cond: Array, pred_uncond: Array, scale: float | Array) -> Array:
  """uncond + scale * (cond - uncond); scale 1 is the conditional model, 0 the unconditional."""
  return pred_uncond + scale * (pred_cond - pred_uncond)


def guided_model(
  model_fn: ModelFn,
  cond: Cond,
  uncond: Cond,
  scale: float | Array,
  guided_channels: int | None = None,
):
  """Returns denoise_fn(z, t) running conditional and unconditional passes as one doubled batch.

  `uncond` is the null condition or a negative prompt's condition, shaped like `cond`. Predictions
  are linear in the parameterisation at fixed (z, t), so guiding eps, x0 or v is equivalent.

  The batch is [cond, uncond] (diffusers' unCLIP pipeline orders it [uncond, cond]; the model sees
  each example on its own, so the order does not change the result).

  `guided_channels` (None: all) guides only the first that many channels of the prediction's last
  (channel) axis and takes the rest from the conditional pass: a learned-variance model's output
  [eps, v] (Karlo's decoder: 3 + 3 channels) is guided on eps only, and v is the conditional
  model's, as in diffusers' `UnCLIPPipeline`. v is not a prediction of the sample, so
  extrapolating it would be meaningless.
  """
  if guided_channels is not None and not (
    isinstance(guided_channels, int) and guided_channels >= 1
  ):
    raise errors.UserError(f"guided_channels must be a positive integer, got {guided_channels!r}")
  both = jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)

  def denoise_fn(z: Array, t: Array) -> Array:
    pred = model_fn(jnp.concatenate([z, z], 0), jnp.concatenate([t, t], 0), both)
    pred_cond, pred_uncond = jnp.split(pred, 2, axis=0)
    if guided_channels is None:
      return guide(pred_cond, pred_uncond, scale)
    if pred.shape[-1] < guided_channels:
      raise errors.UserError(
        f"guided_channels={guided_channels} exceeds the prediction's {pred.shape[-1]} channels"
      )
    guided = guide(pred_cond[..., :guided_channels], pred_uncond[..., :guided_channels], scale)
    return jnp.concatenate([guided, pred_cond[..., guided_channels:]], axis=-1)

  return denoise_fn
