"""L2-normalised vector quantizer (Hita uses two: patch codes and holistic codes).

Nearest code by squared distance between unit vectors, computed in fp32 exactly as the official
`|z|^2 + |e|^2 - 2 z.e` (argmin takes the first index on ties), a straight-through output, and the
vq / commit (beta = 0.25) / entropy losses. The codebook is learned by gradient (no EMA).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx



class CodeUsage(nnx.Variable):
  """FIFO of the most recent code ids (official `codebook_used`, 65536 entries): usage statistic
  only, updated in training, never read by the forward. Not a parameter."""


def l2_normalize(x, axis=-1, eps=1e-12):
  # torch F.normalize: x / max(||x||, eps)
  n = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(n, eps)


def entropy_loss(affinity, temperature: float = 0.01):
  """Official `compute_entropy_loss` (softmax type) on -distances."""
  flat = affinity.reshape(-1, affinity.shape[-1]) / temperature
  probs = jax.nn.softmax(flat, axis=-1)
  log_probs = jax.nn.log_softmax(flat + 1e-5, axis=-1)
  avg_probs = jnp.mean(probs, axis=0)
  avg_entropy = -jnp.sum(avg_probs * jnp.log(avg_probs + 1e-5))
  sample_entropy = -jnp.mean(jnp.sum(probs * log_probs, axis=-1))
  return sample_entropy - avg_entropy


def codes_used_fraction(codes, codebook_size: int):
  """Distinct code ids in `codes` (one step's global batch) over the codebook size: the codebook
  usage the official trainer logs each step."""
  seen = jnp.zeros((codebook_size,), bool).at[codes.reshape(-1)].set(True)
  return jnp.mean(seen.astype(jnp.float32))


class VectorQuantizer(nnx.Module):

  def __init__(self, codebook_size: int, code_dim: int, *, beta: float = 0.25,
               entropy_loss_ratio: float = 0.0, usage_window: int = 65536, rngs: nnx.Rngs):
    self.codebook_size = codebook_size
    self.code_dim = code_dim
    self.beta = beta
    self.entropy_loss_ratio = entropy_loss_ratio
    init = jax.random.uniform(rngs.params(), (codebook_size, code_dim), jnp.float32,
                              -1.0 / codebook_size, 1.0 / codebook_size)
    self.codebook = nnx.Param(l2_normalize(init), out_sharding=('vocab', None))
    self.usage = CodeUsage(jnp.zeros((usage_window,), jnp.int32))
    self.deterministic = False  # flipped by model.eval(): no usage updates in eval mode

  def normalized_codebook(self):
    return l2_normalize(self.codebook[...].astype(jnp.float32))

  def distances(self, z):
    """Official squared distances between unit vectors, fp32: (..., codebook_size)."""
    e = self.normalized_codebook()
    zf = z.astype(jnp.float32)
    return (jnp.sum(zf ** 2, axis=-1, keepdims=True) + jnp.sum(e ** 2, axis=-1)
            - 2.0 * jnp.einsum('...d,nd->...n', zf, e, precision='highest'))

  def lookup(self, indices):
    """Code ids (...) -> normalised code vectors (..., code_dim) (official `get_codebook_entry`)."""
    return jnp.take(self.normalized_codebook(), indices, axis=0)

  def __call__(self, z):
    """z: (..., code_dim) pre-quant vectors -> (z_q straight-through, indices, losses dict)."""
    z = l2_normalize(z.astype(jnp.float32))
    d = self.distances(z)
    idx = jnp.argmin(d, axis=-1).astype(jnp.int32)
    e = self.lookup(idx)
    losses = {
        'vq': jnp.mean(jnp.square(e - jax.lax.stop_gradient(z))),
        'commit': self.beta * jnp.mean(jnp.square(jax.lax.stop_gradient(e) - z)),
        'entropy': (self.entropy_loss_ratio * entropy_loss(-d)
                    if self.entropy_loss_ratio else jnp.zeros((), jnp.float32)),
    }
    if not self.deterministic:
      flat = idx.reshape(-1)
      n = min(flat.shape[0], self.usage.shape[0])
      self.usage[...] = jnp.concatenate([self.usage[...][n:], flat[-n:]])
    z_q = z + jax.lax.stop_gradient(e - z)
    return z_q, idx, losses

  def usage_fraction(self):
    """Fraction of the codebook seen in the FIFO window of the last 65536 codes (smaller than one
    step's patch codes at the recipe batch; see `codes_used_fraction` for the logged figure)."""
    seen = jnp.zeros((self.codebook_size,), bool).at[self.usage[...]].set(True)
    return jnp.mean(seen.astype(jnp.float32))
