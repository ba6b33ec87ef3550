"""PatchGAN batch statistics per data-parallel replica, as the official DDP run with plain
BatchNorm2d computes them (one set of statistics per GPU), or over the global batch."""
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
