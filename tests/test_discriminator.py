"""PatchGAN batch statistics per data-parallel replica, as the official DDP run with plain
BatchNorm2d computes them (one set of statistics per GPU), or over the global batch."""
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from hita_jax import sharding
from hita_jax.models.discriminator import PatchGAN


def _disc(groups):
  d = PatchGAN(ndf=8, n_layers=2, batch_norm_groups=groups, rngs=nnx.Rngs(3))
  d.train()
  return d


def test_replica_statistics_equal_each_shard_run_alone():
  x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (16, 32, 32, 3)).astype(np.float32))
  x = x * jnp.linspace(0.2, 2.0, 16)[:, None, None, None]  # shards with different statistics
  alone = [_disc(1) for _ in range(8)]
  want = jnp.concatenate([d(x[2 * i:2 * i + 2]) for i, d in enumerate(alone)])
  replica = _disc(8)
  got = replica(x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # the running statistics follow replica 0 (the module the official trainer saves)
  for a, b in zip(replica.norms, alone[0].norms):
    np.testing.assert_allclose(a.mean[...], b.mean[...], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(a.var[...], b.var[...], rtol=1e-6, atol=1e-7)
  assert not np.allclose(_disc(1)(x), got, atol=1e-3)  # global statistics differ


def test_replica_statistics_on_an_8_device_mesh():
  mesh = sharding.make_mesh('data=8')
  x = np.random.RandomState(1).uniform(-1, 1, (16, 32, 32, 3)).astype(np.float32)
  x *= np.linspace(0.2, 2.0, 16)[:, None, None, None]
  d = _disc(8)
  graphdef, state = nnx.split(d)
  fn = jax.jit(lambda s, v: nnx.merge(graphdef, s)(v))
  got = fn(state, jax.device_put(x, NamedSharding(mesh, P('data'))))
  np.testing.assert_allclose(got, _disc(8)(jnp.asarray(x)), rtol=1e-5, atol=1e-5)
  want = jnp.concatenate([_disc(1)(jnp.asarray(x[2 * i:2 * i + 2])) for i in range(8)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_convolutions_agree_with_fp32():
  """The trainer's bf16 compute path (the official trains under bf16 autocast): same parameters,
  logits and gradients within bf16 rounding of the fp32 ones, and the convolutions really bf16."""
  x = jnp.asarray(np.random.RandomState(2).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32))
  f32 = PatchGAN(ndf=16, n_layers=2, rngs=nnx.Rngs(5))
  bf16 = PatchGAN(ndf=16, n_layers=2, dtype=jnp.bfloat16, rngs=nnx.Rngs(5))
  nnx.update(bf16, nnx.state(f32, nnx.Param))  # identical fp32 parameters

  def loss(model, x):
    return jnp.mean(jax.nn.softplus(-model(x)))

  out32, out16 = f32(x), bf16(x)
  assert out16.dtype == jnp.float32  # logits leave in fp32 for the losses
  scale = float(jnp.std(out32))
  np.testing.assert_allclose(out16, out32, atol=0.05 * scale)
  assert not np.allclose(out16, out32, atol=1e-6 * scale)  # bf16 arithmetic really happened
  g32 = nnx.grad(loss)(f32, x)
  g16 = nnx.grad(loss)(bf16, x)
  a_all, b_all = jax.tree.leaves(nnx.state(g32, nnx.Param)), jax.tree.leaves(nnx.state(g16, nnx.Param))
  for a, b in zip(a_all, b_all):
    assert b.dtype == jnp.float32  # fp32 parameters, fp32 gradients
    # Per tensor up to ~8 % here: bf16 rounding grows through train-mode batch norm on a batch of 4.
    assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a)) < 0.15
  flat = lambda ls: jnp.concatenate([l.ravel() for l in ls])
  assert float(jnp.linalg.norm(flat(a_all) - flat(b_all)) / jnp.linalg.norm(flat(a_all))) < 0.05  # 0.021
  bf16.eval()  # running statistics: the traced call mutates nothing
  convs = re.findall(r'(\w+)\[[^\]]*\] = conv_general_dilated', str(jax.make_jaxpr(lambda v: bf16(v))(x)))
  assert convs == ['bf16'] * 4, convs
