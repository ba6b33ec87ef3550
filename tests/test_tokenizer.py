"""Tokenizer behaviour on tiny random models: API, shapes, the last-k readout, losses, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hita_jax.models.tokenizer import trainable_filter
from tests.utils import random_images, tiny_tokenizer


@pytest.fixture(scope='module')
def model_v():
  m = tiny_tokenizer('V')
  m.eval()
  return m


def test_encode_decode_shapes(model_v):
  x = random_images()
  hol, patch = model_v.encode(x)
  cfg = model_v.cfg
  g = cfg.grid(64)
  assert hol.shape == (2, cfg.num_holistic) and hol.dtype == jnp.int32
  assert patch.shape == (2, g * g)
  assert int(hol.max()) < cfg.codebook_size and int(patch.min()) >= 0
  rec = model_v.decode(hol, patch)
  assert rec.shape == x.shape and np.isfinite(np.asarray(rec)).all()
  # eval forward == decode(encode(x)) up to the straight-through rounding
  out = model_v(x)
  np.testing.assert_array_equal(out['patch_codes'], patch)
  np.testing.assert_allclose(out['recon'], rec, atol=1e-4)


def test_last_k_patch_codes_are_dead(model_v):
  """The fusion decoder reads outputs [S-k, S-k+N): the last k patch codes never reach the image,
  while the first holistic code and an earlier patch code do (spec section 2.6)."""
  hol, patch = model_v.encode(random_images(seed=1))
  base = np.asarray(model_v.decode(hol, patch))
  k = model_v.cfg.shift_k
  n = patch.shape[1]
  changed_tail = patch.at[:, n - k:].set((patch[:, n - k:] + 7) % model_v.cfg.codebook_size)
  np.testing.assert_array_equal(np.asarray(model_v.decode(hol, changed_tail)), base)
  changed_mid = patch.at[:, n - k - 1].set((patch[:, n - k - 1] + 7) % model_v.cfg.codebook_size)
  assert np.abs(np.asarray(model_v.decode(hol, changed_mid)) - base).max() > 1e-4
  changed_hol = hol.at[:, 0].set((hol[:, 0] + 7) % model_v.cfg.codebook_size)
  assert np.abs(np.asarray(model_v.decode(changed_hol, patch)) - base).max() > 1e-4


def test_training_forward_losses_and_gradients():
  m = tiny_tokenizer('U')
  m.train()
  x = random_images(seed=2)
  graphdef, params, rest = nnx.split(m, trainable_filter(), ...)

  def loss_fn(p, r):
    model = nnx.merge(graphdef, p, r, copy=True)  # fresh Variables inside the trace
    out = model(x)
    cos = jnp.sum(out['vfm_prediction'] * out['dinov2_patch_features'], -1) / (
        jnp.linalg.norm(out['vfm_prediction'], axis=-1) *
        jnp.linalg.norm(out['dinov2_patch_features'], axis=-1))
    return (jnp.mean((out['recon'] - x) ** 2) + out['vq'] + out['commit'] + jnp.mean(1 - cos)), out

  # jitted: one compile instead of op-by-op dispatch of a forward and backward (~4x faster on CPU)
  (loss, out), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, rest)
  assert np.isfinite(float(loss))
  assert out['vfm_prediction'].shape == (2, m.cfg.vfm_grid ** 2, m.cfg.vfm_out_dim)
  assert float(out['vq']) > 0 and np.isclose(float(out['commit']), 0.25 * float(out['vq']), rtol=1e-5)
  g = nnx.to_flat_state(grads)
  norms = {'.'.join(map(str, p)): float(jnp.linalg.norm(v[...])) for p, v in g}
  assert all(np.isfinite(list(norms.values())))
  # gradients reach the CNN encoder through the straight-through estimator and both codebooks
  assert norms['cnn_encoder.conv_in.kernel'] > 0
  assert norms['patch_quantizer.codebook'] > 0 and norms['holistic_quantizer.codebook'] > 0
  assert norms['holistic_encoder.holistic_tokens'] > 0
  assert not any('dinov2' in k for k in norms)  # frozen: not a trainable parameter


def test_code_usage_updates_only_in_training():
  m = tiny_tokenizer('V')
  x = random_images(seed=3)
  m.eval()
  m(x)
  assert float(m.patch_quantizer.usage_fraction()) == pytest.approx(1 / m.cfg.codebook_size)
  m.train()
  out = m(x)
  used = np.unique(np.concatenate([[0], np.asarray(out['patch_codes']).ravel()]))
  assert float(m.patch_quantizer.usage_fraction()) == pytest.approx(len(used) / m.cfg.codebook_size)


@pytest.mark.parametrize('shape,match', [((2, 64, 64), 'NHWC'), ((2, 3, 64, 64), 'NHWC'),
                                         ((2, 60, 64, 3), 'multiple')])
def test_bad_image_shapes_are_explained(model_v, shape, match):
  with pytest.raises(ValueError, match=match):
    model_v.encode(np.zeros(shape, np.float32))


def test_other_input_size_interpolates_position_tables(model_v):
  """A 96-px input gives a 12x12 grid: the 4x4 tables are bicubically resized (official path)."""
  hol, patch = model_v.encode(random_images(b=1, size=96))
  assert patch.shape == (1, 144)
  assert model_v.decode(hol, patch).shape == (1, 96, 96, 3)


def test_cnn_norm_groups():
  """tokenizer.norm_groups reaches every CNN GroupNorm. Why it exists: with one channel per group
  (the official 32 groups at ch=32) the first GroupNorm is an instance norm: an image whose shape
  is 1.8x as saturated on the same ground gives the same normalised features, and the colour
  reaches the rest of the encoder only through the residual path. With four channels per group
  (the official ratio at ch=128) the normalised features differ."""
  from hita_jax.models.cnn import CNNEncoder
  from hita_jax.models.layers import GroupNorm
  mask = np.zeros((1, 16, 16, 1), np.float32)
  mask[:, 4:12, 4:12] = 1.0
  colour = np.array([0.5, -0.2, 0.1], np.float32)
  a, b = jnp.asarray(mask * colour), jnp.asarray(mask * 1.8 * colour)  # ground 0 = the conv padding

  def first_norm_gap(groups):
    enc = CNNEncoder(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, groups=groups, rngs=nnx.Rngs(0))
    norm = lambda x: enc.levels[0].res[0].norm1(enc.conv_in(x))  # noqa: E731
    return float(jnp.max(jnp.abs(norm(a) - norm(b))))

  assert first_norm_gap(8) < 1e-3
  assert first_norm_gap(2) > 1e-1
  tok = nnx.eval_shape(lambda: tiny_tokenizer(norm_groups=8))  # structure only: no init compute
  groups = {n.norm.num_groups for _, n in nnx.iter_graph(tok) if isinstance(n, GroupNorm)}
  assert groups == {8}
  with pytest.raises(ValueError, match='norm_groups'):
    CNNEncoder(ch=12, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, groups=8, rngs=nnx.Rngs(0))


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_scanned_dinov2_gives_the_unrolled_features_and_codes(dtype):
  """tokenizer.dinov2_scan: the frozen DINOv2's blocks as one lax.scan over weights stacked in the
  call (dense weights stacked in the compute dtype, norms fp32) computes what the unrolled blocks
  do; the parameters (paths, values) are the same, so checkpoints and converters are unaffected."""
  a = tiny_tokenizer('V', dtype=dtype)
  b = tiny_tokenizer('V', dtype=dtype, dinov2_scan=True)
  a.eval(), b.eval()
  sa, sb = nnx.to_flat_state(nnx.state(a, nnx.Param)), nnx.to_flat_state(nnx.state(b, nnx.Param))
  assert [p for p, _ in sa] == [p for p, _ in sb]
  x = jnp.asarray(random_images(seed=3))
  fa = jax.jit(lambda m, x: m.dinov2_features(x))(a, x)
  fb = jax.jit(lambda m, x: m.dinov2_features(x))(b, x)
  if dtype == 'float32':
    np.testing.assert_allclose(fb, fa, rtol=1e-5, atol=1e-5)
    for codes_a, codes_b in zip(jax.jit(lambda m, x: m.encode(x))(a, x),  # holistic, patch
                                jax.jit(lambda m, x: m.encode(x))(b, x)):
      np.testing.assert_array_equal(codes_a, codes_b)
  else:  # XLA's bf16 fusion boundaries differ between the two programs: a few bf16 steps apart
    np.testing.assert_allclose(fb, fa, rtol=0, atol=0.05 * float(jnp.abs(fa).max()))
    # and against fp32 (same seed, same parameters): the scan within 1.5x the unrolled bf16
    # blocks' distance from it
    ref = tiny_tokenizer('V', dtype='float32')
    ref.eval()
    f32 = np.asarray(jax.jit(lambda m, x: m.dinov2_features(x))(ref, x), np.float32)
    gap = lambda f: float(np.abs(np.asarray(f, np.float32) - f32).max())
    assert gap(fb) <= 1.5 * gap(fa) + 1e-3 * float(np.abs(f32).max()), (gap(fb), gap(fa))
    assert gap(fb) <= 0.05 * float(np.abs(f32).max())
  jaxpr = jax.make_jaxpr(lambda x: b.dinov2_features(x))(x)
  assert any(e.primitive.name == 'scan' for e in jaxpr.jaxpr.eqns)
  assert not any(e.primitive.name == 'scan' for e in jax.make_jaxpr(
      lambda x: a.dinov2_features(x))(x).jaxpr.eqns)


def test_hash_dropout_rng_trains_and_leaves_eval_and_parameters_alone():
  """tokenizer.dropout_rng='hash' (the transformers' masks recomputed in the backward): the same
  parameters, the same eval output, a training loss with other masks but finite values and
  gradients, the same loss twice for the same dropout stream; a bad value is named."""
  from hita_jax.errors import UserError
  x = random_images(seed=2)
  out = {}
  for rng in ('threefry', 'hash'):
    m = tiny_tokenizer('V', dropout_rng=rng, dropout=0.3)
    layers = [mod for _, mod in nnx.iter_graph(m) if type(mod).__name__ == 'HolisticLayer']
    assert len(layers) == 3 * m.cfg.depth  # E_trans, E_causal and the fusion decoder, each of depth
    assert {layer.dropout_rng for layer in layers} == {rng}
    m.eval()
    eval_recon = np.asarray(m(x)['recon'])
    m.train()
    graphdef, params, rest = nnx.split(m, trainable_filter(), ...)

    def loss_fn(p):
      out = nnx.merge(graphdef, p, rest, copy=True)(x)
      return jnp.mean((out['recon'] - x) ** 2) + out['vq']
    loss, grads = jax.value_and_grad(loss_fn)(params)
    assert np.isfinite(float(loss)) and all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    # the same masks again: value_and_grad's primal and a plain call may round differently (seen
    # on an AMD EPYC host with 8 fake devices: 1 ulp), other masks move the loss by ~1 %
    np.testing.assert_allclose(float(loss_fn(params)), float(loss), rtol=1e-6)
    out[rng] = (params, eval_recon, float(loss))
  for a, b in zip(jax.tree.leaves(out['threefry'][0]), jax.tree.leaves(out['hash'][0])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(out['threefry'][1], out['hash'][1])
  assert abs(out['threefry'][2] - out['hash'][2]) > 1e-4 * abs(out['hash'][2])
  with pytest.raises(UserError, match='dropout_rng'):
    tiny_tokenizer('V', dropout_rng='philox')
