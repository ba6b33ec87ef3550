"""The decode step's matrix products as fused GPU kernels (Pallas / Triton), for few-row inputs.

A decode step multiplies M = 2 x batch rows (CFG) by every weight of every layer. At M = 128 a
GEMM reads its weights once and does little arithmetic, so each XLA GEMM of a GPT-B step (5.6 us,
~5x its weight-read time on an H200) and each norm / SwiGLU / residual kernel around it is mostly
launch and tail. These kernels fold the element-wise work into the products, so a layer needs four
kernels besides its attention instead of ~13:

- `norm_qkv_rope(x, gain, w_qkv, add, cos, sin)`: RMSNorm(x) @ w_qkv, + the holistic position
  embedding and RoPE on q and k, as three outputs q / k / v. RoPE's interleaved pairs become two
  column blocks per head through a column order (`half_split_columns`) given to q's and k's
  weights alike, which leaves every q.k product unchanged.
- `norm_matmul(x, gain, w, w_gate=w3)`: silu(RMSNorm(x) @ w) * (RMSNorm(x) @ w3), the SwiGLU up
  projections, two products per program sharing the normalised tile, written once as the hidden.
- `matmul_residual(a, w, r)`: r + a @ w (the output projection and the FFN down projection).
- `norm_matmul(x, gain, w)`: RMSNorm(x) @ w (the head, in fp32; the qkv projection where the head
  dim has no RoPE kernel). Each program recomputes the fp32 statistics of its rows (a few hundred
  KB, read from L2), then the product.

Numerics follow the HLO of the XLA path in `models/gpt.py`: the normalised rows are rounded to the
compute dtype before the gain, each product accumulates in fp32 and is rounded to the compute dtype
before the position embedding, the SwiGLU or the residual add (SiLU is rounded once, as one op).
fp32 products take the default matmul precision, as XLA's (TF32 tensor cores on a GPU). Besides
that only the products' summation order differs (XLA may also skip some of its own bf16 roundings
under its default excess-precision setting).

The grid is (row blocks, column blocks); K is walked in `block_k` slices. Block sizes are powers of
two (Triton) that must divide K and N (`fits`; the model keeps the XLA path for a product that
does not fit); rows are padded to the row block when M is not a multiple of it. Off a GPU the
kernels run in Pallas interpret mode (tests).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from hita_jax.models.layers import kernel_tuning

DECODE_LAYER_IMPLS = ('xla', 'pallas')
# Launch parameters; `bench decode_matmul --tune` measures them on a GPU. Not yet tuned on one.
_TUNING = {'block_m': 64, 'block_n': 32, 'block_k': 128, 'num_warps': 4, 'num_stages': 3}


def tuning(**kw):
  """Within this context the kernels use these launch parameters (see `_TUNING`; for benchmarks)."""
  return kernel_tuning(_TUNING, 'decode matmul', **kw)


def _block(n: int, want: int) -> int | None:
  """The largest power of two <= want (and >= 16) dividing n, or None."""
  b = want
  while b >= 16:
    if n % b == 0:
      return b
    b //= 2
  return None


def fits(k: int, n: int, block_n: int | None = None, block_k: int | None = None) -> bool:
  """Whether a (., k) @ (k, n) product has Triton blocks: power-of-two blocks >= 16 dividing both."""
  return (_block(k, block_k or _TUNING['block_k']) is not None
          and _block(n, block_n or _TUNING['block_n']) is not None)


def _dot(a, b):
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _round(x, dtype):
  return x.astype(dtype).astype(jnp.float32)


def _normalised(x_ref, g_ref, rows, ks, inv, dt):
  """Official RMSNorm of a (block_m, block_k) tile: normalised in fp32, rounded to the compute
  dtype, then scaled by the gain (also in the compute dtype)."""
  y = _round(x_ref[rows, ks].astype(jnp.float32) * inv[:, None], dt)
  return (y * _round(g_ref[ks].astype(jnp.float32), dt)[None, :]).astype(dt)


def _norm_kernel(*refs, k: int, block_m: int, block_n: int, block_k: int, eps: float, gated: bool):
  x_ref, g_ref, w_ref = refs[:3]
  w3_ref, o_ref = (refs[3], refs[4]) if gated else (None, refs[3])
  dt = x_ref.dtype
  i, j = pl.program_id(0), pl.program_id(1)
  rows, cols = pl.ds(i * block_m, block_m), pl.ds(j * block_n, block_n)
  n_k = k // block_k

  def sum_sq(kk, acc):
    xb = x_ref[rows, pl.ds(kk * block_k, block_k)].astype(jnp.float32)
    return acc + jnp.sum(xb * xb, axis=1)
  ss = jax.lax.fori_loop(0, n_k, sum_sq, jnp.zeros((block_m,), jnp.float32))
  inv = jax.lax.rsqrt(ss / k + eps)
  zero = jnp.zeros((block_m, block_n), jnp.float32)
  if not gated:
    def product(kk, acc):
      ks = pl.ds(kk * block_k, block_k)
      return acc + _dot(_normalised(x_ref, g_ref, rows, ks, inv, dt), w_ref[ks, cols])
    acc = jax.lax.fori_loop(0, n_k, product, zero)
    o_ref[rows, cols] = acc.astype(o_ref.dtype)
    return

  def products(kk, accs):
    ks = pl.ds(kk * block_k, block_k)
    y = _normalised(x_ref, g_ref, rows, ks, inv, dt)
    return accs[0] + _dot(y, w_ref[ks, cols]), accs[1] + _dot(y, w3_ref[ks, cols])
  a, b = jax.lax.fori_loop(0, n_k, products, (zero, zero))
  a, b = _round(a, dt), _round(b, dt)  # each projection rounded, as XLA's two products
  silu = _round(a / (1.0 + jnp.exp(-a)), dt)
  o_ref[rows, cols] = (silu * b).astype(o_ref.dtype)


def _qkv_rope_kernel(x_ref, g_ref, w_ref, add_ref, cos_ref, sin_ref, q_ref, k_ref, v_ref, *, k: int,
                     block_m: int, half: int, n_head: int, block_k: int, eps: float):
  """One head of q, k or v (program column j: q heads, then k, then v): RMSNorm(x) @ w_half_split
  as two column halves, plus the position embedding and the rotation for q and k. Three outputs,
  so that no slice of a fused qkv has to be copied out for the attention kernel."""
  dt = x_ref.dtype
  i, j = pl.program_id(0), pl.program_id(1)
  rows = pl.ds(i * block_m, block_m)
  ca, cb = pl.ds(j * 2 * half, half), pl.ds(j * 2 * half + half, half)
  n_k = k // block_k

  def sum_sq(kk, acc):
    xb = x_ref[rows, pl.ds(kk * block_k, block_k)].astype(jnp.float32)
    return acc + jnp.sum(xb * xb, axis=1)
  inv = jax.lax.rsqrt(jax.lax.fori_loop(0, n_k, sum_sq, jnp.zeros((block_m,), jnp.float32)) / k + eps)

  def products(kk, accs):
    ks = pl.ds(kk * block_k, block_k)
    y = _normalised(x_ref, g_ref, rows, ks, inv, dt)
    return accs[0] + _dot(y, w_ref[ks, ca]), accs[1] + _dot(y, w_ref[ks, cb])
  zero = jnp.zeros((block_m, half), jnp.float32)
  a, b = jax.lax.fori_loop(0, n_k, products, (zero, zero))
  a, b = _round(a, dt), _round(b, dt)
  head = j % n_head  # the head's columns in its output
  oa, ob = pl.ds(head * 2 * half, half), pl.ds(head * 2 * half + half, half)

  def rotated():
    # as the XLA path: + the position embedding (rounded), then RoPE in fp32
    ad = add_ref[pl.ds(head * 2 * half, half)].astype(jnp.float32)[None, :]
    bd = add_ref[pl.ds(head * 2 * half + half, half)].astype(jnp.float32)[None, :]
    a2, b2 = _round(a + ad, dt), _round(b + bd, dt)
    c, s = cos_ref[...][None, :], sin_ref[...][None, :]
    return (a2 * c - b2 * s).astype(dt), (b2 * c + a2 * s).astype(dt)

  @pl.when(j < n_head)
  def _():
    ra, rb = rotated()
    q_ref[rows, oa] = ra
    q_ref[rows, ob] = rb

  @pl.when((j >= n_head) & (j < 2 * n_head))
  def _():
    ra, rb = rotated()
    k_ref[rows, oa] = ra
    k_ref[rows, ob] = rb

  @pl.when(j >= 2 * n_head)
  def _():
    v_ref[rows, oa] = a.astype(dt)
    v_ref[rows, ob] = b.astype(dt)


def _residual_kernel(a_ref, w_ref, r_ref, o_ref, *, k: int, block_m: int, block_n: int,
                     block_k: int):
  dt = o_ref.dtype
  i, j = pl.program_id(0), pl.program_id(1)
  rows, cols = pl.ds(i * block_m, block_m), pl.ds(j * block_n, block_n)

  def product(kk, acc):
    ks = pl.ds(kk * block_k, block_k)
    return acc + _dot(a_ref[rows, ks], w_ref[ks, cols])
  acc = jax.lax.fori_loop(0, k // block_k, product, jnp.zeros((block_m, block_n), jnp.float32))
  o_ref[rows, cols] = (r_ref[rows, cols].astype(jnp.float32) + _round(acc, dt)).astype(dt)


def _blocks(m: int, k: int, n: int) -> tuple[int, int, int]:
  block_k, block_n = _block(k, _TUNING['block_k']), _block(n, _TUNING['block_n'])
  if block_k is None or block_n is None:
    raise ValueError(f'decode matmul: no power-of-two Triton blocks (>= 16) divide K={k} and N={n}; '
                     "use decode_layer_impl='xla' for this model")
  block_m = max(16, min(_TUNING['block_m'], pl.next_power_of_2(m)))
  return block_m, block_k, block_n


def _call(kernel, args, row_args: tuple[int, ...], m: int, n: int, block_m: int, block_n: int,
          dtype, name: str, interpret: bool | None):
  """pallas_call over (row blocks, column blocks); `row_args`: the arguments with M rows."""
  from jax.experimental.pallas import triton as plgpu
  if interpret is None:
    interpret = jax.default_backend() not in ('gpu', 'cuda')
  m_pad = -(-m // block_m) * block_m
  if m_pad != m:  # zero rows (finite through the norm); dropped below
    args = [jnp.pad(a, ((0, m_pad - m), (0, 0))) if i in row_args else a for i, a in enumerate(args)]
  out = pl.pallas_call(
      kernel,
      grid=(m_pad // block_m, n // block_n),
      out_shape=jax.ShapeDtypeStruct((m_pad, n), dtype),
      compiler_params=plgpu.CompilerParams(num_warps=_TUNING['num_warps'],
                                           num_stages=_TUNING['num_stages']),
      interpret=interpret,
      name=name,
  )(*args)
  return out[:m] if m_pad != m else out


def norm_matmul(x, gain, w, *, w_gate=None, eps: float = 1e-5, out_dtype=None,
                interpret: bool | None = None):
  """RMSNorm(x; gain, eps) @ w, or with `w_gate` silu(RMSNorm(x) @ w) * (RMSNorm(x) @ w_gate).
  x (M, K) in the compute dtype, gain (K,), w / w_gate (K, N) (cast to x's dtype) -> (M, N) in
  `out_dtype` (default x's; float32 keeps the fp32 accumulation unrounded, e.g. for logits)."""
  m, k = x.shape
  n = w.shape[1]
  if gain.shape != (k,) or w.shape[0] != k or (w_gate is not None and w_gate.shape != w.shape):
    raise ValueError(f'norm_matmul: x {x.shape}, gain {gain.shape}, w {w.shape}'
                     + (f', w_gate {w_gate.shape}' if w_gate is not None else ''))
  block_m, block_k, block_n = _blocks(m, k, n)
  gated = w_gate is not None
  kernel = functools.partial(_norm_kernel, k=k, block_m=block_m, block_n=block_n, block_k=block_k,
                             eps=float(eps), gated=gated)
  args = [x, gain, w.astype(x.dtype)] + ([w_gate.astype(x.dtype)] if gated else [])
  if gated and out_dtype is not None and jnp.dtype(out_dtype) != x.dtype:
    raise ValueError('norm_matmul: the SwiGLU output is in the compute dtype')
  return _call(kernel, args, (0,), m, n, block_m, block_n, out_dtype or x.dtype,
               'hita_decode_norm_swiglu' if gated else 'hita_decode_norm_matmul', interpret)


def half_split_columns(n_head: int, head_dim: int) -> jnp.ndarray:
  """Column order that turns each head's interleaved RoPE pairs (x[2m], x[2m+1]) into halves
  (x[0::2] | x[1::2]): applied to q and k alike it leaves every q.k product (so the attention)
  unchanged, and a kernel rotates a head as two column blocks instead of shuffling pairs."""
  within = jnp.concatenate([jnp.arange(0, head_dim, 2), jnp.arange(1, head_dim, 2)])
  return (jnp.arange(n_head)[:, None] * head_dim + within[None, :]).reshape(-1)


def layer_fits(dim: int, ffn_hidden: int, vocab: int) -> bool:
  """Whether every product of a decode layer and the head has Triton blocks (else the model keeps
  the XLA path)."""
  return all(fits(k, n) for k, n in ((dim, 3 * dim), (dim, dim), (dim, ffn_hidden),
                                     (ffn_hidden, dim), (dim, vocab)))


def rope_fits(head_dim: int) -> bool:
  """Whether `norm_qkv_rope` can take this head dim (half of it a power of two >= 16)."""
  half = head_dim // 2
  return head_dim % 2 == 0 and half >= 16 and half & (half - 1) == 0


def norm_qkv_rope(x, gain, w_qkv, add, cos, sin, *, n_head: int, eps: float = 1e-5,
                  interpret: bool | None = None):
  """The decode step's whole qkv projection: RMSNorm(x) @ w_qkv, + `add` on q and k, then RoPE on
  q and k, with q's and k's columns in `half_split_columns` order (w_qkv's q and k columns must
  already be in it, e.g. `w[:, perm]`; so are the outputs, and the cache that takes k).
  x (M, D), gain (D,), w_qkv (D, 3D), add (D,) (the position embedding row, in half-split order),
  cos / sin (head_dim / 2,) of this position -> q, k, v, each (M, D)."""
  from jax.experimental.pallas import triton as plgpu
  m, d = x.shape
  hd = d // n_head
  if (w_qkv.shape != (d, 3 * d) or add.shape != (d,) or gain.shape != (d,)
      or cos.shape != (hd // 2,) or sin.shape != cos.shape):
    raise ValueError(f'norm_qkv_rope: x {x.shape}, gain {gain.shape}, w_qkv {w_qkv.shape}, '
                     f'add {add.shape}, cos {cos.shape} with {n_head} heads')
  if not rope_fits(hd) or _block(d, _TUNING['block_k']) is None:
    raise ValueError(f'norm_qkv_rope: head dim {hd} / K={d} have no Triton blocks; '
                     "use decode_layer_impl='xla' for this model")
  if interpret is None:
    interpret = jax.default_backend() not in ('gpu', 'cuda')
  block_m = max(16, min(_TUNING['block_m'], pl.next_power_of_2(m)))
  block_k = _block(d, _TUNING['block_k'])
  m_pad = -(-m // block_m) * block_m
  dt = x.dtype
  xp = jnp.pad(x, ((0, m_pad - m), (0, 0))) if m_pad != m else x
  kernel = functools.partial(_qkv_rope_kernel, k=d, block_m=block_m, half=hd // 2, n_head=n_head,
                             block_k=block_k, eps=float(eps))
  outs = pl.pallas_call(
      kernel,
      grid=(m_pad // block_m, 3 * n_head),
      out_shape=[jax.ShapeDtypeStruct((m_pad, d), dt)] * 3,
      compiler_params=plgpu.CompilerParams(num_warps=_TUNING['num_warps'],
                                           num_stages=_TUNING['num_stages']),
      interpret=interpret,
      name='hita_decode_norm_qkv_rope',
  )(xp, gain, w_qkv.astype(dt), add.astype(dt), cos.astype(jnp.float32), sin.astype(jnp.float32))
  return tuple(o[:m] for o in outs) if m_pad != m else tuple(outs)


def matmul_residual(a, w, r, *, interpret: bool | None = None):
  """r + a @ w: a (M, K), w (K, N) (cast to a's dtype), r (M, N) -> (M, N) in r's dtype."""
  m, k = a.shape
  n = w.shape[1]
  if w.shape[0] != k or r.shape != (m, n):
    raise ValueError(f'matmul_residual: a {a.shape}, w {w.shape}, r {r.shape}')
  block_m, block_k, block_n = _blocks(m, k, n)
  kernel = functools.partial(_residual_kernel, k=k, block_m=block_m, block_n=block_n,
                             block_k=block_k)
  return _call(kernel, [a.astype(r.dtype), w.astype(r.dtype), r], (0, 2), m, n, block_m, block_n, r.dtype,
               'hita_decode_matmul_residual', interpret)
