"""Resampling kernels that match PyTorch / kornia / PIL bit-for-bit (up to float rounding).

`jax.image.resize` uses Keys a=-0.5 with half-pixel centres and antialias on downsampling, which matches
none of the interpolations the official Hita code uses (spec section 12.11). Every resize here is a
separable linear map, so we build the (out, in) matrix once in float64 numpy and apply it with an
einsum; the matrices are constants under jit.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  x = np.abs(x)
  return np.where(x <= 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
                  np.where(x < 2.0, ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a, 0.0))


@functools.lru_cache(maxsize=None)
def torch_bicubic_matrix(n_in: int, n_out: int, *, align_corners: bool = False,
                         scale_factor: float | None = None, a: float = -0.75) -> np.ndarray:
  """`F.interpolate(mode='bicubic', antialias=False)` along one axis as an (n_out, n_in) matrix.

  With `scale_factor` given (and align_corners=False) PyTorch maps coordinates with 1/scale_factor,
  not n_in/n_out; the official pos-embed interpolation relies on that. Source coordinates and tap
  weights are computed in float32 in the same order as PyTorch's CPU kernel (its `opmath_t`), so
  the matrix entries are the ones PyTorch uses.
  """
  f32 = np.float32
  if align_corners:
    scale = f32(n_in - 1) / f32(n_out - 1) if n_out > 1 else f32(0.0)
  else:
    scale = f32(1.0 / scale_factor) if scale_factor else f32(n_in) / f32(n_out)
  A = f32(a)

  def cc1(x):  # |x| <= 1
    return ((A + f32(2)) * x - (A + f32(3))) * x * x + f32(1)

  def cc2(x):  # 1 < |x| < 2
    return ((A * x - f32(5) * A) * x + f32(8) * A) * x - f32(4) * A

  m = np.zeros((n_out, n_in), np.float64)
  for d in range(n_out):
    src = scale * f32(d) if align_corners else scale * (f32(d) + f32(0.5)) - f32(0.5)
    idx = min(int(np.floor(src)), n_in - 1)
    t = min(max(f32(src - f32(idx)), f32(0)), f32(1))
    w = (cc2(t + f32(1)), cc1(t), cc1(f32(1) - t), cc2(f32(1) - t + f32(1)))
    for k in range(4):
      m[d, min(max(idx - 1 + k, 0), n_in - 1)] += float(w[k])
  return m


@functools.lru_cache(maxsize=None)
def torch_bicubic_aa_matrix(n_in: int, n_out: int, *, scale_factor: float | None = None) -> np.ndarray:
  """`F.interpolate(mode='bicubic', antialias=True, align_corners=False)` (PyTorch's CPU AA kernel:
  Keys a=-0.5 stretched by the downscale factor, weights renormalised per output pixel)."""
  scale = 1.0 / scale_factor if scale_factor else n_in / n_out
  support = 2.0 * scale if scale >= 1.0 else 2.0
  invscale = 1.0 / scale if scale >= 1.0 else 1.0
  m = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    center = scale * (i + 0.5)
    xmin = max(int(center - support + 0.5), 0)
    xmax = min(int(center + support + 0.5), n_in)
    j = np.arange(xmin, xmax)
    w = _cubic((j - center + 0.5) * invscale, -0.5)
    if w.sum() != 0:
      w = w / w.sum()
    m[i, xmin:xmax] = w
  return m


@functools.lru_cache(maxsize=None)
def _gaussian_blur_matrix(n: int, ksize: int, sigma: float) -> np.ndarray:
  """kornia `gaussian_blur2d` along one axis: normalised Gaussian taps, 'reflect' border."""
  x = np.arange(ksize, dtype=np.float64) - ksize // 2
  g = np.exp(-x ** 2 / (2.0 * sigma ** 2))
  g /= g.sum()
  m = np.zeros((n, n), np.float64)
  r = ksize // 2
  for i in range(n):
    for t in range(ksize):
      j = i + t - r
      if j < 0:
        j = -j
      elif j >= n:
        j = 2 * (n - 1) - j
      m[i, j] += g[t]
  return m


@functools.lru_cache(maxsize=None)
def kornia_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """`kornia.geometry.resize(..., interpolation='bicubic', align_corners=True, antialias=True)`
  along one axis: Gaussian pre-blur (only when downscaling), then PyTorch bicubic align_corners."""
  m = torch_bicubic_matrix(n_in, n_out, align_corners=True)
  factor = n_in / n_out
  if factor > 1.0:  # kornia only blurs when it shrinks
    sigma = max((factor - 1.0) / 2.0, 0.001)
    ks = int(max(2.0 * 2 * sigma, 3))
    ks += (ks % 2 == 0)
    m = m @ _gaussian_blur_matrix(n_in, ks, sigma)
  return m


def resize_with_matrices(x: jnp.ndarray, mh: np.ndarray, mw: np.ndarray, *,
                         layout: str = 'NHWC') -> jnp.ndarray:
  """Applies separable (out, in) matrices to the two spatial axes of `x` in fp32 at full precision."""
  dt = x.dtype
  mh32, mw32 = jnp.asarray(mh, jnp.float32), jnp.asarray(mw, jnp.float32)
  x = x.astype(jnp.float32)
  if layout == 'NHWC':
    y = jnp.einsum('oh,bhwc->bowc', mh32, x, precision='highest')
    y = jnp.einsum('pw,bowc->bopc', mw32, y, precision='highest')
  elif layout == 'HWC':
    y = jnp.einsum('oh,hwc->owc', mh32, x, precision='highest')
    y = jnp.einsum('pw,owc->opc', mw32, y, precision='highest')
  else:
    raise ValueError(f'unknown layout {layout!r}')
  return y.astype(dt)


def torch_bicubic_resize(x: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
  """PyTorch `F.interpolate(x, size, mode='bicubic')` (a=-0.75, align_corners=False) on NHWC."""
  return resize_with_matrices(x, torch_bicubic_matrix(x.shape[1], size[0]),
                              torch_bicubic_matrix(x.shape[2], size[1]))


def kornia_bicubic_resize(x: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
  """kornia antialiased bicubic resize (align_corners=True) on NHWC, as Hita's DINOv2 branch."""
  return resize_with_matrices(x, kornia_resize_matrix(x.shape[1], size[0]),
                              kornia_resize_matrix(x.shape[2], size[1]))


def interpolate_pos_table(table: jnp.ndarray, grid: int, out_hw: tuple[int, int], *,
                          offset: float, antialias: bool) -> jnp.ndarray:
  """Resizes a (grid*grid, C) position table to (out_h*out_w, C) the way DINO/Hita do it:
  `F.interpolate(scale_factor=((h+offset)/grid, (w+offset)/grid), mode='bicubic', antialias=...)`."""
  oh, ow = out_hw
  sh, sw = (oh + offset) / grid, (ow + offset) / grid
  if int(oh + offset) != oh or int(ow + offset) != ow:
    raise ValueError(f'offset {offset} changes the output grid {out_hw}')
  fn = torch_bicubic_aa_matrix if antialias else (
      lambda n_in, n_out, scale_factor: torch_bicubic_matrix(n_in, n_out, scale_factor=scale_factor))
  mh = fn(grid, oh, scale_factor=sh)
  mw = fn(grid, ow, scale_factor=sw)
  c = table.shape[-1]
  out = resize_with_matrices(table.reshape(grid, grid, c), mh, mw, layout='HWC')
  return out.reshape(oh * ow, c)


def torch_area_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) matrix of PyTorch `F.interpolate(mode='area')` (= adaptive average pooling):
  output i averages inputs floor(i * n_in / n_out) .. ceil((i + 1) * n_in / n_out) - 1."""
  m = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
    m[i, lo:hi] = 1.0 / (hi - lo)
  return m


def torch_area_resize(x: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
  """PyTorch `F.interpolate(x, size, mode='area')` on NHWC (separable: the windows are products)."""
  return resize_with_matrices(x, torch_area_matrix(x.shape[1], size[0]),
                              torch_area_matrix(x.shape[2], size[1]))
