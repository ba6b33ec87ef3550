"""One-query attention over a KV cache's valid prefix (the sampler's decode step).

A decode step attends one new query per (row, head) over positions [0, length) of a heads-major
(B, H, T, D) cache. The cache read is most of a step's memory traffic, so what matters is reading
each valid position once at full bandwidth and nothing past `length`:

- 'xla': masked einsums over a static prefix `kv_len` of the cache (positions in [length, kv_len)
  are read and masked). Runs everywhere; the reference for the kernel.
- 'pallas': a Pallas (Triton) GPU kernel, one program per (row, head): it walks the cache in blocks
  of `block_k` positions up to the dynamic `length` with an online softmax (fp32 scores,
  max, sum and output accumulator), so QK, softmax and AV are one pass over exactly the valid
  prefix. Off GPU it runs in Pallas interpret mode (tests on CPU).
- 'auto': 'pallas' on GPU when the head dim is a power of two (Triton blocks are powers of two;
  every official size but GPT-2B, head dim 60, qualifies) and there are at least 128 (row, head)
  programs to fill the chip; 'xla' otherwise.

Under a mesh (`jax.set_mesh`), the kernel runs inside `jax.shard_map` over the batch (split across
every mesh axis that divides it), since XLA cannot partition a custom kernel itself; without a
mesh context on several devices 'auto' keeps the XLA path.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

DECODE_ATTN_IMPLS = ('auto', 'xla', 'pallas')
_MIN_PROGRAMS = 128


def _is_pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def resolve_decode_attn_impl(impl: str, batch: int, heads: int, head_dim: int,
                             platform: str | None = None) -> str:
  if impl not in DECODE_ATTN_IMPLS:
    raise ValueError(f'decode_attn_impl must be one of {DECODE_ATTN_IMPLS}, got {impl!r}')
  if impl != 'auto':
    return impl
  platform = platform or jax.default_backend()
  if platform not in ('gpu', 'cuda') or not _is_pow2(head_dim) or batch * heads < _MIN_PROGRAMS:
    return 'xla'
  mesh = jax.sharding.get_abstract_mesh()
  if (mesh.empty or mesh.size == 1) and jax.device_count() > 1:
    return 'xla'  # a bare custom call would be replicated by the partitioner
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


def _kernel(length_ref, q_ref, k_ref, v_ref, o_ref, *, block_k: int, head_dim: int,
            block_d: int, scale: float):
  from jax.experimental.pallas import triton as plgpu
  length = length_ref[0]
  cols = jnp.arange(block_d)
  col_ok = cols < head_dim
  q = plgpu.load(q_ref.at[pl.ds(0, block_d)], mask=col_ok, other=0.0).astype(jnp.float32)
  q = q * scale

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
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new)                                   # 0 where masked
    acc = acc * alpha + jnp.sum(p[:, None] * v.astype(jnp.float32), axis=0)
    return acc, m_new, l * alpha + jnp.sum(p)

  n_blocks = (length + block_k - 1) // block_k
  # Block 0 always holds position 0 (length >= 1), so m is finite after the first iteration.
  init = (jnp.zeros((block_d,), jnp.float32), jnp.float32(-jnp.inf), jnp.float32(0.0))
  acc, _, l = jax.lax.fori_loop(0, n_blocks, body, init)
  plgpu.store(o_ref.at[pl.ds(0, block_d)], (acc / l).astype(o_ref.dtype), mask=col_ok)


def decode_attention_pallas(q, k_cache, v_cache, length, *, block_k: int = 64, num_warps: int = 4,
                            num_stages: int = 2, interpret: bool | None = None):
  """The fused kernel (see the module docstring); same contract as `decode_attention_xla`."""
  from jax.experimental.pallas import triton as plgpu
  b, h, d = q.shape
  t = k_cache.shape[2]
  if k_cache.shape != (b, h, t, d) or v_cache.shape != k_cache.shape:
    raise ValueError(f'decode attention expects q (B, H, D) and caches (B, H, T, D); got '
                     f'{q.shape}, {k_cache.shape}, {v_cache.shape}')
  if interpret is None:
    interpret = jax.default_backend() not in ('gpu', 'cuda')
  block_d = max(16, pl.next_power_of_2(d))
  kernel = functools.partial(_kernel, block_k=block_k, head_dim=d, block_d=block_d,
                             scale=float(d) ** -0.5)
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


def _batch_axes(mesh, batch: int) -> tuple[str, ...]:
  """The mesh axes (in order) whose product divides the batch: the kernel's shard_map splits the
  batch over them and keeps the rest replicated."""
  axes, n = [], 1
  for name in mesh.axis_names:
    size = mesh.shape[name]
    if batch % (n * size) == 0:
      axes.append(name)
      n *= size
  return tuple(axes)


def decode_attention(q, k_cache, v_cache, length, *, impl: str = 'auto', kv_len: int | None = None,
                     interpret: bool | None = None):
  """q (B, H, D), heads-major caches (B, H, T, D), positions < `length` valid -> (B, H, D).
  `kv_len` (static, >= length) bounds the XLA path's read; the kernel reads up to `length`."""
  b, h, d = q.shape
  impl = resolve_decode_attn_impl(impl, b, h, d)
  if impl == 'xla':
    return decode_attention_xla(q, k_cache, v_cache, length, kv_len=kv_len)
  fn = functools.partial(decode_attention_pallas, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn(q, k_cache, v_cache, length)
  axes = _batch_axes(mesh, b)
  spec = jax.sharding.PartitionSpec(axes or None)
  rep = jax.sharding.PartitionSpec()
  return jax.shard_map(lambda a, kc, vc, n: fn(a, kc, vc, n), mesh=mesh,
                       in_specs=(spec, spec, spec, rep), out_specs=spec,
                       check_vma=False)(q, k_cache, v_cache, jnp.asarray(length, jnp.int32))
