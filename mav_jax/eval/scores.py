"""Inception Score and CLIPSIM, accumulated batch by batch.

Inception Score (Salimans et al., 2016): exp(E_x KL(p(y|x) || p(y))), reported as the mean and
standard deviation over `splits` disjoint subsets. Streaming needs only, per subset, the count, the
sum of p(y|x) and the sum of sum_y p log p; sample i goes to subset i mod splits (the reference code
cuts contiguous chunks; either is an arbitrary partition of the same samples).

CLIPSIM (Wu et al., 2021; Make-A-Video's MSR-VTT table): the cosine similarity between the CLIP
embedding of a video's caption and of each of its frames, averaged over frames and then over
videos. Reported as the raw cosine (the paper's 0.3049 for MSR-VTT), not scaled by 100.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mav_jax import errors
from mav_jax.models.common import Array


@jax.jit
def _class_sums(logits: Array) -> tuple[Array, Array]:
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  p = jnp.exp(log_p)
  return p, jnp.sum(p * log_p, axis=-1)


@dataclasses.dataclass
class InceptionScore:
  """Running Inception Score over `splits` subsets.

  Attributes:
    splits: number of subsets (10 in the reference code).
    count: [splits] samples per subset.
    p_sum: [splits, classes] sums of p(y|x).
    entropy_sum: [splits] sums of sum_y p(y|x) log p(y|x).
  """

  splits: int = 10
  count: np.ndarray | None = None
  p_sum: np.ndarray | None = None
  entropy_sum: np.ndarray | None = None

  def update(self, logits) -> "InceptionScore":
    """Adds classifier logits [n, classes] (pre-softmax); returns self."""
    if logits.ndim != 2:
      raise errors.UserError(f"logits must be [samples, classes], got shape {tuple(logits.shape)}")
    p, neg_entropy = (np.float64(a) for a in jax.device_get(_class_sums(logits)))
    if self.count is None:
      self.count = np.zeros(self.splits, np.int64)
      self.p_sum = np.zeros((self.splits, p.shape[1]))
      self.entropy_sum = np.zeros(self.splits)
    elif p.shape[1] != self.p_sum.shape[1]:
      raise errors.UserError(f"{p.shape[1]} classes, but {self.p_sum.shape[1]} before")
    seen = int(self.count.sum())
    subset = (seen + np.arange(p.shape[0])) % self.splits
    np.add.at(self.count, subset, 1)
    np.add.at(self.p_sum, subset, p)
    np.add.at(self.entropy_sum, subset, neg_entropy)
    return self

  def result(self) -> tuple[float, float]:
    """(mean, standard deviation) of the score over the subsets."""
    if self.count is None or self.count.min() < 1:
      have = 0 if self.count is None else int(self.count.sum())
      raise errors.UserError(
        f"an Inception Score over {self.splits} splits needs >= {self.splits} samples, have {have}"
      )
    marginal = self.p_sum / self.count[:, None]
    cross = np.sum(np.where(marginal > 0, marginal * np.log(np.maximum(marginal, 1e-300)), 0.0), 1)
    scores = np.exp(self.entropy_sum / self.count - cross)
    return float(scores.mean()), float(scores.std())


@jax.jit
def clip_similarity(text_embedding: Array, frame_embeddings: Array) -> Array:
  """Per-video CLIPSIM: text [b, d] against frames [b, f, d] -> [b] mean cosine over frames."""
  text = text_embedding / jnp.linalg.norm(text_embedding, axis=-1, keepdims=True)
  frames = frame_embeddings / jnp.linalg.norm(frame_embeddings, axis=-1, keepdims=True)
  return jnp.mean(jnp.einsum("bd,bfd->bf", text, frames), axis=-1)


@dataclasses.dataclass
class Mean:
  """Running mean of per-sample values (CLIPSIM over videos).

  Attributes:
    total: sum of the values seen.
    count: number of values seen.
  """

  total: float = 0.0
  count: int = 0

  def update(self, values) -> "Mean":
    values = np.float64(jax.device_get(values)).reshape(-1)
    self.total += float(values.sum())
    self.count += values.size
    return self

  def result(self) -> float:
    if not self.count:
      raise errors.UserError("no values to average")
    return self.total / self.count
