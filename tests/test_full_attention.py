"""The tokenizer's unmasked attention (DINOv2, E_trans) through `layers.full_attention`: cuDNN's
fused kernel on GPU in bf16, the reference elsewhere. Here (CPU) the fused path's padding is run
through jax.nn.dot_product_attention's XLA implementation; the cuDNN kernel itself only on a GPU
(the last test, marker `gpu`)."""
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hita_jax.errors import UserError
from hita_jax.models import layers
from tests.utils import random_images, tiny_tokenizer


def _qkv(t, s, dtype=jnp.float32, b=2, h=3, d=16, seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(kk, (b, n, h, d)).astype(dtype) for kk, n in zip(k, (t, s, s)))


def _grads(f, q, k, v, w):
  return jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) * w), argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize('t,s', [(70, 90), (64, 128), (261, 261)])
def test_padded_path_equals_the_reference_in_fp32(t, s):
  """Lengths padded to the cuDNN block, padded keys masked by length, padded rows dropped: the
  same values and gradients as `attention`."""
  q, k, v = _qkv(t, s)
  fused = lambda *a: layers.padded_dot_product_attention(*a, implementation='xla')
  np.testing.assert_allclose(fused(q, k, v), layers.attention(q, k, v), rtol=1e-5, atol=1e-5)
  w = jax.random.normal(jax.random.key(7), q.shape)
  for name, a, b in zip('qkv', _grads(fused, q, k, v, w), _grads(layers.attention, q, k, v, w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f'd{name}')


def test_padded_path_in_bf16_is_within_rounding_of_fp32():
  """The fast path's dtype: bf16 in and out against the fp32 reference on the same inputs."""
  q, k, v = _qkv(70, 90, jnp.bfloat16, seed=1)
  fused = lambda *a: layers.padded_dot_product_attention(*a, implementation='xla')
  ref32 = layers.attention(*(a.astype(jnp.float32) for a in (q, k, v)))
  out = fused(q, k, v)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), ref32, rtol=0, atol=0.02)
  w = jax.random.normal(jax.random.key(8), q.shape)
  g16 = _grads(fused, q, k, v, w)
  g32 = _grads(layers.attention, *(a.astype(jnp.float32) for a in (q, k, v)), w)
  for name, a, b in zip('qkv', g16, g32):
    b = np.asarray(b)
    np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0,
                               atol=0.03 * float(np.abs(b).max()), err_msg=f'd{name}')


def test_full_attention_takes_the_reference_off_gpu_and_for_fp32():
  q, k, v = _qkv(20, 20)
  ref = layers.attention(q, k, v)
  for impl in ('auto', 'xla'):  # CPU: 'auto' is the reference
    np.testing.assert_array_equal(layers.full_attention(q, k, v, impl=impl), ref)
  # fp32 inputs keep the reference even where cuDNN is asked for (the parity configs)
  np.testing.assert_array_equal(layers.full_attention(q, k, v, impl='cudnn'), ref)
  with pytest.raises(ValueError, match='attn_impl'):
    layers.full_attention(q, k, v, impl='flash')


def test_tokenizer_routes_dinov2_and_e_trans_through_the_fused_path():
  """tokenizer.attn_impl: with the platform made to pick cuDNN, every DINOv2 block and every E_trans
  layer (not the causal stacks) take the padded fused path, and the bf16 model's outputs stay
  within bf16 steps of the reference path's."""
  calls = []
  ref = tiny_tokenizer('V', dtype='bfloat16', attn_impl='xla')
  fast = tiny_tokenizer('V', dtype='bfloat16', attn_impl='auto')
  ref.eval(), fast.eval()
  x = jnp.asarray(random_images(seed=4))
  want = ref(x)['recon']
  with mock.patch.object(layers, 'resolve_attn_impl', lambda impl, platform=None: 'cudnn'), \
       mock.patch.object(layers, 'padded_dot_product_attention', _counting(calls)):
    got = fast(x)['recon']
  cfg = fast.cfg
  assert len(calls) == cfg.dinov2.depth + cfg.depth, calls
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=0,
                             atol=0.05 * float(jnp.abs(want.astype(jnp.float32)).max()))
  with pytest.raises(UserError, match='tokenizer.attn_impl'):
    tiny_tokenizer('V', attn_impl='flash')


def _counting(calls):
  real = layers.padded_dot_product_attention

  def fused_on_cpu(q, k, v, *, implementation):
    calls.append(q.shape)
    return real(q, k, v, implementation='xla')
  return fused_on_cpu


@pytest.mark.gpu  # deselected by default (a skip would fail CI): JAX_PLATFORMS=cuda pytest -m gpu
@pytest.mark.parametrize('t', [261, 830])
def test_cudnn_kernel_against_the_reference_on_gpu(t):
  """The real kernel (run on the device lease): bf16 values and gradients within rounding of the
  fp32 reference at DINOv2's (261) and E_trans's (830) lengths."""
  q, k, v = _qkv(t, t, jnp.bfloat16, b=2, h=4, d=64, seed=2)
  fused = lambda *a: layers.full_attention(*a, impl='cudnn')
  f32 = lambda a: a.astype(jnp.float32)
  ref = layers.attention(f32(q), f32(k), f32(v))
  np.testing.assert_allclose(np.asarray(fused(q, k, v), np.float32), ref, rtol=0, atol=0.02)
  w = jax.random.normal(jax.random.key(9), q.shape)
  for name, a, b in zip('qkv', _grads(fused, q, k, v, w), _grads(layers.attention, f32(q), f32(k), f32(v), w)):
    b = np.asarray(b)
    np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0,
                               atol=0.03 * float(np.abs(b).max()), err_msg=f'd{name}')
