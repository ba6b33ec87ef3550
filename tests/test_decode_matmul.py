"""The decode step's fused products (models/decode_matmul.py, Pallas interpret mode on CPU) against
the XLA path's arithmetic, in fp32 and bf16, through the sampler, and on the 8-device mesh."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from hita_jax.models import decode_matmul as dm
from hita_jax.models.gpt import RMSNorm
from hita_jax.models.sampler import for_sampling, generate
from tests.test_gpt import random_gpt, tiny_cfg
from tests.utils import assert_logits_as_close_as_xla


def _arrays(m, k, n, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(ks[0], (m, k)).astype(dtype)
  gain = 1.0 + 0.1 * jax.random.normal(ks[1], (k,))
  w, w3 = (0.05 * jax.random.normal(key, (k, n)) for key in ks[2:4])
  r = jax.random.normal(ks[4], (m, n)).astype(dtype)
  return x, gain, w, w3, r


def _xla_norm(x, gain, eps):
  """The GPT's RMSNorm module on x (the XLA path)."""
  norm = RMSNorm(x.shape[-1], eps)
  norm.weight[...] = gain
  return norm(x)


def _mm(a, w):
  return jnp.einsum('mk,kn->mn', a, w.astype(a.dtype))


@pytest.mark.parametrize('m', [128, 16, 6])   # 6: rows padded to the 16-row block
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_kernels_match_the_xla_path(m, dtype):
  """Each kernel against the same arithmetic as XLA ops: fp32 to 2e-6; bf16 within one bf16 step
  of the output's magnitude (only the products' summation order and the SwiGLU's intermediate
  roundings may differ)."""
  k, n = 256, 96
  x, gain, w, w3, r = _arrays(m, k, n, dtype, seed=m)
  y = _xla_norm(x, gain, 1e-5)
  cases = {
      'norm_matmul': (dm.norm_matmul(x, gain, w, eps=1e-5), _mm(y, w)),
      'norm_swiglu': (dm.norm_matmul(x, gain, w, w_gate=w3, eps=1e-5),
                      jax.nn.silu(_mm(y, w)) * _mm(y, w3)),
      'matmul_residual': (dm.matmul_residual(x, w, r), r + _mm(x, w)),
  }
  for name, (got, ref) in cases.items():
    assert got.shape == (m, n) and got.dtype == dtype, name
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    if dtype == jnp.float32:
      np.testing.assert_allclose(got, ref, atol=2e-6, rtol=1e-5, err_msg=name)
    else:
      tol = 2 ** -7 * np.abs(ref).max()
      assert np.abs(got - ref).max() <= tol, (name, np.abs(got - ref).max(), tol)


def test_bf16_kernels_close_to_fp32():
  """bf16-vs-fp32: the kernels' bf16 results are as close to the fp32 ones as XLA's bf16 are."""
  x, gain, w, w3, r = _arrays(64, 128, 64, jnp.float32, seed=5)
  b16 = lambda a: a.astype(jnp.bfloat16)
  pairs = [
      (lambda x, r: dm.norm_matmul(x, gain, w, w_gate=w3, eps=1e-5),
       lambda x, r: jax.nn.silu(_mm(_xla_norm(x, gain, 1e-5), w)) * _mm(_xla_norm(x, gain, 1e-5), w3)),
      (lambda x, r: dm.matmul_residual(x, w, r), lambda x, r: r + _mm(x, w)),
  ]
  for kernel, xla in pairs:
    ref = np.asarray(xla(x, r), np.float64)
    err_k = np.abs(np.asarray(kernel(b16(x), b16(r)), np.float64) - ref).max()
    err_x = np.abs(np.asarray(xla(b16(x), b16(r)), np.float64) - ref).max()
    assert err_k <= 1.5 * err_x + 1e-6, (err_k, err_x)


def test_blocks_must_divide_the_dims():
  assert dm.fits(768, 2304) and dm.fits(2048, 768) and dm.fits(1920, 5120)   # GPT-B, 2B
  assert not dm.fits(40, 64)
  assert dm.layer_fits(768, 2048, 16384) and not dm.layer_fits(768, 2048, 1000)
  # a model whose products do not all fit keeps the XLA path, with the same codes
  cfg = tiny_cfg(vocab_size=40, decode_layer_impl='pallas')
  assert not cfg.fused_decode_layer and tiny_cfg(decode_layer_impl='pallas').fused_decode_layer
  labels = jnp.asarray([0, 1])
  ref = generate(random_gpt(dataclasses.replace(cfg, decode_layer_impl='xla'), seed=2), labels,
                 jax.random.key(0), cfg_scale=1.5, top_k=1, kv_segments=2)
  got = generate(random_gpt(cfg, seed=2), labels, jax.random.key(0), cfg_scale=1.5, top_k=1,
                 kv_segments=2)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
  x, gain, w, _, _ = _arrays(4, 40, 64, jnp.float32)
  with pytest.raises(ValueError, match="K=40.*decode_layer_impl='xla'"):
    dm.norm_matmul(x, gain, w)
  with pytest.raises(ValueError, match='norm_matmul'):
    dm.norm_matmul(x, gain[:8], w)


def test_tuning_context_sets_and_restores():
  before = dict(dm._TUNING)
  with dm.tuning(block_n=16, num_warps=2):
    assert dm._TUNING['block_n'] == 16 and dm._TUNING['num_warps'] == 2
    x, gain, w, _, _ = _arrays(8, 64, 32, jnp.float32)
    np.testing.assert_allclose(np.asarray(dm.norm_matmul(x, gain, w)),
                               np.asarray(_mm(_xla_norm(x, gain, 1e-5), w)), atol=2e-6, rtol=1e-5)
  assert dm._TUNING == before
  with pytest.raises(ValueError, match='block_q'):
    with dm.tuning(block_q=1):
      pass
  with pytest.raises(ValueError, match='decode_layer_impl'):
    tiny_cfg(decode_layer_impl='triton')


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_sampler_with_fused_layers_matches_xla_path(dtype):
  """generate() with the fused products in every layer (and the attention kernel) against the XLA
  path, with CFG: fp32 the same greedy codes and logits to 1e-5; bf16 teacher-forced with the XLA
  path's codes, logits as close to the fp32 model's as the XLA path's."""
  cfg = tiny_cfg(grid=4, num_holistic=5, n_head=2)
  labels = jnp.asarray([0, 1, 4])
  variants = {'xla': dict(decode_layer_impl='xla', decode_attn_impl='xla'),
              'fused': dict(decode_layer_impl='pallas', decode_attn_impl='pallas')}
  models = {name: for_sampling(random_gpt(dataclasses.replace(cfg, **kw), seed=3), dtype)
            for name, kw in variants.items()}
  run = lambda name, **kw: generate(models[name][0], labels, jax.random.key(2), cfg_scale=2.5,
                                    top_k=1, state=models[name][1], kv_segments=2,
                                    return_logits=True, **kw)
  xla_codes, xla_logits = run('xla')
  if dtype == 'float32':
    codes, logits = run('fused')
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(xla_codes))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(xla_logits), atol=1e-5)
    return
  force = dict(prefix_codes=xla_codes, prefix_mask=np.ones(xla_codes.shape[1], bool))
  _, logits = run('fused', **force)
  _, ref = generate(random_gpt(cfg, seed=3), labels, jax.random.key(2), cfg_scale=2.5,
                    kv_segments=2, return_logits=True, **force)
  assert_logits_as_close_as_xla(logits, xla_logits, ref)


def test_sampler_with_fused_layers_on_the_8_device_mesh():
  """Under jax.set_mesh the fused products run per batch shard (weights replicated): the codes of
  the single-device XLA path."""
  assert jax.device_count() == 8
  cfg = tiny_cfg(grid=4, num_holistic=5, n_head=2)
  labels = jnp.asarray([0, 1, 4, 2, 3, 1, 0, 2])
  ref = generate(random_gpt(cfg, seed=5), labels, jax.random.key(1), cfg_scale=2.0, top_k=1,
                 kv_segments=2)
  m = random_gpt(dataclasses.replace(cfg, decode_layer_impl='pallas'), seed=5)
  mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
  with jax.set_mesh(mesh):
    lab = jax.device_put(labels, jax.sharding.NamedSharding(mesh, P('data')))
    got = generate(m, lab, jax.random.key(1), cfg_scale=2.0, top_k=1, kv_segments=2)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def _tiny_bench(monkeypatch):
  import functools
  from hita_jax.tools import bench
  monkeypatch.setattr(bench, 'full_size_config', lambda size, **kw: bench.GPTConfig(
      dim=64, n_layer=1, n_head=2, vocab_size=16, num_holistic=6, grid=4, num_classes=3, **kw))
  # two chained layers per timed program, not 20 (interpret-mode kernels compile slowly)
  monkeypatch.setattr(bench, '_chain_timer', functools.partial(bench._chain_timer, chain=2))
  return bench


@pytest.mark.slow  # a device bench tool (kernels in interpret mode); the kernel tests stay
def test_bench_decode_matmul_runs_both_paths(monkeypatch):
  """`bench decode_matmul` at a tiny shape: both paths timed, both near fp32, a two-set tune."""
  bench = _tiny_bench(monkeypatch)
  monkeypatch.setattr(bench, 'LAYER_TUNE_GRID', [
      dict(block_m=16, block_n=16, block_k=64, num_warps=4, num_stages=2),
      dict(block_m=32, block_n=32, block_k=32, num_warps=4, num_stages=2)])
  res = bench.bench_decode_matmul('B', 4, repeats=1, tune=True)
  assert res['rows'] == 8 and res['ffn'] == 256
  for path in ('xla', 'pallas'):
    assert res['paths'][path]['us'] > 0 and res['paths'][path]['max_err'] < 0.1
  assert len(res['tune']) == 2 and res['tune_best'] == res['tune'][0]
  assert bench._parse_layer_tuning('32,16,64,2,3') == dict(block_m=32, block_n=16, block_k=64,
                                                           num_warps=2, num_stages=3)


def test_bench_sample_runs_the_fused_layer(monkeypatch):
  """`bench sample --decode-layer pallas --layer-tuning ...` at a tiny shape; the module's launch
  parameters are restored afterwards."""
  bench = _tiny_bench(monkeypatch)
  before = dict(dm._TUNING)
  res = bench.bench_sample('B', 2, repeats=1, decode_layer='pallas',
                           layer_tuning=dict(block_m=16, block_n=16, block_k=32, num_warps=4,
                                             num_stages=2))
  assert res['decode_layer'] == 'pallas' and res['images_s'] > 0
  assert res['layer_tuning']['block_n'] == 16 and dm._TUNING == before


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('holistic', [True, False])
def test_qkv_rope_kernel_matches_the_block(dtype, holistic):
  """norm_qkv_rope against Block.qkv's XLA path at one position: a holistic position (embedding
  added, no rotation) and a patch position (rotation), outputs compared in half-split order."""
  from flax import nnx
  from hita_jax.models.gpt import Block, GPT
  cfg = tiny_cfg(n_head=2, dtype='float32' if dtype == jnp.float32 else 'bfloat16')  # head dim 32
  blk = Block(cfg, rngs=nnx.Rngs(4))
  blk.attention_norm.weight[...] = 1.0 + 0.1 * jax.random.normal(jax.random.key(5), (cfg.dim,))
  gpt = GPT(cfg, rngs=nnx.Rngs(6))
  length = cfg.num_holistic + 8
  _, cos, sin = gpt.position_tables(length)
  p = 3 if holistic else cfg.num_holistic + 5
  # the table's rows, zero past the holistic positions
  table = jnp.pad(gpt.pos_add(length), ((0, length - cfg.num_holistic), (0, 0)))
  add = table[p:p + 1].astype(dtype)
  x = jax.random.normal(jax.random.key(7), (6, 1, cfg.dim)).astype(dtype)
  q, k, v = blk.qkv(x, add, cos[p:p + 1], sin[p:p + 1])
  perm = dm.half_split_columns(cfg.n_head, cfg.head_dim)
  ref = jnp.concatenate([q.reshape(6, -1)[:, perm], k.reshape(6, -1)[:, perm], v.reshape(6, -1)], -1)
  cols = jnp.concatenate([perm, perm + cfg.dim, jnp.arange(2 * cfg.dim, 3 * cfg.dim)])
  got = dm.norm_qkv_rope(x[:, 0], blk.attention_norm.weight[...], blk.wqkv[...][:, cols],
                         add[0][perm], cos[p], sin[p], n_head=cfg.n_head, eps=cfg.norm_eps)
  assert all(a.shape == (6, cfg.dim) and a.dtype == dtype for a in got)
  got, ref = np.asarray(jnp.concatenate(got, -1), np.float32), np.asarray(ref, np.float32)
  if dtype == jnp.float32:
    np.testing.assert_allclose(got, ref, atol=2e-6, rtol=1e-5)
  else:
    assert np.abs(got - ref).max() <= 2 ** -7 * np.abs(ref).max()
  assert dm.rope_fits(64) and dm.rope_fits(32) and not dm.rope_fits(16) and not dm.rope_fits(60)


@pytest.mark.parametrize('kw', [dict(n_head=4), dict(n_head=2, scan_layers=True)])
def test_fused_sampler_variants(kw):
  """Head dim 16 (no RoPE kernel: fused products, RoPE in XLA) and scanned layers (the permuted qkv
  weights scanned with the layers): the greedy codes of the XLA path, fp32."""
  cfg = tiny_cfg(grid=4, num_holistic=5, **kw)
  labels = jnp.asarray([0, 3])
  ref = generate(random_gpt(cfg, seed=8), labels, jax.random.key(3), cfg_scale=1.5, top_k=1,
                 kv_segments=2, return_logits=True)
  got = generate(random_gpt(dataclasses.replace(cfg, decode_layer_impl='pallas'), seed=8), labels,
                 jax.random.key(3), cfg_scale=1.5, top_k=1, kv_segments=2, return_logits=True)
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(ref[0]))
  np.testing.assert_allclose(np.asarray(got[1]), np.asarray(ref[1]), atol=1e-5)


def test_kernels_lower_to_triton_for_cuda_on_a_cpu_machine():
  """Cross-platform lowering (jax.export for 'cuda' without a GPU): every decode kernel goes through
  Pallas' Triton lowering at GPT-B's shapes, so an op Triton lowering does not support fails here,
  not first on a GPU lease. (Triton's own compile to PTX still happens only on a GPU.)"""
  from hita_jax.models import decode_attention as da
  m, d, f, heads = 128, 768, 2048, 12
  arr = lambda *shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt)
  f32 = jnp.float32
  kernels = {
      'norm_matmul': (lambda x, g, w: dm.norm_matmul(x, g, w, interpret=False),
                      (arr(m, d), arr(d, dt=f32), arr(d, 3 * d))),
      'swiglu': (lambda x, g, w, w3: dm.norm_matmul(x, g, w, w_gate=w3, interpret=False),
                 (arr(m, d), arr(d, dt=f32), arr(d, f), arr(d, f))),
      'head': (lambda x, g, w: dm.norm_matmul(x, g, w, out_dtype=f32, interpret=False),
               (arr(m, d), arr(d, dt=f32), arr(d, 16384))),
      'residual': (lambda a, w, r: dm.matmul_residual(a, w, r, interpret=False),
                   (arr(m, f), arr(f, d), arr(m, d))),
      'qkv_rope': (lambda *a: dm.norm_qkv_rope(*a, n_head=heads, interpret=False),
                   (arr(m, d), arr(d, dt=f32), arr(d, 3 * d), arr(d), arr(32, dt=f32), arr(32, dt=f32))),
      'padded_rows': (lambda x, g, w: dm.norm_matmul(x, g, w, interpret=False),
                      (arr(6, d), arr(d, dt=f32), arr(d, 3 * d))),
      'decode_attention': (lambda q, k, v: da.decode_attention_pallas(q, k, v, 5, interpret=False),
                           (arr(m, heads, 64), arr(m, heads, 576, 64), arr(m, heads, 576, 64))),
  }
  # fp32 (sample.dtype=float32) products too
  kernels['fp32_swiglu'] = (kernels['swiglu'][0], (arr(m, d, dt=f32), arr(d, dt=f32), arr(d, f, dt=f32),
                                                   arr(d, f, dt=f32)))
  kernels['fp32_residual'] = (kernels['residual'][0], (arr(m, f, dt=f32), arr(f, d, dt=f32),
                                                       arr(m, d, dt=f32)))
  allow = [jax.export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')]
  for name, (fn, args) in kernels.items():
    exp = jax.export.export(jax.jit(fn), platforms=['cuda'], disabled_checks=allow)(*args)
    assert '__gpu$xla.gpu.triton' in exp.mlir_module(), name


def test_fused_sampler_with_fsdp_sharded_weights():
  """The XL / 2B presets shard the weights (FSDP): the fused layer replicates them once per
  generate (`decode_weights`) and gives the codes of the single-device XLA path."""
  from hita_jax import sharding
  cfg = tiny_cfg(grid=4, num_holistic=5, n_head=2)
  labels = jnp.asarray([0, 1, 4, 2, 3, 1, 0, 2])
  ref = generate(random_gpt(cfg, seed=6), labels, jax.random.key(4), cfg_scale=2.0, top_k=1,
                 kv_segments=2)
  mesh = jax.make_mesh((2, 4), ('data', 'fsdp'), axis_types=(AxisType.Auto,) * 2)
  m = sharding.shard_module(random_gpt(dataclasses.replace(cfg, decode_layer_impl='pallas'), seed=6),
                            mesh, sharding.DEFAULT_RULES)
  assert not m.blocks.w1[...].sharding.is_fully_replicated  # the FSDP placement under test
  with jax.set_mesh(mesh):
    lab = jax.device_put(labels, jax.sharding.NamedSharding(mesh, P(('data', 'fsdp'))))
    got = generate(m, lab, jax.random.key(4), cfg_scale=2.0, top_k=1, kv_segments=2)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
