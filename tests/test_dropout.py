"""Dropout masks (models/dropout.py): the 16-bit Threefry masks (GPTConfig.dropout_bits=16) and the
recomputed hash masks (dropout_rng=hash): statistics, independence, sharding, bf16, gradients."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from hita_jax.models.dropout import dropout, keep_mask_16
from tests.conftest import ROOT
from tests.test_gpt import codes, random_gpt, tiny_cfg


def test_keep_mask_16_statistics():
  shape = (16, 300, 256)
  keep, scale = keep_mask_16(jax.random.key(0), shape, 0.1)
  keep = np.asarray(keep)
  assert keep.shape == shape and keep.dtype == bool
  p_drop = 6554 / 65536                               # round(0.1 * 65536) / 65536
  n = keep.size
  assert abs((1 - keep.mean()) - p_drop) < 5 * np.sqrt(p_drop * (1 - p_drop) / n)
  assert scale == pytest.approx(1 / (1 - p_drop), rel=1e-12)   # E[keep * scale] = 1 exactly
  flat = keep.reshape(-1).astype(np.float64)
  for lag in (1, 2, 3, 4, 256):                       # the four 16-bit draws of one hash, rows
    assert abs(np.corrcoef(flat[:-lag], flat[lag:])[0, 1]) < 5 / np.sqrt(n)
  other = np.asarray(keep_mask_16(jax.random.key(1), shape, 0.1)[0])
  agree = (keep == other).mean()                      # independent masks: p^2 + (1 - p)^2
  assert abs(agree - ((1 - p_drop) ** 2 + p_drop ** 2)) < 0.005
  assert np.asarray(keep_mask_16(jax.random.key(0), shape, 0.5)[0]).mean() == pytest.approx(0.5, abs=0.005)


def test_keep_mask_16_is_the_same_when_sharded():
  """Counters come from per-axis iotas, so a batch-sharded draw is the unsharded one, bit for bit."""
  mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
  sh = NamedSharding(mesh, P('data'))
  x = jnp.ones((16, 40, 64))
  f = lambda x, key: dropout(x, 0.1, key, 16)
  ref = np.asarray(jax.jit(f)(x, jax.random.key(3)))
  got = jax.jit(f, in_shardings=(sh, None), out_shardings=sh)(jax.device_put(x, sh), jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(got), ref)


def test_dropout_16_bits_fp32_and_bf16_and_fallbacks():
  x = jax.random.normal(jax.random.key(5), (8, 33, 64))
  key = jax.random.key(7)
  y32 = np.asarray(dropout(x, 0.1, key, 16))
  keep, scale = keep_mask_16(key, x.shape, 0.1)
  np.testing.assert_allclose(y32, np.where(np.asarray(keep), np.asarray(x) * scale, 0), rtol=1e-6)
  y16 = np.asarray(dropout(x.astype(jnp.bfloat16), 0.1, key, 16), np.float32)
  np.testing.assert_array_equal(y16 == 0, y32 == 0)            # the same mask in bf16
  np.testing.assert_allclose(y16, y32, rtol=1e-2, atol=1e-2)    # bf16 rounding only
  assert dropout(x, 0.0, key, 16) is x and dropout(x, 0.1, None, 16) is x
  # a last axis not divisible by 4 falls back to jax.random.bernoulli
  odd = jnp.ones((4, 10, 6))
  np.testing.assert_array_equal(np.asarray(dropout(odd, 0.1, key, 16)),
                                np.asarray(dropout(odd, 0.1, key, 32)))
  with pytest.raises(ValueError, match='dropout_bits'):
    tiny_cfg(dropout_bits=8)


def test_gpt_trains_with_16_bit_dropout():
  """The training loss with dropout_bits=16: finite values and gradients, different masks from
  the 32-bit draw, and the same loss as 32 bits when every dropout rate is 0 (Threefry masks:
  dropout_bits means nothing to the default hash masks)."""
  cfg = tiny_cfg(token_dropout=0.1, resid_dropout=0.1, ffn_dropout=0.1, dropout_rng='threefry')
  labels, q, z = codes(cfg)
  out = {}
  for bits in (16, 32):
    m = random_gpt(dataclasses.replace(cfg, dropout_bits=bits))
    loss = lambda mm: sum(mm.loss(labels, q, z, rng=jax.random.key(3)))
    from flax import nnx
    l, g = nnx.value_and_grad(loss)(m)
    assert np.isfinite(float(l)) and all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(g))
    out[bits] = float(l)
  assert out[16] != out[32]
  plain = tiny_cfg(dropout_rng='threefry')
  same = [float(sum(random_gpt(dataclasses.replace(plain, dropout_bits=b)).loss(
      labels, q, z, rng=jax.random.key(3)))) for b in (16, 32)]
  assert same[0] == same[1]


@pytest.mark.parametrize('shape', [(3, 7, 2), (2, 5, 12, 16)])
def test_sixteen_bit_words_equal_their_stacked_spelling(shape):
  """keep_mask_16's words by broadcast and select equal the first spelling (the four 16-bit words
  stacked) bit for bit: it changed how XLA fuses them, not the mask."""
  from hita_jax.models.dropout import sixteen_bit_words
  y1, y2 = (jax.random.bits(jax.random.key(s), shape, jnp.uint32) for s in (0, 1))
  lo16 = jnp.uint32(0xFFFF)
  stacked = jnp.stack([y1 & lo16, y1 >> 16, y2 & lo16, y2 >> 16], axis=-1)
  for fn in (sixteen_bit_words, jax.jit(sixteen_bit_words)):
    np.testing.assert_array_equal(np.asarray(fn(y1, y2)), np.asarray(stacked))


def test_test_suites_unrolled_threefry_draws_the_same_bits(tmp_path):
  """conftest.py switches the CPU's Threefry lowering to the unrolled one (compile time only):
  the draws must equal those of JAX's own CPU lowering, computed in a fresh process."""
  import subprocess
  import sys
  code = '''
import sys, numpy as np, jax
from hita_jax.models.dropout import keep_mask_16
k = jax.random.key(3)
f = jax.jit(lambda k: (jax.random.uniform(k, (5, 7)), jax.random.normal(k, (33,)),
                       jax.random.bits(jax.random.fold_in(k, 1), (4, 9)), keep_mask_16(k, (6, 8), 0.1)[0]))
np.savez(sys.argv[1], *[np.asarray(a) for a in f(k)])
'''
  env = dict(os.environ, HITA_TEST_ROLLED_THREEFRY='1', JAX_PLATFORMS='cpu')
  subprocess.run([sys.executable, '-c', code, str(tmp_path / 'rolled.npz')], check=True, env=env, cwd=ROOT)
  from jax._src.interpreters import mlir  # the hook conftest.py set is in place here
  from jax._src.random import threefry2x32 as tf
  assert mlir._platform_specific_lowerings['cpu'][tf.threefry2x32_p].rule is tf._threefry2x32_lowering_rule
  exec(code.replace('sys.argv[1]', repr(str(tmp_path / 'unrolled.npz'))), {})
  a, b = np.load(tmp_path / 'rolled.npz'), np.load(tmp_path / 'unrolled.npz')
  assert len(a.files) == 4
  for name in a.files:
    np.testing.assert_array_equal(a[name], b[name])


def test_hash_mask_statistics():
  from hita_jax.models.dropout import hash_keep_mask
  shape = (16, 300, 256)
  salts = lambda s: jax.random.bits(jax.random.key(s), (2,), jnp.uint32)
  keep, scale = hash_keep_mask(salts(0), shape, 0.1)
  keep = np.asarray(keep)
  assert keep.shape == shape and keep.dtype == bool
  p_drop = round(0.1 * 2 ** 32) / 2 ** 32
  n = keep.size
  assert abs((1 - keep.mean()) - p_drop) < 5 * np.sqrt(p_drop * (1 - p_drop) / n)
  assert scale == pytest.approx(1 / (1 - p_drop), rel=1e-12)   # E[keep * scale] = 1 exactly
  flat = keep.reshape(-1).astype(np.float64)
  for lag in (1, 2, 3, 4, 8, 256, 300 * 256):                   # neighbours, rows, batch rows
    assert abs(np.corrcoef(flat[:-lag], flat[lag:])[0, 1]) < 5 / np.sqrt(n), lag
  # masks of other sites (salts): independent, including one that differs in one salt only
  for other_salts in (salts(1), salts(0).at[1].add(1)):
    other = np.asarray(hash_keep_mask(other_salts, shape, 0.1)[0])
    assert abs((keep == other).mean() - ((1 - p_drop) ** 2 + p_drop ** 2)) < 0.005
  for rate in (0.5, 0.02):
    assert 1 - np.asarray(hash_keep_mask(salts(2), shape, rate)[0]).mean() == pytest.approx(rate, abs=0.003)


def test_hash_mask_past_the_uint32_index(monkeypatch):
  """An array too large for a uint32 index (the limit lowered here, so it runs on a CPU) hashes its
  first axis apart: the draw is still uniform with independent rows, padded rows are the unpadded
  draw, a sharded draw equals the unsharded one, the gradient recomputes the same mask, and one
  row over 2**32 elements is named with the fix."""
  from hita_jax.models import dropout as dropout_mod
  shape = (16, 300, 64)
  salts = jax.random.bits(jax.random.key(0), (2,), jnp.uint32)
  narrow = np.asarray(dropout_mod.hash_keep_mask(salts, shape, 0.1)[0])
  monkeypatch.setattr(dropout_mod, '_INDEX_LIMIT', 300 * 64)
  keep = np.asarray(dropout_mod.hash_keep_mask(salts, shape, 0.1)[0])
  assert (keep != narrow).any()                                 # the wide formula is in use
  p_drop = round(0.1 * 2 ** 32) / 2 ** 32
  n = keep.size
  assert abs((1 - keep.mean()) - p_drop) < 5 * np.sqrt(p_drop * (1 - p_drop) / n)
  flat = keep.reshape(-1).astype(np.float64)
  for lag in (1, 2, 64, 300 * 64, 3 * 300 * 64):                # neighbours, rows, batch rows
    assert abs(np.corrcoef(flat[:-lag], flat[lag:])[0, 1]) < 5 / np.sqrt(n), lag
  for b in range(1, 16):                                        # rows of the first axis differ
    assert abs((keep[0] == keep[b]).mean() - ((1 - p_drop) ** 2 + p_drop ** 2)) < 0.01, b
  x = jax.random.normal(jax.random.key(5), (8, 40, 64))
  key = jax.random.key(7)
  monkeypatch.setattr(dropout_mod, '_INDEX_LIMIT', 33 * 64)
  y = np.asarray(dropout_mod.hash_dropout(x, 0.1, key, rows=33))
  np.testing.assert_array_equal(y[:, :33], np.asarray(dropout_mod.hash_dropout(x[:, :33], 0.1, key)))
  mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
  sh = NamedSharding(mesh, P('data'))
  f = lambda x, key: dropout_mod.hash_dropout(x, 0.1, key, rows=33)
  got = jax.jit(f, in_shardings=(sh, None), out_shardings=sh)(jax.device_put(x, sh), key)
  np.testing.assert_array_equal(np.asarray(got), y)
  g = np.asarray(jax.jit(jax.grad(lambda x: jnp.sum(f(x, key))))(x))
  np.testing.assert_array_equal(g == 0, y == 0)
  with pytest.raises(ValueError, match="one row of a .* dropout_rng='threefry'"):
    dropout_mod.hash_keep_mask(salts, (2, 2 ** 31, 4), 0.1)
  monkeypatch.setattr(dropout_mod, '_INDEX_LIMIT', 2 ** 32)
  for shape in ((1, 2 ** 30, 4), (3, 1, 2 ** 30, 4)):  # a stride of exactly 2**32 (traced, not run)
    assert jax.eval_shape(lambda s: dropout_mod.hash_keep_mask(s, shape, 0.1)[0], salts).shape == shape


def test_hash_dropout_rows_sharding_bf16_and_gradient():
  """The padded draw's real rows equal the unpadded draw and padded rows are kept; a sharded
  draw equals the unsharded one bit for bit; bf16 has fp32's mask; the gradient is dy masked and
  scaled, under jit too; a bad rng is named."""
  from hita_jax.models.dropout import hash_dropout
  x = jax.random.normal(jax.random.key(5), (8, 40, 64))
  key = jax.random.key(7)
  y = np.asarray(hash_dropout(x, 0.1, key, rows=33))
  np.testing.assert_array_equal(y[:, :33], np.asarray(hash_dropout(x[:, :33], 0.1, key)))
  np.testing.assert_array_equal(y[:, 33:], np.asarray(x[:, 33:]) * np.float32(2 ** 32 / (2 ** 32 - round(0.1 * 2 ** 32))))
  mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
  sh = NamedSharding(mesh, P('data'))
  f = lambda x, key: hash_dropout(x, 0.1, key, rows=33)
  got = jax.jit(f, in_shardings=(sh, None), out_shardings=sh)(jax.device_put(x, sh), key)
  np.testing.assert_array_equal(np.asarray(got), y)
  y16 = np.asarray(hash_dropout(x.astype(jnp.bfloat16), 0.1, key, rows=33), np.float32)
  np.testing.assert_array_equal(y16 == 0, y == 0)
  np.testing.assert_allclose(y16, y, rtol=1e-2, atol=1e-2)
  w = jax.random.normal(jax.random.key(8), x.shape)
  loss = lambda x: jnp.sum(hash_dropout(x, 0.1, key, rows=33) * w)
  for fn in (jax.grad(loss), jax.jit(jax.grad(loss))):
    np.testing.assert_allclose(np.asarray(fn(x)), np.where(y != 0, np.asarray(w) * (y / np.where(y != 0, np.asarray(x), 1)), 0), rtol=1e-6)
  # the bf16 backward: fp32's zeros, and fp32's values within one bf16 rounding
  loss16 = lambda x: jnp.sum(hash_dropout(x, 0.1, key, rows=33).astype(jnp.float32) * w)
  g32 = np.asarray(jax.grad(loss)(x))
  g16 = np.asarray(jax.jit(jax.grad(loss16))(x.astype(jnp.bfloat16)), np.float32)
  np.testing.assert_array_equal(g16 == 0, g32 == 0)
  np.testing.assert_allclose(g16, g32, rtol=1e-2, atol=1e-6)
  assert dropout(x, 0.0, key, rng='hash') is x and dropout(x, 0.1, None, rng='hash') is x
  with pytest.raises(ValueError, match='dropout rng'):
    dropout(x, 0.1, key, rng='philox')
  with pytest.raises(ValueError, match='dropout_rng'):
    tiny_cfg(dropout_rng='philox')


def test_hash_dropout_keeps_no_mask_for_the_backward():
  """What autodiff saves between the forward and the backward: the Threefry path keeps an x-sized
  mask made in models/dropout.py; the hash path keeps nothing x-sized from there (two salts)."""
  from jax._src.ad_checkpoint import saved_residuals
  x = jnp.ones((4, 16, 64))
  w = jax.random.normal(jax.random.key(1), x.shape)  # a linear loss: w is the only other residual
  key = jax.random.key(0)

  def from_dropout(rng):
    res = saved_residuals(lambda x: jnp.vdot(dropout(x, 0.1, key, 16, rng=rng), w), x)
    return [(a.shape, a.dtype) for a, why in res if a.size >= x.size and 'models/dropout.py' in why]
  assert from_dropout('threefry'), 'the Threefry mask should be saved'
  assert not from_dropout('hash'), from_dropout('hash')


def test_gpt_trains_with_hash_dropout():
  """dropout_rng='hash' in the full model: finite loss and gradients, other masks than Threefry's,
  the same loss as Threefry when every dropout rate is 0, and the same loss twice."""
  from flax import nnx
  cfg = tiny_cfg(token_dropout=0.1, resid_dropout=0.1, ffn_dropout=0.1)
  labels, q, z = codes(cfg)
  out = {}
  for rng in ('threefry', 'hash'):
    m = random_gpt(dataclasses.replace(cfg, dropout_rng=rng))
    loss = lambda mm: sum(mm.loss(labels, q, z, rng=jax.random.key(3)))
    l, g = nnx.value_and_grad(loss)(m)
    assert np.isfinite(float(l)) and all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(g))
    assert float(loss(m)) == float(l)
    out[rng] = float(l)
  assert out['hash'] != out['threefry']
  plain = tiny_cfg()
  same = [float(sum(random_gpt(dataclasses.replace(plain, dropout_rng=r)).loss(
      labels, q, z, rng=jax.random.key(3)))) for r in ('threefry', 'hash')]
  assert same[0] == same[1]


def test_module_dropout_draws_one_key_from_the_modules_stream_either_way():
  from flax import nnx
  from hita_jax.models.dropout import hash_dropout, module_dropout
  x = jnp.ones((4, 8, 16))
  mods = {rng: nnx.Dropout(0.2, rngs=nnx.Rngs(dropout=3)) for rng in ('threefry', 'hash')}
  key = nnx.Dropout(0.2, rngs=nnx.Rngs(dropout=3)).rngs()  # the first key of the same stream
  y = module_dropout(mods['hash'], x, 'hash')
  np.testing.assert_array_equal(np.asarray(y), np.asarray(hash_dropout(x, 0.2, key)))
  module_dropout(mods['threefry'], x, 'threefry')
  counts = {rng: int(m.rngs.count[...]) for rng, m in mods.items()}
  assert counts['hash'] == counts['threefry'] == 1, counts
  mods['hash'].deterministic = True
  assert module_dropout(mods['hash'], x, 'hash') is x
  with pytest.raises(ValueError, match='dropout rng'):
    module_dropout(mods['threefry'], x, 'philox')
