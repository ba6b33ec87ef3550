"""VQ-16 CNN encoder / decoder (LlamaGen's VQGAN layout, as used by Hita), NHWC.

GroupNorm(32, eps 1e-6) + swish, single-head attention blocks at the lowest resolution and in the
middle block, zero-pad-then-stride-2 downsampling, nearest-neighbour upsampling.

`groups` (official: 32) is configurable because a narrow CNN needs fewer: at ch=32, 32 groups make
every full-resolution norm an instance norm (each channel normalised per image), and the CPU demo's
tokenizer reconstructed each shape in the palette's mean colour; with 8 groups it did not
(docs/PERFORMANCE.md, 2026-11-30).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from hita_jax.models.layers import GroupNorm, conv, conv_apply, conv_without_bias


class ResnetBlock(nnx.Module):

  def __init__(self, cin: int, cout: int, *, dropout: float = 0.0, groups: int = 32,
               norm_impl: str = 'fused', dtype=jnp.float32, rngs: nnx.Rngs):
    self.fold_conv1_bias = norm_impl in ('fused', 'fused_recompute')
    self.norm1 = GroupNorm(cin, groups=groups, impl=norm_impl, rngs=rngs)
    self.conv1 = conv(cin, cout, 3, dtype=dtype, rngs=rngs)
    self.norm2 = GroupNorm(cout, groups=groups, impl=norm_impl, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.conv2 = conv(cout, cout, 3, dtype=dtype, rngs=rngs)
    self.nin_shortcut = conv(cin, cout, 1, dtype=dtype, rngs=rngs) if cin != cout else None

  def __call__(self, x):
    h = self.norm1(x, swish=True)
    if self.fold_conv1_bias:
      # conv1's bias is added inside norm2, whose backward then yields its gradient from sums it
      # makes anyway (same parameters; the sum is the same function).
      h = self.norm2(conv_without_bias(self.conv1, h), swish=True, pre_bias=self.conv1.bias[...])
    else:
      h = self.norm2(self.conv1(h), swish=True)
    h = conv_apply(self.conv2, self.dropout(h))
    if self.nin_shortcut is not None:
      x = conv_apply(self.nin_shortcut, x)
    return x + h


class AttnBlock(nnx.Module):
  """Single-head spatial self-attention with 1x1 conv projections, scale C^-0.5."""

  def __init__(self, c: int, *, groups: int = 32, norm_impl: str = 'fused', dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.norm = GroupNorm(c, groups=groups, impl=norm_impl, rngs=rngs)
    self.q = conv(c, c, 1, dtype=dtype, rngs=rngs)
    self.k = conv(c, c, 1, dtype=dtype, rngs=rngs)
    self.v = conv(c, c, 1, dtype=dtype, rngs=rngs)
    self.proj_out = conv(c, c, 1, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    b, h, w, c = x.shape
    y = self.norm(x)
    q, k, v = (conv_apply(m, y).reshape(b, h * w, c) for m in (self.q, self.k, self.v))
    logits = jnp.einsum('bic,bjc->bij', q, k, preferred_element_type=jnp.float32) * (c ** -0.5)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum('bij,bjc->bic', probs, v).reshape(b, h, w, c)
    return x + conv_apply(self.proj_out, out)


class Downsample(nnx.Module):

  def __init__(self, c: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.conv = conv(c, c, 3, stride=2, padding='VALID', dtype=dtype, rngs=rngs)

  def __call__(self, x):
    # torch: F.pad(x, (0, 1, 0, 1)) then a stride-2 valid conv (asymmetric padding).
    return conv_apply(self.conv, jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):

  def __init__(self, c: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.conv = conv(c, c, 3, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return conv_apply(self.conv, jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class ConvLevel(nnx.Module):
  """One resolution level: res blocks (each followed by an attention block at the lowest level)
  and an optional resampler."""

  def __init__(self, cin: int, cout: int, num_res: int, *, attn: bool, resample: str | None,
               dropout: float, groups: int = 32, norm_impl: str = 'fused', dtype, rngs: nnx.Rngs):
    res, attns = [], []
    for _ in range(num_res):
      res.append(ResnetBlock(cin, cout, dropout=dropout, groups=groups, norm_impl=norm_impl,
                             dtype=dtype, rngs=rngs))
      cin = cout
      if attn:
        attns.append(AttnBlock(cout, groups=groups, norm_impl=norm_impl, dtype=dtype, rngs=rngs))
    self.res = nnx.List(res)
    self.attn = nnx.List(attns)
    resamplers = {'down': Downsample, 'up': Upsample}
    self.resample = (resamplers[resample](cout, dtype=dtype, rngs=rngs)
                     if resample else None)

  def __call__(self, x):
    for i, block in enumerate(self.res):
      x = block(x)
      if len(self.attn):
        x = self.attn[i](x)
    if self.resample is not None:
      x = self.resample(x)
    return x


class MidBlock(nnx.Module):

  def __init__(self, c: int, *, dropout: float, groups: int = 32, norm_impl: str = 'fused', dtype,
               rngs: nnx.Rngs):
    kw = dict(groups=groups, norm_impl=norm_impl, dtype=dtype, rngs=rngs)
    self.res1 = ResnetBlock(c, c, dropout=dropout, **kw)
    self.attn = AttnBlock(c, **kw)
    self.res2 = ResnetBlock(c, c, dropout=dropout, **kw)

  def __call__(self, x):
    return self.res2(self.attn(self.res1(x)))


def _check_groups(ch: int, ch_mult: Sequence[int], groups: int) -> None:
  if groups <= 0 or ch % groups:
    raise ValueError(f'GroupNorm groups={groups} must divide the CNN width ch={ch} (and so every '
                     f'ch x ch_mult {tuple(ch * m for m in ch_mult)}); set tokenizer.norm_groups')


class CNNEncoder(nnx.Module):
  """Image (B, H, W, 3) in [-1, 1] -> features (B, H/2^(L-1), W/2^(L-1), z_channels)."""

  def __init__(self, *, in_channels: int = 3, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
               num_res_blocks: int = 2, z_channels: int = 512, dropout: float = 0.0,
               groups: int = 32, norm_impl: str = 'fused', dtype=jnp.float32, rngs: nnx.Rngs):
    _check_groups(ch, ch_mult, groups)
    self.dtype = dtype
    self.conv_in = conv(in_channels, ch, 3, dtype=dtype, rngs=rngs)
    in_mult = (1,) + tuple(ch_mult)
    levels = []
    n = len(ch_mult)
    for i in range(n):
      levels.append(ConvLevel(ch * in_mult[i], ch * ch_mult[i], num_res_blocks, attn=(i == n - 1),
                              resample='down' if i != n - 1 else None, dropout=dropout,
                              groups=groups, norm_impl=norm_impl, dtype=dtype, rngs=rngs))
    self.levels = nnx.List(levels)
    c = ch * ch_mult[-1]
    self.mid = MidBlock(c, dropout=dropout, groups=groups, norm_impl=norm_impl, dtype=dtype, rngs=rngs)
    self.norm_out = GroupNorm(c, groups=groups, impl=norm_impl, rngs=rngs)
    self.conv_out = conv(c, z_channels, 3, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    h = conv_apply(self.conv_in, x.astype(self.dtype))
    for level in self.levels:
      h = level(h)
    h = self.mid(h)
    return conv_apply(self.conv_out, self.norm_out(h, swish=True))


class CNNDecoder(nnx.Module):
  """Features (B, h, w, z_channels) -> image (B, h*2^(L-1), w*2^(L-1), 3)."""

  def __init__(self, *, out_channels: int = 3, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
               num_res_blocks: int = 3, z_channels: int = 512, dropout: float = 0.0,
               groups: int = 32, norm_impl: str = 'fused', dtype=jnp.float32, rngs: nnx.Rngs):
    _check_groups(ch, ch_mult, groups)
    self.dtype = dtype
    n = len(ch_mult)
    c = ch * ch_mult[-1]
    self.conv_in = conv(z_channels, c, 3, dtype=dtype, rngs=rngs)
    self.mid = MidBlock(c, dropout=dropout, groups=groups, norm_impl=norm_impl, dtype=dtype, rngs=rngs)
    levels = []
    for j, i in enumerate(reversed(range(n))):  # official order: lowest resolution first
      cout = ch * ch_mult[i]
      levels.append(ConvLevel(c, cout, num_res_blocks, attn=(i == n - 1),
                              resample='up' if i != 0 else None, dropout=dropout,
                              groups=groups, norm_impl=norm_impl, dtype=dtype, rngs=rngs))
      c = cout
    self.levels = nnx.List(levels)
    self.norm_out = GroupNorm(c, groups=groups, impl=norm_impl, rngs=rngs)
    self.conv_out = conv(c, out_channels, 3, dtype=dtype, rngs=rngs)

  def __call__(self, z):
    h = self.mid(conv_apply(self.conv_in, z.astype(self.dtype)))
    for level in self.levels:
      h = level(h)
    return conv_apply(self.conv_out, self.norm_out(h, swish=True)).astype(jnp.float32)
