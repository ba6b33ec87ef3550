"""The FID InceptionV3: the TF 2015-12-05 graph as pytorch-fid ports it (`fid_inception_v3`).

Differences from torchvision's InceptionV3 that FID depends on: batch norm without a learned scale
(eps 1e-3), average pools that exclude padding, a 3x3 max pool in the last block (Mixed_7c), and
a 1008-way classifier. Outputs: `pool3` (2048, global mean of Mixed_7c), `spatial` = `mixed_6/conv`
(Mixed_6d.branch1x1 after ReLU, N x 17 x 17 x 192 at 299 px, the sFID features) and `logits` (IS,
`pool3 @ W` without bias, as the ADM evaluator reads `softmax/logits/MatMul`) when weights have it.
Runs in fp32 at HIGHEST matmul precision (no TF32/bf16): metric networks must be exact.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hita_jax.models.resize import resize_with_matrices

HIGHEST = jax.lax.Precision.HIGHEST


def _pair(v):
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nnx.Module):
  """conv (no bias) -> batch norm (eval statistics, eps 1e-3) -> ReLU."""

  def __init__(self, cin: int, cout: int, kernel, *, stride=1, padding=0, rngs: nnx.Rngs):
    kh, kw = _pair(kernel)
    self.stride = _pair(stride)
    ph, pw = _pair(padding)
    self.padding = ((ph, ph), (pw, pw))
    self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (kh, kw, cin, cout)))
    self.scale = nnx.Param(jnp.ones((cout,), jnp.float32))   # 1 for the TF graph (no gamma)
    self.bias = nnx.Param(jnp.zeros((cout,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((cout,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((cout,), jnp.float32))

  def __call__(self, x):
    y = jax.lax.conv_general_dilated(x, self.kernel[...], self.stride, self.padding,
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=HIGHEST)
    y = (y - self.mean[...]) * jax.lax.rsqrt(self.var[...] + 1e-3) * self.scale[...] + self.bias[...]
    return jax.nn.relu(y)


def max_pool(x, k=3, stride=2, pad=0):
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, stride, stride, 1),
                               ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def avg_pool_exclude_pad(x, k=3, stride=1, pad=1):
  """Average pool that divides by the number of real (non-padding) inputs (TF / pytorch-fid)."""
  window, strides = (1, k, k, 1), (1, stride, stride, 1)
  padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
  s = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, padding)
  n = jax.lax.reduce_window(jnp.ones_like(x[:1, :, :, :1]), 0.0, jax.lax.add, window, strides, padding)
  return s / n


class InceptionA(nnx.Module):

  def __init__(self, cin, pool_features, *, rngs):
    self.branch1x1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch5x5_1 = BasicConv2d(cin, 48, 1, rngs=rngs)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = BasicConv2d(cin, pool_features, 1, rngs=rngs)

  def __call__(self, x):
    b1 = self.branch1x1(x)
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(avg_pool_exclude_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):

  def __init__(self, cin, *, rngs):
    self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3(x)
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([b3, bd, max_pool(x)], axis=-1)


class InceptionC(nnx.Module):

  def __init__(self, cin, c7, *, rngs):
    self.branch1x1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch7x7_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

  def __call__(self, x, return_branch1x1=False):
    b1 = self.branch1x1(x)
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for m in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
              self.branch7x7dbl_5):
      bd = m(bd)
    out = jnp.concatenate([b1, b7, bd, self.branch_pool(avg_pool_exclude_pad(x))], axis=-1)
    return (out, b1) if return_branch1x1 else out


class InceptionD(nnx.Module):

  def __init__(self, cin, *, rngs):
    self.branch3x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return jnp.concatenate([b3, b7, max_pool(x)], axis=-1)


class InceptionE(nnx.Module):

  def __init__(self, cin, *, pool: str, rngs):
    self.pool = pool  # 'avg' (Mixed_7b) or 'max' (Mixed_7c, the TF graph's quirk)
    self.branch1x1 = BasicConv2d(cin, 320, 1, rngs=rngs)
    self.branch3x3_1 = BasicConv2d(cin, 384, 1, rngs=rngs)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

  def __call__(self, x):
    b1 = self.branch1x1(x)
    a = self.branch3x3_1(x)
    b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = avg_pool_exclude_pad(x) if self.pool == 'avg' else max_pool(x, 3, 1, 1)
    return jnp.concatenate([b1, self.branch3x3_2a(a), self.branch3x3_2b(a), self.branch3x3dbl_3a(b),
                            self.branch3x3dbl_3b(b), self.branch_pool(pooled)], axis=-1)


class InceptionV3(nnx.Module):

  def __init__(self, *, num_classes: int = 1008, rngs: nnx.Rngs):
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
    self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
    self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
    self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
    self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = InceptionE(1280, pool='avg', rngs=rngs)
    self.Mixed_7c = InceptionE(2048, pool='max', rngs=rngs)
    # IS head: (2048, 1008) `softmax/logits/MatMul` weight; absent from FID-only weight files.
    self.fc = nnx.Param(jnp.zeros((2048, num_classes), jnp.float32))
    self.has_logits = nnx.Variable(jnp.zeros((), bool))

  def __call__(self, x) -> dict[str, jnp.ndarray]:
    """x: (N, H, W, 3) float32 already preprocessed (e.g. (u8 - 128) / 128 at 299 px)."""
    x = x.astype(jnp.float32)
    for m in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3):
      x = m(x)
    x = max_pool(x)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = max_pool(x)
    for m in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
      x = m(x)
    x, spatial = self.Mixed_6d(x, return_branch1x1=True)
    for m in (self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
      x = m(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    logits = jnp.dot(pool3, self.fc[...], precision=HIGHEST)
    return {'pool3': pool3, 'spatial': spatial, 'logits': logits}


def sfid_features(spatial):
  """ADM sFID features: mixed_6/conv [..., :7] flattened in (H, W, C) order -> (N, 17*17*7)."""
  return spatial[..., :7].reshape(spatial.shape[0], -1)


def tf1_bilinear_matrix(n_in: int, n_out: int):
  """TF1 legacy `ResizeBilinear` (align_corners=False, no half-pixel centres) as (n_out, n_in)."""
  scale = n_in / n_out
  m = np.zeros((n_out, n_in), np.float64)
  for d in range(n_out):
    src = d * scale
    x0 = int(np.floor(src))
    x1 = min(x0 + 1, n_in - 1)
    f = src - x0
    m[d, x0] += 1.0 - f
    m[d, x1] += f
  return m


def adm_preprocess(images_u8, size: int = 299):
  """ADM evaluator input path: uint8 NHWC -> TF1 bilinear resize to 299 -> (x - 128) / 128."""
  x = images_u8.astype(jnp.float32)
  if x.shape[1:3] != (size, size):
    x = resize_with_matrices(x, tf1_bilinear_matrix(x.shape[1], size), tf1_bilinear_matrix(x.shape[2], size))
  return (x - 128.0) / 128.0
