"""LPIPS (v0.1, VGG16 backbone), the tokenizer's perceptual loss, NHWC.

Inputs in [-1, 1]. ScalingLayer `(x - shift) / scale`; VGG16 features tapped after relu1_2,
relu2_2, relu3_3, relu4_3, relu5_3; each tap unit-normalised over channels (`f / (||f|| + 1e-10)`),
squared difference, Dropout(0.5) then a 1x1 conv to 1 channel without bias (the linear heads),
spatial mean, summed over the 5 taps. The official training loop leaves the LPIPS module in train
mode, so the head dropout is active during tokenizer training (pass `dropout_rng`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hita_jax.models import layers

VGG16_CFG = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512)
TAP_CHANNELS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

# How a tap's per-pixel norm meets the tap. 'split' (default): the norm is computed behind an
# optimization barrier, so XLA cannot fuse the channel reduction with the division, the squared
# difference, the dropout and the head into one normalisation fusion. The arithmetic is the same
# (the same fp32 reduction and division); what changes is the GPU compile: XLA's priority fusion
# priced that fusion and its backward at ~0.1 s per decision, and with 'fused' it spent ~24 s of
# its ~40 s in the Hita-V/16 step on LPIPS (H100 target, deviceless compile, 2026-12-07). 'fused'
# keeps the single-fusion form for A/B runs (`--set lpips.TAP_NORM=fused`). Read at trace time.
TAP_NORMS = ('split', 'fused')
TAP_NORM = 'split'


def unit_normalize(f):
  """f / (||f||_channels + 1e-10), the LPIPS tap normalisation (see TAP_NORM)."""
  if TAP_NORM not in TAP_NORMS:
    raise ValueError(f'lpips.TAP_NORM must be one of {TAP_NORMS}, got {TAP_NORM!r}')
  norm = jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + 1e-10
  if TAP_NORM == 'split':
    norm = jax.lax.optimization_barrier(norm)
  return f / norm


class LPIPS(nnx.Module):

  def __init__(self, *, rngs: nnx.Rngs, dropout: float = 0.5, dtype=jnp.float32):
    # dtype: the VGG convolutions' compute dtype. The official trainer computes LPIPS under bf16
    # autocast (bf16 convolutions); the normalisation and distances below stay fp32.
    convs = []
    cin = 3
    for v in VGG16_CFG:
      if v == 'M':
        continue
      convs.append(nnx.Conv(cin, v, (3, 3), padding='SAME', dtype=dtype, param_dtype=jnp.float32,
                            rngs=rngs))
      cin = v
    self.convs = nnx.List(convs)
    self.lins = nnx.List([nnx.Param(jnp.full((c,), 1.0 / c, jnp.float32)) for c in TAP_CHANNELS])
    self.shift = nnx.Variable(jnp.asarray(SHIFT, jnp.float32))
    self.scale = nnx.Variable(jnp.asarray(SCALE, jnp.float32))
    self.dropout = dropout

  def features(self, x):
    """The 5 VGG16 taps (relu1_2 ... relu5_3) of [-1, 1] NHWC images."""
    h = (x.astype(jnp.float32) - self.shift[...]) / self.scale[...]
    taps, ci = [], 0
    for v in VGG16_CFG + ('M',):
      if v == 'M':
        taps.append(h.astype(jnp.float32))
        # The Python-scalar init selects JAX's differentiable max-pool for any dtype (an array init,
        # staged under jit, falls back to a generic reduce_window that has no gradient).
        h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID')
        continue
      h = jax.nn.relu(layers.conv_apply(self.convs[ci], h))
      ci += 1
    return taps[:5]

  def __call__(self, x, y, *, dropout_rng=None, per_layer: bool = False):
    """Distance per image pair (B,) (and (B, 5) per-layer terms with per_layer=True)."""
    terms = []
    keys = jax.random.split(dropout_rng, 5) if dropout_rng is not None else [None] * 5
    for i, (fx, fy) in enumerate(zip(self.features(x), self.features(y))):
      d = (unit_normalize(fx) - unit_normalize(fy)) ** 2
      if keys[i] is not None and self.dropout > 0:
        keep = jax.random.bernoulli(keys[i], 1.0 - self.dropout, d.shape)
        d = jnp.where(keep, d / (1.0 - self.dropout), 0.0)
      terms.append(jnp.mean(jnp.einsum('bhwc,c->bhw', d, self.lins[i][...],
                                       precision='highest'), axis=(1, 2)))
    per = jnp.stack(terms, axis=1)
    total = jnp.sum(per, axis=1)
    return (total, per) if per_layer else total
