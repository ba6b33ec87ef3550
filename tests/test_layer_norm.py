"""layers.LayerNorm: the split spelling (statistics behind an optimization barrier) against
nnx.LayerNorm."""
import numpy as np
import pytest


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_layer_norm_split_is_nnx_layer_norm(dtype, monkeypatch):
  """layers.LAYER_NORM='split' (the default: the row statistics behind an optimization barrier,
  which cuts XLA's GPU fusion work) gives nnx.LayerNorm's output and gradients ('fused') in fp32,
  and within bf16 rounding for bf16 activations; the barrier is in the program; a bad value is named."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from hita_jax.models import layers
  norm = layers.LayerNorm(48, eps=1e-6, rngs=nnx.Rngs(0))
  rs = np.random.RandomState(0)
  norm.norm.scale[...] = jnp.asarray(rs.normal(1, 0.2, 48).astype(np.float32))
  norm.norm.bias[...] = jnp.asarray(rs.normal(0, 0.2, 48).astype(np.float32))
  x = jnp.asarray((rs.normal(0.5, 2.0, (3, 7, 48))).astype(np.float32)).astype(dtype)
  w = jnp.asarray(rs.normal(size=(3, 7, 48)).astype(np.float32))

  def run(spelling):
    monkeypatch.setattr(layers, 'LAYER_NORM', spelling)
    _, params = nnx.split(norm)

    def loss(params, x):
      y = nnx.merge(nnx.graphdef(norm), params)(x)
      return jnp.sum(y.astype(jnp.float32) * w), y
    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return y, grads, str(jax.make_jaxpr(lambda x: norm(x))(x))
  y_s, (gp_s, gx_s), jaxpr_s = run('split')
  y_f, (gp_f, gx_f), jaxpr_f = run('fused')
  assert 'optimization_barrier' in jaxpr_s and 'optimization_barrier' not in jaxpr_f
  assert y_s.dtype == y_f.dtype == jnp.dtype(dtype)
  tol = dict(rtol=1e-5, atol=1e-5) if dtype == 'float32' else dict(rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(np.asarray(y_s, np.float32), np.asarray(y_f, np.float32), **tol)
  np.testing.assert_allclose(np.asarray(gx_s, np.float32), np.asarray(gx_f, np.float32), **tol)
  for a, b in zip(jax.tree.leaves(gp_s), jax.tree.leaves(gp_f)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  monkeypatch.setattr(layers, 'LAYER_NORM', 'barrier')
  with pytest.raises(ValueError, match='layers.LAYER_NORM must be one of'):
    norm(x)
