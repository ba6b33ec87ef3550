"""Reconstruction metrics as the official `vqgan_test.py` computes them (skimage conventions)."""
from __future__ import annotations

import numpy as np
from scipy.ndimage import uniform_filter


def psnr(restored: np.ndarray, gt: np.ndarray) -> float:
  """skimage `peak_signal_noise_ratio(restored, gt)` on [0, 1] float images (data range 1)."""
  mse = np.mean((restored.astype(np.float64) - gt.astype(np.float64)) ** 2)
  return float(10 * np.log10(1.0 / mse)) if mse > 0 else float('inf')


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 2.0, win: int = 7) -> float:
  """skimage `structural_similarity(a, b, channel_axis=-1, data_range=...)` (uniform 7x7 window,
  sample covariance, K1 0.01, K2 0.03, border of 3 excluded), mean over channels. The default
  data_range=2.0 on [0, 1] images is the official convention (it inflates SSIM)."""
  a, b = a.astype(np.float64), b.astype(np.float64)
  np_ = win * win
  cov_norm = np_ / (np_ - 1)
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  pad = (win - 1) // 2
  vals = []
  for ch in range(a.shape[-1]):
    x, y = a[..., ch], b[..., ch]
    f = lambda z: uniform_filter(z, size=win)
    ux, uy = f(x), f(y)
    vx = cov_norm * (f(x * x) - ux * ux)
    vy = cov_norm * (f(y * y) - uy * uy)
    vxy = cov_norm * (f(x * y) - ux * uy)
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    vals.append(s[pad:-pad, pad:-pad].mean())
  return float(np.mean(vals))
