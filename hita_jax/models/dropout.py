"""Dropout for the AR model and the tokenizer's transformers: inverted dropout with masks from
Threefry (stored for the backward, as autodiff keeps them) or from a keyed 32-bit hash of each
element's index, recomputed in the backward (`GPTConfig.dropout_rng`, `TokenizerConfig.dropout_rng`),
and per-sample stochastic depth.

Why the hash: an AR training step's masks are drawn up front and kept. On GPT-B/64 (H100,
2026-12-05b HLO) writing the Threefry words, turning them into one-byte masks and reading those in
the forward and backward moved 4.8 GB a step (12.9 GB for L), ~1.7 ms at HBM rate. A hash of the
index is a dozen integer operations, cheap enough to recompute where the mask is used, so the
mask is never written to memory.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

DROPOUT_RNGS = ('threefry', 'hash')
_INDEX_LIMIT = 2 ** 32  # elements a uint32 row-major index covers (a test lowers it)


def dropout(x, rate: float, key, bits: int = 32, rows: int | None = None, rng: str = 'threefry'):
  """Inverted dropout; `key=None` or rate 0 is the identity (eval / deterministic).
  rng='threefry': bits=32 draws `jax.random.bernoulli` (one Threefry call per element); bits=16
  draws `keep_mask_16`. rng='hash': `hash_dropout` (32 bits per decision; `bits` unused). `rows`:
  only x[:, :rows] are real (the rest pads the sequence for the attention kernel): the mask is
  drawn for the real rows alone, so it is the one an unpadded sequence gets."""
  if key is None or rate <= 0.0:
    return x
  if rng == 'hash':
    return hash_dropout(x, rate, key, rows)
  if rng != 'threefry':
    raise ValueError(f'dropout rng must be one of {DROPOUT_RNGS}, got {rng!r}')
  shape = x.shape if rows is None else (x.shape[0], rows) + x.shape[2:]
  if bits == 16 and x.shape[-1] % 4 == 0 and jax.random.key_data(key).shape == (2,):
    keep, scale = keep_mask_16(key, shape, rate)
  else:
    keep, scale = jax.random.bernoulli(key, 1.0 - rate, shape), 1.0 / (1.0 - rate)
  if shape != x.shape:
    keep = jnp.pad(keep, ((0, 0), (0, x.shape[1] - rows)) + ((0, 0),) * (x.ndim - 2),
                   constant_values=True)
  return jnp.where(keep, x * jnp.asarray(scale, x.dtype), 0).astype(x.dtype)


def _mix32(h):
  """A bijective 32-bit integer mixer (Wellons' `lowbias32`: xor-shift-multiply, low avalanche bias)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x7FEB352D)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


def hash_keep_mask(salts, shape, rate: float, rows: int | None = None):
  """The keep mask of `hash_dropout` -> (mask, scale). Element i (its row-major index in `shape`
  with the sequence axis cut to `rows`: the unpadded draw) is kept when
  mix(mix(i ^ s0) ^ s1) >= round(rate * 2**32), s = `salts` (uint32[2], from the key); padded
  rows are kept. Counters come from per-axis iotas, so a sharded array draws its own part only.
  An array of more than 2**32 elements (a uint32 index would wrap) hashes its first axis apart:
  mix(mix(j ^ s0) ^ mix(b ^ s1)), b the index on axis 0 and j the index within it.
  The drop probability is quantised to 2**-32 and `scale` = 1 / keep probability exactly."""
  real = shape if rows is None else (shape[0], rows) + tuple(shape[2:])
  wide = math.prod(real) > _INDEX_LIMIT
  if wide and math.prod(real[1:]) > 2 ** 32:
    raise ValueError(f'hash dropout: one row of a {real} array has more than 2**32 elements; use '
                     "dropout_rng='threefry' for it")
  counter = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(1 if wide else 0, len(shape))):
    # (a stride of exactly 2**32 only multiplies an iota of one value, 0)
    counter = counter + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2 ** 32)
    stride *= real[axis]
  if wide:
    lead = _mix32(jax.lax.broadcasted_iota(jnp.uint32, shape, 0) ^ salts[1])
    h = _mix32(_mix32(counter ^ salts[0]) ^ lead)
  else:
    h = _mix32(_mix32(counter ^ salts[0]) ^ salts[1])
  drop = min(int(round(rate * 2.0 ** 32)), 2 ** 32 - 1)
  keep = h >= jnp.uint32(drop)
  if rows is not None and rows < shape[1]:
    keep = keep | (jax.lax.broadcasted_iota(jnp.int32, shape, 1) >= rows)
  return keep, 2.0 ** 32 / (2.0 ** 32 - drop)


def _hash_salts(key):
  """Two 32-bit salts per dropout site from its key (any key implementation)."""
  return jax.random.bits(key, (2,), jnp.uint32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 3))
def _hash_dropout(x, rate, salts, rows):
  keep, scale = hash_keep_mask(salts, x.shape, rate, rows)
  return jnp.where(keep, x * jnp.asarray(scale, x.dtype), 0).astype(x.dtype)


def _hash_dropout_fwd(x, rate, salts, rows):
  return _hash_dropout(x, rate, salts, rows), salts  # the salts, not the mask, are kept


def _hash_dropout_bwd(rate, rows, salts, dy):
  # The barrier keeps XLA from merging this mask with the forward's (CSE), which would store it.
  keep, scale = hash_keep_mask(jax.lax.optimization_barrier(salts), dy.shape, rate, rows)
  dx = jnp.where(keep, dy * jnp.asarray(scale, dy.dtype), 0).astype(dy.dtype)
  return dx, None


_hash_dropout.defvjp(_hash_dropout_fwd, _hash_dropout_bwd)


def hash_dropout(x, rate: float, key, rows: int | None = None):
  """Inverted dropout with `hash_keep_mask`, recomputed in the backward instead of stored (its VJP
  keeps two salts): the mask costs integer arithmetic inside the kernels that use it, no memory.
  The same key gives the same mask in the forward, the backward, under jit and when sharded."""
  return _hash_dropout(x, float(rate), _hash_salts(key), rows)


def keep_mask_16(key, shape, rate: float):
  """A dropout keep mask from 16 random bits per element -> (mask, scale).

  JAX's partitionable Threefry spends one 2x32 hash (64 random bits) per element of
  `jax.random.bernoulli`; here every hash feeds four elements (4x fewer hashes: the masks of a
  GPT-B step were one 3.8 ms kernel of ~70 ms). The counters are the element indices built from
  per-axis iotas, so a sharded array draws its own part only. The drop probability becomes
  round(rate * 65536) / 65536 (|error| <= 7.6e-6) and `scale` = 1 / keep probability exactly, so
  E[mask * scale] = 1 still. Needs a Threefry key and a last axis divisible by 4."""
  from jax.extend.random import threefry2x32_p
  *lead, c = shape
  qshape = (*lead, c // 4)
  if math.prod(qshape) >= 2 ** 32:
    raise ValueError(f'keep_mask_16: {shape} has more than 2**34 elements')
  counter = jnp.zeros(qshape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(qshape))):
    counter = counter + jax.lax.broadcasted_iota(jnp.uint32, qshape, axis) * jnp.uint32(stride)
    stride *= qshape[axis]
  k = jax.random.key_data(key)
  y1, y2 = threefry2x32_p.bind(k[0], k[1], counter, jnp.zeros(qshape, jnp.uint32))
  drop = int(round(rate * 65536))
  return sixteen_bit_words(y1, y2).reshape(shape) >= drop, 65536.0 / (65536 - drop)


def sixteen_bit_words(y1, y2):
  """(..., n) uint32 hash halves -> (..., n, 4) 16-bit words: word j of hash i is
  (y1 low, y1 high, y2 low, y2 high)[j]. Spelled as broadcasts and a select rather than a stack (a
  concatenate, which XLA can keep as a kernel of its own that writes the whole mask), so it can
  fuse into the dropout's element-wise kernel."""
  j = jax.lax.broadcasted_iota(jnp.uint32, (*y1.shape, 4), y1.ndim)
  word = jnp.where(j < 2, y1[..., None], y2[..., None])
  return (word >> ((j & 1) * 16)) & jnp.uint32(0xFFFF)


def drop_path(x, rate: float, key):
  """Stochastic depth per sample (timm DropPath)."""
  if key is None or rate <= 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def module_dropout(module: nnx.Dropout, x, rng: str = 'threefry'):
  """`module(x)` (flax's Threefry mask, stored for the backward), or with rng='hash' `hash_dropout`
  on a key drawn from the module's own stream: one draw per call either way, so the other draws
  of a model are the same under both."""
  if rng == 'threefry':
    return module(x)
  if rng != 'hash':
    raise ValueError(f'dropout rng must be one of {DROPOUT_RNGS}, got {rng!r}')
  if module.deterministic or module.rate == 0.0:
    return x
  if module.rate >= 1.0:  # as flax: all dropped (the hash threshold cannot express it)
    return jnp.zeros_like(x)
  if module.rngs is None:
    raise ValueError('module_dropout: the Dropout module has no rngs (construct it with rngs=...)')
  return hash_dropout(x, module.rate, module.rngs())
