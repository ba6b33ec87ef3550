"""One-query attention over a KV cache's valid prefix (the sampler's decode step).

A decode step attends one new query per (row, head) over positions [0, length) of a heads-major
(B, H, T, D) cache. The cache read is most of a step's memory traffic, so what matters is reading
each valid position once at full bandwidth and nothing past `length`:

- 'xla': masked einsums over a static prefix `kv_len` of the cache (positions in [length, kv_len)
  are read and masked). Runs everywhere; the reference for the kernel.
- 'pallas': a Pallas (Triton) GPU kernel, one program per (row, head): it walks the cache in blocks
  of `block_k` positions up to the dynamic `length` with an online softmax (fp32 scores,
  max, sum and output accumulator), so QK, softmax and AV are one pass over exactly the valid
  prefix; the step's new K / V row is written by an XLA update slice before it. Off GPU it runs
  in Pallas interpret mode (tests on CPU).
- 'pallas_write': the same kernel also writes the step's K / V row into the caches in place
  (aliased buffers) and takes that row from registers, so the cache write costs no kernel of its
  own (the update slices were 7 % of a GPT-B decode step). Timed with `bench sample
  --decode-attn pallas_write` against 'pallas', 64 images: on an H200 (2026-12-04) GPT-B no gain;
  on an H100 (2026-12-07) B -4.8 %, L +1.3 %, XL +3.1 %, XXL -0.5 %. No rule by size fits those,
  so not 'auto''s pick (`gpt.decode_attn_impl='pallas_write'` for XL).
- 'auto': 'pallas' on GPU when the head dim is a power of two (Triton blocks are powers of two;
  every official size but GPT-2B, head dim 60, qualifies) and there are at least 128 (row, head)
  programs to fill the chip; 'xla' otherwise.

Under a mesh (`jax.set_mesh`), the kernel runs inside `jax.shard_map` over the batch (split across
every mesh axis that divides it), since XLA cannot partition a custom kernel itself; without a
mesh context on several devices 'auto' keeps the XLA path.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from hita_jax.models.layers import batch_mesh_axes, kernel_tuning, on_batch_shards

DECODE_ATTN_IMPLS = ('auto', 'xla', 'pallas', 'pallas_write')
KERNEL_IMPLS = ('pallas', 'pallas_write')
_MIN_PROGRAMS = 128
# The kernel's launch parameters when the model calls it: the best of `bench decode_attn --tune`'s
# 36 sets on an H200 (2026-12-04) for GPT-B and XL alike (B: 102 us over three lengths against
# 113 us with 4 warps; sampling B/64 +2.6 %); `tuning()` overrides them while a step is traced.
_TUNING = {'block_k': 64, 'num_warps': 2, 'num_stages': 2}


def tuning(**kw):
  """Within this context, kernels traced through `decode_attention[_update]` use these launch
  parameters (block_k, num_warps, num_stages) instead of the defaults (for benchmarks)."""
  return kernel_tuning(_TUNING, 'decode kernel', **kw)


def _is_pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def resolve_decode_attn_impl(impl: str, batch: int, heads: int, head_dim: int,
                             platform: str | None = None) -> str:
  if impl not in DECODE_ATTN_IMPLS:
    raise ValueError(f'decode_attn_impl must be one of {DECODE_ATTN_IMPLS}, got {impl!r}')
  if impl != 'auto':
    return impl
  platform = platform or jax.default_backend()
  if platform not in ('gpu', 'cuda') or not _is_pow2(head_dim):
    return 'xla'
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    if jax.device_count() > 1:
      return 'xla'  # a bare custom call would be replicated by the partitioner
    shards = 1
  else:
    axes = batch_mesh_axes(mesh, batch)
    shards = math.prod(mesh.shape[a] for a in axes)
    if shards != mesh.size:
      # an axis that does not split the batch ('tensor', or one the batch does not divide) would
      # make every device on it repeat the kernel, and reshard the caches around it
      return 'xla'
  if batch // shards * heads < _MIN_PROGRAMS:
    return 'xla'  # too few (row, head) programs per device to fill the chip
  return 'pallas'


def decode_attention_xla(q, k_cache, v_cache, length, *, kv_len: int | None = None):
  """q (B, H, D), caches (B, H, T, D), positions < `length` (scalar) valid -> (B, H, D) q.dtype.
  Reads the static prefix [0, kv_len) (kv_len >= length); fp32 scores and softmax."""
  t = k_cache.shape[2]
  kv_len = min(kv_len or t, t)
  k, v = k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]  # static slices: fused into the reads
  scale = q.shape[-1] ** -0.5
  s = jnp.einsum('bhd,bhtd->bht', q, k.astype(q.dtype), preferred_element_type=jnp.float32) * scale
  s = jnp.where(jnp.arange(kv_len) < length, s, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  return jnp.einsum('bht,bhtd->bhd', p, v).astype(q.dtype)


def _attend_prefix(q, k_ref, v_ref, length, col_ok, *, block_k: int, block_d: int):
  """Online softmax of the scaled fp32 query `q` over cache rows [0, length): (acc, max, sum)."""
  from jax.experimental.pallas import triton as plgpu

  def body(j, carry):
    acc, m, l = carry
    rows = j * block_k + jnp.arange(block_k)
    ok = rows < length
    mask = ok[:, None] & col_ok[None, :]
    sl = (pl.ds(j * block_k, block_k), pl.ds(0, block_d))
    # both tiles requested before either is used: twice the loads in flight per program
    k = plgpu.load(k_ref.at[sl], mask=mask, other=0.0)
    v = plgpu.load(v_ref.at[sl], mask=mask, other=0.0)
    s = jnp.sum(k.astype(jnp.float32) * q[None, :], axis=1)  # (block_k,) fp32
    s = jnp.where(ok, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s))
    alpha = jnp.exp(m - m_new)                               # 0 while m is still -inf
    p = jnp.exp(s - m_new)                                   # 0 where masked
    acc = acc * alpha + jnp.sum(p[:, None] * v.astype(jnp.float32), axis=0)
    return acc, m_new, l * alpha + jnp.sum(p)

  # The last block holds at least one row < length, so every block leaves m finite.
  n_blocks = (length + block_k - 1) // block_k
  init = (jnp.zeros((block_d,), jnp.float32), jnp.float32(-jnp.inf), jnp.float32(0.0))
  return jax.lax.fori_loop(0, n_blocks, body, init)


def _load_vec(ref, col_ok, block_d):
  from jax.experimental.pallas import triton as plgpu
  return plgpu.load(ref.at[pl.ds(0, block_d)], mask=col_ok, other=0.0).astype(jnp.float32)


def _kernel(length_ref, q_ref, k_ref, v_ref, o_ref, *, block_k: int, head_dim: int,
            block_d: int, scale: float):
  from jax.experimental.pallas import triton as plgpu
  col_ok = jnp.arange(block_d) < head_dim
  q = _load_vec(q_ref, col_ok, block_d) * scale
  acc, _, l = _attend_prefix(q, k_ref, v_ref, length_ref[0], col_ok, block_k=block_k,
                             block_d=block_d)
  # length 0 (nothing to attend to) gives zeros, not 0 / 0
  o = acc / jnp.maximum(l, jnp.finfo(jnp.float32).tiny)
  plgpu.store(o_ref.at[pl.ds(0, block_d)], o.astype(o_ref.dtype), mask=col_ok)


def _update_kernel(pos_ref, q_ref, kn_ref, vn_ref, k_ref, v_ref, o_ref, ko_ref, vo_ref, *,
                   block_k: int, head_dim: int, block_d: int, scale: float):
  """Writes the new K / V row at `pos` into the (aliased) caches and attends over rows <= pos:
  rows < pos come from the cache, row pos from registers, so no program reads what it wrote."""
  from jax.experimental.pallas import triton as plgpu
  pos = pos_ref[0]
  col_ok = jnp.arange(block_d) < head_dim
  q = _load_vec(q_ref, col_ok, block_d) * scale
  k_new = plgpu.load(kn_ref.at[pl.ds(0, block_d)], mask=col_ok, other=0.0)
  v_new = plgpu.load(vn_ref.at[pl.ds(0, block_d)], mask=col_ok, other=0.0)
  row = (pl.ds(pos, 1), pl.ds(0, block_d))
  # ko / vo alias k / v (input_output_aliases): one buffer on the GPU; the row is written through
  # the output refs so that interpret mode (separate arrays) sees it too
  plgpu.store(ko_ref.at[row], k_new[None, :], mask=col_ok[None, :])
  plgpu.store(vo_ref.at[row], v_new[None, :], mask=col_ok[None, :])
  acc, m, l = _attend_prefix(q, k_ref, v_ref, pos, col_ok, block_k=block_k, block_d=block_d)
  s_new = jnp.sum(q * k_new.astype(jnp.float32))
  m_new = jnp.maximum(m, s_new)
  alpha = jnp.exp(m - m_new)
  p_new = jnp.exp(s_new - m_new)
  acc = acc * alpha + p_new * v_new.astype(jnp.float32)
  l = l * alpha + p_new
  plgpu.store(o_ref.at[pl.ds(0, block_d)], (acc / l).astype(o_ref.dtype), mask=col_ok)


def _configure(kernel, head_dim: int, block_k: int, interpret: bool | None):
  """The kernel with its static sizes bound (columns padded to a power of two, at least 16, as
  Triton blocks need) and interpret mode (default: off a GPU)."""
  if interpret is None:
    interpret = jax.default_backend() not in ('gpu', 'cuda')
  block_d = max(16, pl.next_power_of_2(head_dim))
  return functools.partial(kernel, block_k=block_k, head_dim=head_dim, block_d=block_d,
                           scale=float(head_dim) ** -0.5), interpret


def decode_attention_pallas(q, k_cache, v_cache, length, *, block_k: int = 64, num_warps: int = 2,
                            num_stages: int = 2, interpret: bool | None = None):
  """The fused kernel (see the module docstring); same contract as `decode_attention_xla`."""
  from jax.experimental.pallas import triton as plgpu
  b, h, d = q.shape
  t = k_cache.shape[2]
  if k_cache.shape != (b, h, t, d) or v_cache.shape != k_cache.shape:
    raise ValueError(f'decode attention expects q (B, H, D) and caches (B, H, T, D); got '
                     f'{q.shape}, {k_cache.shape}, {v_cache.shape}')
  kernel, interpret = _configure(_kernel, d, block_k, interpret)
  length = jnp.reshape(jnp.asarray(length, jnp.int32), (1,))
  out = pl.pallas_call(
      kernel,
      grid=(b, h),
      in_specs=[
          pl.BlockSpec((1,), lambda i, j: (0,)),
          pl.BlockSpec((None, None, d), lambda i, j: (i, j, 0)),
          pl.BlockSpec((None, None, t, d), lambda i, j: (i, j, 0, 0)),
          pl.BlockSpec((None, None, t, d), lambda i, j: (i, j, 0, 0)),
      ],
      out_specs=pl.BlockSpec((None, None, d), lambda i, j: (i, j, 0)),
      out_shape=jax.ShapeDtypeStruct((b, h, d), q.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name='hita_decode_attention',
  )(length, q, k_cache, v_cache)
  return out


def decode_attention_update_pallas(q, k_new, v_new, k_cache, v_cache, pos, *, block_k: int = 64,
                                   num_warps: int = 2, num_stages: int = 2,
                                   interpret: bool | None = None):
  """The kernel that also writes the step's K / V: caches updated in place at `pos` (aliased),
  attention over positions <= pos -> (o (B, H, D), k_cache, v_cache)."""
  from jax.experimental.pallas import triton as plgpu
  b, h, d = q.shape
  t = k_cache.shape[2]
  if (k_new.shape != q.shape or v_new.shape != q.shape or k_cache.shape != (b, h, t, d)
      or v_cache.shape != k_cache.shape):
    raise ValueError(f'decode attention expects q, k_new, v_new (B, H, D) and caches (B, H, T, D); '
                     f'got {q.shape}, {k_new.shape}, {v_new.shape}, {k_cache.shape}, {v_cache.shape}')
  kernel, interpret = _configure(_update_kernel, d, block_k, interpret)
  # clamped like the update slice of the XLA path (a row past T would land in the next slice)
  pos = jnp.reshape(jnp.minimum(jnp.asarray(pos, jnp.int32), t - 1), (1,))
  vec = pl.BlockSpec((None, None, d), lambda i, j: (i, j, 0))
  cache = pl.BlockSpec((None, None, t, d), lambda i, j: (i, j, 0, 0))
  return pl.pallas_call(
      kernel,
      grid=(b, h),
      in_specs=[pl.BlockSpec((1,), lambda i, j: (0,)), vec, vec, vec, cache, cache],
      out_specs=[vec, cache, cache],
      out_shape=[jax.ShapeDtypeStruct((b, h, d), q.dtype),
                 jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                 jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)],
      input_output_aliases={4: 1, 5: 2},
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name='hita_decode_attention_update',
  )(pos, q, k_new.astype(k_cache.dtype), v_new.astype(v_cache.dtype), k_cache, v_cache)


def decode_attention_update(q, k_new, v_new, k_cache, v_cache, pos, *, impl: str = 'auto',
                            kv_len: int | None = None, interpret: bool | None = None):
  """One decode step's attention with its cache write: K / V rows (B, H, D) written at `pos` into
  the heads-major caches, then q attends over positions <= pos -> (o, k_cache, v_cache).
  'pallas_write' does both in one kernel; the others write with an update slice, then attend
  (`decode_attention`)."""
  b, h, d = q.shape
  impl = resolve_decode_attn_impl(impl, b, h, d)
  if impl != 'pallas_write':
    k_cache = jax.lax.dynamic_update_slice(k_cache, k_new[:, :, None].astype(k_cache.dtype),
                                           (0, 0, pos, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v_new[:, :, None].astype(v_cache.dtype),
                                           (0, 0, pos, 0))
    o = decode_attention(q, k_cache, v_cache, pos + 1, impl=impl, kv_len=kv_len, interpret=interpret)
    return o, k_cache, v_cache
  fn = functools.partial(decode_attention_update_pallas, interpret=interpret, **_TUNING)
  args = (q, k_new, v_new, k_cache, v_cache, jnp.asarray(pos, jnp.int32))
  # every array but the scalar position split over the batch
  return on_batch_shards(fn, args, split=(0, 1, 2, 3, 4), batch=b, n_out=3)


def decode_attention(q, k_cache, v_cache, length, *, impl: str = 'auto', kv_len: int | None = None,
                     interpret: bool | None = None):
  """q (B, H, D), heads-major caches (B, H, T, D), positions < `length` valid (length >= 1) ->
  (B, H, D). `kv_len` (static, >= length) bounds the XLA path's read; the kernel reads up to
  `length`."""
  b, h, d = q.shape
  impl = resolve_decode_attn_impl(impl, b, h, d)
  if impl == 'xla':
    return decode_attention_xla(q, k_cache, v_cache, length, kv_len=kv_len)
  fn = functools.partial(decode_attention_pallas, interpret=interpret, **_TUNING)
  return on_batch_shards(fn, (q, k_cache, v_cache, jnp.asarray(length, jnp.int32)), split=(0, 1, 2),
                         batch=b)
