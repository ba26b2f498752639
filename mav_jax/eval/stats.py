"""Streaming Gaussian feature statistics and the Fréchet distance between two of them (FID, FVD).

Features arrive batch by batch (sharded over devices along the batch); each batch is reduced on the
devices to (count, mean, centred scatter) in float32, and batches are merged on the host in float64
with the pairwise update of Chan et al., so no sample set has to fit in memory and no sum of squares
of raw features (which loses precision in float32) is ever formed. The Fréchet distance

  d^2 = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})

is computed in float64 from symmetric eigendecompositions: tr (S_1 S_2)^{1/2} equals the sum of the
square roots of the eigenvalues of S_1^{1/2} S_2 S_1^{1/2}, which is symmetric positive
semi-definite, so no general matrix square root (and no complex round-off) is needed.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from mav_jax import errors
from mav_jax.models.common import Array


@jax.jit
def batch_moments(features: Array) -> tuple[Array, Array, Array]:
  """(count, mean [d], centred scatter [d, d]) of features [n, d], reduced in float32."""
  x = features.reshape(features.shape[0], -1).astype(jnp.float32)
  mean = jnp.mean(x, axis=0)
  centred = x - mean
  scatter = jnp.einsum("nd,ne->de", centred, centred, precision=jax.lax.Precision.HIGHEST)
  return jnp.asarray(x.shape[0], jnp.float32), mean, scatter


@dataclasses.dataclass
class GaussianStats:
  """Running mean and scatter matrix of a feature set, kept in float64 on the host.

  Attributes:
    count: samples seen.
    mean: [d] mean feature (None before the first update).
    scatter: [d, d] sum of outer products of centred features (None before the first update).
  """

  count: int = 0
  mean: np.ndarray | None = None
  scatter: np.ndarray | None = None

  @property
  def dim(self) -> int | None:
    return None if self.mean is None else self.mean.shape[0]

  def update(self, features) -> "GaussianStats":
    """Adds a batch of features [n, d] (a numpy array or a sharded jax.Array); returns self."""
    if features.ndim != 2:
      raise errors.UserError(f"features must be [samples, dim], got shape {tuple(features.shape)}")
    if self.dim is not None and features.shape[1] != self.dim:
      raise errors.UserError(
        f"feature dim {features.shape[1]} does not match the {self.dim} seen so far"
      )
    if features.shape[0] == 0:
      return self
    n, mean, scatter = jax.device_get(batch_moments(features))
    self.merge(GaussianStats(int(n), np.float64(mean), np.float64(scatter)))
    return self

  def merge(self, other: "GaussianStats") -> "GaussianStats":
    """Adds another set's statistics (Chan et al.'s pairwise update); returns self."""
    if other.count == 0:
      return self
    if self.count == 0:
      self.count, self.mean, self.scatter = other.count, other.mean.copy(), other.scatter.copy()
      return self
    if other.dim != self.dim:
      raise errors.UserError(f"cannot merge statistics of dim {other.dim} into dim {self.dim}")
    total = self.count + other.count
    delta = other.mean - self.mean
    self.scatter = (
      self.scatter + other.scatter + np.outer(delta, delta) * (self.count * other.count / total)
    )
    self.mean = self.mean + delta * (other.count / total)
    self.count = total
    return self

  @property
  def covariance(self) -> np.ndarray:
    """Unbiased covariance (divides by count - 1), as numpy.cov and the FID reference code."""
    if self.count < 2:
      raise errors.UserError(f"a covariance needs at least 2 samples, have {self.count}")
    return self.scatter / (self.count - 1)

  def save(self, path: str) -> None:
    """Writes count, mean and covariance to an .npz (e.g. a reference set's statistics)."""
    if self.count < 2:
      raise errors.UserError(f"nothing to save: statistics of {self.count} samples")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, count=self.count, mu=self.mean, sigma=self.covariance)

  @classmethod
  def load(cls, path: str) -> "GaussianStats":
    """Reads an .npz with `mu` and `sigma` (and optionally `count`), e.g. one written by `save` or
    by pytorch-fid's `--save-stats`."""
    with np.load(path) as f:
      missing = {"mu", "sigma"} - set(f.files)
      if missing:
        raise errors.UserError(f"{path} lacks {sorted(missing)}: not a feature-statistics file")
      mu, sigma = np.float64(f["mu"]), np.float64(f["sigma"])
      count = int(f["count"]) if "count" in f.files else 2  # unknown: any count >= 2 round-trips
    return cls(count, mu, sigma * (count - 1))


def _sqrt_psd(matrix: Array) -> Array:
  values, vectors = jnp.linalg.eigh(matrix)
  return (vectors * jnp.sqrt(jnp.clip(values, 0.0))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
  shapes = (np.shape(mu1), np.shape(sigma1), np.shape(mu2), np.shape(sigma2))
  d = shapes[0][0] if len(shapes[0]) == 1 else None
  if d is None or shapes != ((d,), (d, d), (d,), (d, d)):
    raise errors.UserError(f"need means [d] and covariances [d, d] of one d, got shapes {shapes}")
  # float64 on the host CPU: accelerators lack (or emulate slowly) float64 eigendecompositions.
  with jax.enable_x64(True), jax.default_device(jax.local_devices(backend="cpu")[0]):
    mu1, sigma1, mu2, sigma2 = (jnp.asarray(a, jnp.float64) for a in (mu1, sigma1, mu2, sigma2))
    root1 = _sqrt_psd((sigma1 + sigma1.T) / 2)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = jnp.sum(jnp.sqrt(jnp.clip(jnp.linalg.eigvalsh((middle + middle.T) / 2), 0.0)))
    diff = mu1 - mu2
    value = diff @ diff + jnp.trace(sigma1) + jnp.trace(sigma2) - 2.0 * trace_sqrt
    return float(value)


def frechet_between(a: GaussianStats, b: GaussianStats) -> float:
  """Fréchet distance between two feature sets' statistics."""
  if a.dim != b.dim:
    raise errors.UserError(f"feature dims differ: {a.dim} vs {b.dim} (different extractors?)")
  return frechet_distance(a.mean, a.covariance, b.mean, b.covariance)
