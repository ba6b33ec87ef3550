"""2D rotary position embedding for patch tokens (LlamaGen's `precompute_freqs_cis_2d`, as Hita
indexes it), and the per-position tables the GPT uses.

Layout: head_dim/2 frequency pairs, applied to interleaved pairs (x[2m], x[2m+1]) (gpt-fast
"complex" layout, not rotate-half). With half = head_dim/2, freqs_i = base^(-2i/half) for
i < half/2; pair m rotates by row*freqs_m for m < half/2 and by col*freqs_{m-half/2} otherwise.
head_dim 64 gives 16 + 16 frequencies, the 2B model's head_dim 60 gives 15 + 15.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
def rope_2d_table(grid: int, head_dim: int, base: float = 10000.0, num_zero_rows: int = 1) -> np.ndarray:
  """(num_zero_rows + grid*grid, head_dim//2, 2) [cos, sin] table in float32, computed in the same
  float32 order as the official code; the leading zero rows are LlamaGen's class-token rows."""
  half = head_dim // 2
  f32 = np.float32
  freqs = f32(1.0) / (f32(base) ** (np.arange(0, half, 2)[: half // 2].astype(f32) / f32(half)))
  t = np.arange(grid, dtype=f32)
  freqs = np.outer(t, freqs).astype(f32)                                # (grid, half/2)
  fg = np.concatenate([np.broadcast_to(freqs[:, None, :], (grid, grid, freqs.shape[1])),
                       np.broadcast_to(freqs[None, :, :], (grid, grid, freqs.shape[1]))], axis=-1)
  cache = np.stack([np.cos(fg), np.sin(fg)], axis=-1).reshape(grid * grid, -1, 2).astype(f32)
  if cache.shape[1] != half:
    raise ValueError(f'head_dim {head_dim} must be a multiple of 4 for 2D RoPE')
  return np.concatenate([np.zeros((num_zero_rows, half, 2), f32), cache], axis=0)


@functools.lru_cache(maxsize=None)
def gpt_position_tables(num_holistic: int, grid: int, head_dim: int, base: float, length: int
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per input position p in [0, length): (is_holistic (length,), cos (length, hd/2), sin).

  Positions p < S (class token + q0..q_{S-2}) get the learned holistic position embedding added to
  q and k and no rotation (cos 1, sin 0). Positions p >= S use RoPE row p - S of the official
  table, whose row 0 is all zeros: the last holistic token q_{S-1} (p = S) gets q = k = 0 in every
  layer, exactly as the official code (`freqs_cis[input_pos - num_slots]`)."""
  table = rope_2d_table(grid, head_dim, base, 1)
  half = head_dim // 2
  cos = np.ones((length, half), np.float32)
  sin = np.zeros((length, half), np.float32)
  p = np.arange(length)
  rows = p - num_holistic
  img = (rows >= 0) & (rows < table.shape[0])  # rows past the table only pad KV caches
  cos[img] = table[rows[img], :, 0]
  sin[img] = table[rows[img], :, 1]
  return p < num_holistic, cos, sin


def apply_rope(x, cos, sin):
  """x: (B, T, H, D); cos/sin: (T, D/2) or (B, T, D/2). Interleaved-pair rotation in fp32:
  (x0, x1) -> (x0 c - x1 s, x1 c + x0 s).

  Written as x * c + swap(x) * (-s, s), where swap reverses each pair (one `rev` on a size-2
  axis), instead of slicing x0 / x1 apart and stacking the results: the same products and sums
  (x0 c + x1 (-s) == x0 c - x1 s; only the backend's choice of which product to contract into a
  fused multiply-add can move a result by an ulp), without strided slices, a stack's concatenate
  and, in the gradient, pads: a reverse and broadcasts fuse into one element-wise loop."""
  dt = x.dtype
  pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  if cos.ndim == 2:
    cos, sin = cos[None], sin[None]
  c = cos[:, :, None, :, None].astype(jnp.float32)
  s = sin[:, :, None, :, None].astype(jnp.float32) * jnp.array([-1.0, 1.0], jnp.float32)
  out = pairs * c + pairs[..., ::-1] * s
  return out.reshape(x.shape).astype(dt)
