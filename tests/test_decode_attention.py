"""The sampler's one-query attention: the Pallas kernel (interpret mode on CPU) against the XLA
path, in fp32 and bf16, through the GPT sampler, and inside a shard_map on the 8-device mesh."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from hita_jax.models import decode_attention as da
from hita_jax.models.layers import batch_mesh_axes
from hita_jax.models.sampler import for_sampling, generate
from tests.test_gpt import random_gpt, tiny_cfg
from tests.utils import assert_logits_as_close_as_xla


def _inputs(b, h, t, d, seed=0, dtype=jnp.float32):
  k = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(k[0], (b, h, d))
  kc = jax.random.normal(k[1], (b, h, t, d))
  vc = jax.random.normal(k[2], (b, h, t, d))
  return q.astype(dtype), kc.astype(dtype), vc.astype(dtype)


def _reference(q, kc, vc, length):
  """Plain numpy softmax attention over positions < length, in float64."""
  q, kc, vc = (np.asarray(a, np.float64) for a in (q, kc, vc))
  s = np.einsum('bhd,bhtd->bht', q, kc[:, :, :length]) / np.sqrt(q.shape[-1])
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum('bht,bhtd->bhd', p, vc[:, :, :length])


@pytest.mark.parametrize('d,t,length,block_k', [
    (64, 72, 1, 16),     # only position 0
    (64, 72, 37, 16),    # a partial last block
    (64, 72, 72, 16),    # the whole cache, T a multiple of the block
    (64, 40, 40, 32),    # the last block runs past T (masked loads)
    (60, 40, 33, 16),    # GPT-2B's head dim: not a power of two (padded, masked columns)
    (32, 130, 129, 64),
])
def test_kernel_matches_reference_fp32(d, t, length, block_k):
  q, kc, vc = _inputs(2, 3, t, d, seed=d + t)
  # garbage past `length` must not leak in: the kernel may not read it, the XLA path masks it
  kc = kc.at[:, :, length:].set(1e4)
  vc = vc.at[:, :, length:].set(jnp.nan)
  ref = _reference(q, kc, vc, length)
  run = jax.jit(lambda *a: da.decode_attention_pallas(*a, block_k=block_k, interpret=True))
  got = np.asarray(run(q, kc, vc, jnp.int32(length)))
  np.testing.assert_allclose(got, ref, atol=2e-6, rtol=1e-5)
  xla = np.asarray(da.decode_attention_xla(q, kc.at[:, :, length:].set(0),
                                           vc.at[:, :, length:].set(0), length))
  np.testing.assert_allclose(xla, ref, atol=2e-6, rtol=1e-5)


def test_kernel_bf16_close_to_fp32():
  """The bf16 cache and query the sampler ships with: the kernel's fp32 scores / softmax /
  accumulator keep it as close to the fp32 result as the XLA bf16 path is."""
  q, kc, vc = _inputs(4, 2, 96, 64, seed=7)
  ref = _reference(q, kc, vc, 90)
  args16 = [a.astype(jnp.bfloat16) for a in (q, kc, vc)]
  got = da.decode_attention_pallas(*args16, jnp.int32(90), block_k=32, interpret=True)
  assert got.dtype == jnp.bfloat16
  xla = da.decode_attention_xla(*args16, 90)
  err_kernel = np.abs(np.asarray(got, np.float64) - ref).max()
  err_xla = np.abs(np.asarray(xla, np.float64) - ref).max()
  assert err_kernel < 2e-2, err_kernel
  assert err_kernel <= err_xla * 1.5 + 1e-3, (err_kernel, err_xla)


def test_impl_resolution():
  assert da.resolve_decode_attn_impl('auto', 64, 12, 64, 'cpu') == 'xla'
  assert da.resolve_decode_attn_impl('auto', 128, 12, 60, 'gpu') == 'xla'   # head dim 60
  assert da.resolve_decode_attn_impl('auto', 2, 12, 64, 'gpu') == 'xla'     # too few programs
  assert da.resolve_decode_attn_impl('xla', 128, 12, 64, 'gpu') == 'xla'
  assert da.resolve_decode_attn_impl('pallas', 1, 1, 60, 'cpu') == 'pallas'
  assert da.resolve_decode_attn_impl('pallas_write', 1, 1, 64, 'gpu') == 'pallas_write'
  with pytest.raises(ValueError, match='decode_attn_impl'):
    da.resolve_decode_attn_impl('flash', 1, 1, 64)
  # 8 devices: no mesh context -> XLA (the partitioner would replicate a bare kernel); under a
  # data mesh the kernel, with at least 128 (row, head) programs per device
  assert jax.device_count() == 8
  assert da.resolve_decode_attn_impl('auto', 128, 12, 64, 'gpu') == 'xla'
  data = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
  with jax.set_mesh(data):
    assert da.resolve_decode_attn_impl('auto', 128, 12, 64, 'gpu') == 'pallas'
    assert da.resolve_decode_attn_impl('auto', 64, 12, 64, 'gpu') == 'xla'     # 96 per device
    assert da.resolve_decode_attn_impl('auto', 12, 64, 64, 'gpu') == 'xla'     # 8 does not split 12
  # a tensor axis splits heads, not rows: the kernel would reshard the caches around it
  with jax.set_mesh(jax.make_mesh((4, 2), ('data', 'tensor'), axis_types=(AxisType.Auto,) * 2)):
    assert da.resolve_decode_attn_impl('auto', 256, 12, 64, 'gpu') == 'xla'
    assert da.resolve_decode_attn_impl('pallas', 256, 12, 64, 'gpu') == 'pallas'
  with jax.set_mesh(jax.make_mesh((1, 8), ('data', 'fsdp'), axis_types=(AxisType.Auto,) * 2)):
    assert da.resolve_decode_attn_impl('auto', 256, 12, 64, 'gpu') == 'pallas'
  with pytest.raises(ValueError, match='decode_attn_impl'):
    tiny_cfg(decode_attn_impl='flash')


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_sampler_with_kernel_matches_xla_path(dtype):
  """generate() with the kernel in every layer against the XLA path, with CFG, over one loop and
  segmented loops. fp32: same greedy codes, logits equal to 1e-5. bf16 (what the sampler ships
  with): greedy codes may part at near-ties, so the kernel is teacher-forced with the XLA path's
  codes and its logits must be as close to the fp32 model's as the XLA path's are."""
  cfg = tiny_cfg(grid=5, num_holistic=7, n_head=2)
  labels = jnp.asarray([0, 1, 4])
  models = {impl: for_sampling(random_gpt(dataclasses.replace(cfg, decode_attn_impl=impl), seed=3),
                               dtype) for impl in ('xla', 'pallas', 'pallas_write')}
  run = lambda impl, n, **kw: generate(models[impl][0], labels, jax.random.key(2), cfg_scale=2.5,
                                       top_k=1, state=models[impl][1], kv_segments=n,
                                       return_logits=True, **kw)
  for n, kernel in ((1, 'pallas'), (3, 'pallas'), (3, 'pallas_write')):
    xla_codes, xla_logits = run('xla', n)
    if dtype == 'float32':
      codes_k, logits_k = run(kernel, n)
      np.testing.assert_array_equal(np.asarray(codes_k), np.asarray(xla_codes))
      np.testing.assert_allclose(np.asarray(logits_k), np.asarray(xla_logits), atol=1e-5)
      continue
    force = dict(prefix_codes=xla_codes, prefix_mask=np.ones(xla_codes.shape[1], bool))
    _, logits_k = run(kernel, n, **force)
    m32 = random_gpt(cfg, seed=3)
    _, ref = generate(m32, labels, jax.random.key(2), cfg_scale=2.5, kv_segments=n,
                      return_logits=True, **force)
    assert_logits_as_close_as_xla(logits_k, xla_logits, ref)


def test_kernel_under_a_mesh_is_split_over_the_batch():
  """Under jax.set_mesh the kernel runs per batch shard (shard_map): same values as unsharded, and
  axes that do not divide the batch stay replicated."""
  assert jax.device_count() == 8
  mesh = jax.make_mesh((4, 2), ('data', 'tensor'), axis_types=(AxisType.Auto,) * 2)
  assert batch_mesh_axes(mesh, 8) == ('data',)     # 'tensor' splits heads, never rows
  assert batch_mesh_axes(mesh, 4) == ('data',)
  assert batch_mesh_axes(mesh, 6) == ()
  q, kc, vc = _inputs(4, 3, 24, 16, seed=3)
  ref = _reference(q, kc, vc, 19)
  with jax.set_mesh(mesh):
    sh = jax.sharding.NamedSharding(mesh, P('data'))
    args = [jax.device_put(a, sh) for a in (q, kc, vc)]
    fn = jax.jit(lambda *a: da.decode_attention(*a, impl='pallas', interpret=True))
    got = fn(*args, jnp.int32(19))
    text = fn.lower(*args, jnp.int32(19)).as_text()
  np.testing.assert_allclose(np.asarray(got), ref, atol=2e-6, rtol=1e-5)
  assert 'shard_map' in text or 'manual' in text.lower()


def test_sampler_with_kernel_on_the_8_device_mesh():
  """The sample task's setting: weights replicated, labels split over 'data', generate() under
  jax.set_mesh with the kernel in every layer: the codes of the single-device XLA path."""
  cfg = tiny_cfg(grid=4, num_holistic=5, n_head=2)
  labels = jnp.asarray([0, 1, 4, 2, 3, 1, 0, 2])
  ref = generate(random_gpt(cfg, seed=5), labels, jax.random.key(1), cfg_scale=2.0, top_k=1,
                 kv_segments=2)
  mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
  for impl in ('pallas', 'pallas_write'):
    m = random_gpt(dataclasses.replace(cfg, decode_attn_impl=impl), seed=5)
    with jax.set_mesh(mesh):
      lab = jax.device_put(labels, jax.sharding.NamedSharding(mesh, P('data')))
      got = generate(m, lab, jax.random.key(1), cfg_scale=2.0, top_k=1, kv_segments=2)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


@pytest.mark.slow  # a device bench tool (kernels in interpret mode); the kernel tests above stay
def test_bench_decode_attn_runs_both_paths(monkeypatch):
  """`python -m hita_jax.tools.bench decode_attn` at a tiny shape: both paths timed, and both
  near the fp32 reference (bf16 inputs)."""
  from hita_jax.tools import bench
  monkeypatch.setattr(bench, 'full_size_config', lambda size, **kw: bench.GPTConfig(
      dim=64, n_layer=1, n_head=2, vocab_size=16, num_holistic=6, grid=4, num_classes=3, **kw))
  res = bench.bench_decode_attn('B', 2, repeats=1)
  assert res['rows'] == 4 and res['cache'] == 24 and sorted(res['lengths']) == ['12', '22', '6']
  for row in res['lengths'].values():
    assert row['pallas']['us'] > 0 and row['xla']['us'] > 0 and row['pallas_update']['us'] > 0
    for impl in ('pallas', 'xla', 'pallas_update'):
      assert row[impl]['max_err'] < 2e-2


@pytest.mark.parametrize('d,t,pos,block_k', [(64, 72, 0, 16), (64, 72, 37, 16), (64, 72, 71, 16),
                                             (60, 40, 32, 16), (32, 130, 64, 64)])
def test_update_kernel_writes_the_row_and_matches_xla(d, t, pos, block_k):
  """The kernel that also writes the step's K / V row: same caches as an update slice (every
  other row untouched) and the same output as the XLA path over positions <= pos."""
  q, kc, vc = _inputs(2, 3, t, d, seed=d + pos)
  kn, vn = (jax.random.normal(jax.random.key(9 + i), (2, 3, d)) for i in range(2))
  ref_o, ref_k, ref_v = da.decode_attention_update(q, kn, vn, kc, vc, pos, impl='xla')
  run = jax.jit(lambda *a: da.decode_attention_update_pallas(*a, block_k=block_k, interpret=True))
  o, k2, v2 = run(q, kn, vn, kc, vc, jnp.int32(pos))
  np.testing.assert_array_equal(np.asarray(k2), np.asarray(ref_k))
  np.testing.assert_array_equal(np.asarray(v2), np.asarray(ref_v))
  np.testing.assert_allclose(np.asarray(o), np.asarray(ref_o), atol=2e-6, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(o), _reference(q, ref_k, ref_v, pos + 1), atol=2e-6,
                             rtol=1e-5)


def test_update_kernel_bf16_close_to_fp32():
  q, kc, vc = _inputs(4, 2, 96, 64, seed=11)
  kn, vn = (jax.random.normal(jax.random.key(20 + i), (4, 2, 64)) for i in range(2))
  _, k32, v32 = da.decode_attention_update(q, kn, vn, kc, vc, 70, impl='xla')
  ref = _reference(q, k32, v32, 71)
  args16 = [a.astype(jnp.bfloat16) for a in (q, kn, vn, kc, vc)]
  o, k16, _ = da.decode_attention_update_pallas(*args16, jnp.int32(70), block_k=32, interpret=True)
  assert o.dtype == k16.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(k16[:, :, 70]), np.asarray(args16[1]))
  err = np.abs(np.asarray(o, np.float64) - ref).max()
  xla_o, _, _ = da.decode_attention_update(*args16, 70, impl='xla')
  assert err < 2e-2 and err <= 1.5 * np.abs(np.asarray(xla_o, np.float64) - ref).max() + 1e-3


def test_kernel_with_nothing_to_attend_gives_zeros():
  q, kc, vc = _inputs(1, 2, 16, 32)
  out = da.decode_attention_pallas(q, kc, vc, jnp.int32(0), block_k=16, interpret=True)
  np.testing.assert_array_equal(np.asarray(out), 0)


@pytest.mark.slow  # a device bench tool, as above
def test_bench_decode_attn_tune_and_sample_tuning(monkeypatch):
  """`bench decode_attn --tune` sweeps launch parameters (interpret mode here, so only that each
  combination runs and is ranked); `tuning()` reaches the kernels the sampler traces, and rejects
  unknown names."""
  from hita_jax.tools import bench
  monkeypatch.setattr(bench, 'full_size_config', lambda size, **kw: bench.GPTConfig(
      dim=64, n_layer=1, n_head=2, vocab_size=16, num_holistic=6, grid=4, num_classes=3, **kw))
  seen = []
  real = da.decode_attention_pallas
  monkeypatch.setattr(da, 'decode_attention_pallas', lambda *a, **kw: seen.append(kw) or real(*a, **kw))
  assert len(bench.DECODE_TUNE_GRID) == 36
  monkeypatch.setattr(bench, 'DECODE_TUNE_GRID', [dict(block_k=8, num_warps=4, num_stages=1),
                                                  dict(block_k=16, num_warps=2, num_stages=2)])
  res = bench.bench_decode_attn('B', 2, repeats=1, tune=True)
  assert len(res['tune']) == 2 and {r['block_k'] for r in res['tune']} == {8, 16}
  assert res['tune_best']['total_us'] == min(r['total_us'] for r in res['tune'])
  seen.clear()
  with da.tuning(block_k=16, num_stages=3):
    da.decode_attention(*_inputs(2, 2, 24, 64, seed=0), 5, impl='pallas')
  assert seen[-1]['block_k'] == 16 and seen[-1]['num_stages'] == 3 and seen[-1]['num_warps'] == 2
  assert da._TUNING == {'block_k': 64, 'num_warps': 2, 'num_stages': 2}
  with pytest.raises(ValueError, match='block_n'):
    with da.tuning(block_n=8):
      pass
  assert bench._parse_tuning('128,8,3') == dict(block_k=128, num_warps=8, num_stages=3)
