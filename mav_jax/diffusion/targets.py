"""Prediction targets (eps, x0, v), conversions between them, and loss weighting.

With z = alpha * x0 + sigma * eps (alpha^2 + sigma^2 = 1) and v = alpha * eps - sigma * x0:
  x0 = (z - sigma * eps) / alpha = alpha * z - sigma * v
  eps = (z - alpha * x0) / sigma = sigma * z + alpha * v
"""

import jax
import jax.numpy as jnp

from mav_jax import errors

Array = jax.Array
TARGETS = ("eps", "x0", "v")
WEIGHTINGS = ("plain", "min_snr")


def _check_target(target: str) -> None:
  if target not in TARGETS:
    raise errors.UserError(f"unknown prediction target {target!r}; choose one of {TARGETS}")


def target_from(x0: Array, eps: Array, alpha: Array, sigma: Array, target: str) -> Array:
  """The regression target of parameterisation `target` for clean data x0 and noise eps."""
  _check_target(target)
  if target == "eps":
    return eps
  if target == "x0":
    return x0
  return alpha * eps - sigma * x0


def to_x0_eps(
  pred: Array, z: Array, alpha: Array, sigma: Array, target: str
) -> tuple[Array, Array]:
  """Converts a model prediction in parameterisation `target` to (x0_hat, eps_hat).

  alpha and sigma must broadcast against z. Dividing by alpha (eps target) or sigma (x0 target) is
  only as accurate as they are large; the v target is well-conditioned everywhere.
  """
  _check_target(target)
  if target == "eps":
    return (z - sigma * pred) / alpha, pred
  if target == "x0":
    return pred, (z - alpha * pred) / sigma
  return alpha * z - sigma * pred, sigma * z + alpha * pred


def convert(pred: Array, z: Array, alpha: Array, sigma: Array, source: str, target: str) -> Array:
  """Converts a prediction from parameterisation `source` to `target`."""
  x0, eps = to_x0_eps(pred, z, alpha, sigma, source)
  return target_from(x0, eps, alpha, sigma, target)


def loss_weight(logsnr: Array, target: str, weighting: str = "plain", gamma: float = 5.0) -> Array:
  """Per-example weight of the squared error on `target`.

  "plain" weighs every noise level by 1. "min_snr" (Hang et al. 2023, Min-SNR-gamma) weighs the
  equivalent x0 error by min(snr, gamma): i.e. min(snr, gamma) / snr for eps, min(snr, gamma) for x0
  and min(snr, gamma) / (snr + 1) for v.
  """
  _check_target(target)
  if weighting == "plain":
    return jnp.ones_like(logsnr)
  if weighting != "min_snr":
    raise errors.UserError(f"unknown loss weighting {weighting!r}; choose one of {WEIGHTINGS}")
  snr = jnp.exp(logsnr)
  clipped = jnp.minimum(snr, gamma)
  if target == "eps":
    return clipped / snr
  if target == "x0":
    return clipped
  return clipped / (snr + 1.0)
