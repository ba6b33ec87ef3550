"""Generation metrics exactly as OpenAI's ADM evaluator (`evaluations/evaluator.py`, which LlamaGen
and Hita vendor) computes them, from Inception activations:

* FID / sFID: mean and `np.cov(rowvar=False)` in float64; `||mu1 - mu2||^2 + tr(S1) + tr(S2) -
  2 tr(sqrtm(S1 S2))` with scipy's `sqrtm` (called without the `disp` argument, which SciPy 1.18
  removed), the same 1e-6 * I retry for non-finite results and the same imaginary-part check.
* IS: softmax of `pool3 @ W` (no bias), splits of 5000, `exp(mean KL(p || mean p))` per split, mean
  over splits only. Computed in float64 (ADM: TF float32; differences are ~1e-7 relative).
* Precision / recall: Kynkaanniemi et al.'s k-NN manifolds with k = 3; squared distances
  `max(|u|^2 - 2 u.v + |v|^2, 0)` computed first in float16 and recomputed in float32 only if
  something is non-finite (as the reference); radius = 4th smallest distance incl. self; blocks of
  10000 rows/columns. Precision: fraction of samples inside the reference manifold; recall: the
  reverse.
Reference batches are `.npz` files with `arr_0` (uint8 N x H x W x 3) and optionally `mu`, `sigma`,
`mu_s`, `sigma_s` (precomputed statistics), so `VIRTUAL_imagenet256_labeled.npz` works unchanged.
"""
from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg


@dataclasses.dataclass
class FIDStatistics:
  mu: np.ndarray
  sigma: np.ndarray

  @classmethod
  def from_activations(cls, acts: np.ndarray) -> 'FIDStatistics':
    acts = np.asarray(acts, np.float64)
    return cls(np.mean(acts, axis=0), np.cov(acts, rowvar=False))

  def frechet_distance(self, other: 'FIDStatistics', eps: float = 1e-6) -> float:
    mu1, mu2 = np.atleast_1d(self.mu), np.atleast_1d(other.mu)
    s1, s2 = np.atleast_2d(self.sigma), np.atleast_2d(other.sigma)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
      raise ValueError(f'statistics of different sizes: {mu1.shape} vs {mu2.shape}')
    diff = mu1 - mu2
    covmean = _sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
      warnings.warn(f'fid calculation produces singular product; adding {eps} to diagonal of cov')
      offset = np.eye(s1.shape[0]) * eps
      covmean = _sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
      if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
        raise ValueError(f'Imaginary component {np.max(np.abs(covmean.imag))}')
      covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _sqrtm(a):
  out = linalg.sqrtm(a)
  return out[0] if isinstance(out, tuple) else out


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
  logits = np.asarray(logits, np.float64)
  logits = logits - logits.max(axis=1, keepdims=True)
  preds = np.exp(logits)
  preds /= preds.sum(axis=1, keepdims=True)
  scores = []
  for i in range(0, len(preds), split_size):
    part = preds[i:i + split_size]
    kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  return float(np.mean(scores))


@jax.jit
def _distances_f16(u, v):
  """ADM's float16 pairwise squared distances (fp16 inputs and arithmetic), returned as float32,
  with the float32 recomputation when anything overflowed."""
  def dist(a, b, dt):
    a, b = a.astype(dt), b.astype(dt)
    nu = jnp.sum(jnp.square(a), axis=1).reshape(-1, 1)
    nv = jnp.sum(jnp.square(b), axis=1).reshape(1, -1)
    return jnp.maximum(nu - 2 * jnp.matmul(a, b.T, preferred_element_type=dt) + nv, 0)
  d16 = dist(u, v, jnp.float16)
  return jax.lax.cond(jnp.all(jnp.isfinite(d16)), lambda: d16.astype(jnp.float32),
                      lambda: dist(u, v, jnp.float32))


@jax.jit
def _distances_f32(u, v):
  u, v = u.astype(jnp.float32), v.astype(jnp.float32)
  nu = jnp.sum(jnp.square(u), axis=1).reshape(-1, 1)
  nv = jnp.sum(jnp.square(v), axis=1).reshape(1, -1)
  return jnp.maximum(nu - 2 * jnp.matmul(u, v.T, precision='highest') + nv, 0)


class ManifoldEstimator:
  """ADM's k-NN manifold estimator (nhood size 3)."""

  def __init__(self, row_batch_size: int = 10000, col_batch_size: int = 10000, k: int = 3,
               distance_dtype: str = 'float16'):
    if distance_dtype not in ('float16', 'float32'):
      raise ValueError(f"distance_dtype must be 'float16' (ADM) or 'float32', got {distance_dtype!r}")
    self.rows, self.cols, self.k = row_batch_size, col_batch_size, k
    self._dist = _distances_f16 if distance_dtype == 'float16' else _distances_f32

  def distances(self, u, v):
    return np.asarray(self._dist(jnp.asarray(u, jnp.float32), jnp.asarray(v, jnp.float32)))

  def radii(self, feats: np.ndarray) -> np.ndarray:
    n = len(feats)
    out = np.zeros(n, np.float32)
    for b1 in range(0, n, self.rows):
      block = np.concatenate([self.distances(feats[b1:b1 + self.rows], feats[b2:b2 + self.cols])
                              for b2 in range(0, n, self.cols)], axis=1)
      out[b1:b1 + self.rows] = np.partition(block, self.k, axis=1)[:, self.k]
    return out

  def precision_recall(self, ref: np.ndarray, sample: np.ndarray) -> tuple[float, float]:
    r_ref, r_sample = self.radii(ref), self.radii(sample)
    ref_in = np.zeros(len(ref), bool)       # reference point inside the sample manifold -> recall
    sample_in = np.zeros(len(sample), bool)  # sample inside the reference manifold -> precision
    for b1 in range(0, len(ref), self.rows):
      for b2 in range(0, len(sample), self.cols):
        d = self.distances(ref[b1:b1 + self.rows], sample[b2:b2 + self.cols])
        ref_in[b1:b1 + self.rows] |= np.any(d <= r_sample[b2:b2 + self.cols][None, :], axis=1)
        sample_in[b2:b2 + self.cols] |= np.any(d <= r_ref[b1:b1 + self.rows][:, None], axis=0)
    return float(np.mean(sample_in)), float(np.mean(ref_in))


# -- reference / sample batch files ---------------------------------------------------------------

def read_statistics(path: str) -> dict[str, np.ndarray]:
  """Precomputed `mu`, `sigma`, `mu_s`, `sigma_s` of a reference batch, where present."""
  with np.load(path, allow_pickle=False) as z:
    return {k: z[k] for k in ('mu', 'sigma', 'mu_s', 'sigma_s') if k in z.files}
