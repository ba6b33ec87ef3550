"""Mesh construction, logical axis rules, and a sharded tokenizer forward on 8 CPU devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from hita_jax import sharding
from hita_jax.models.tokenizer import Tokenizer
from tests.utils import param_leaves, random_images, tiny_tokenizer_config

RULES = sharding.DEFAULT_RULES


def fraction_sharded(state: nnx.State) -> float:
  """Fraction of parameter elements that are split over at least one mesh axis (MaxText check)."""
  total = sharded = 0
  for x in jax.tree.leaves(state):
    total += x.size
    if hasattr(x, 'sharding') and not x.sharding.is_fully_replicated:
      sharded += x.size
  return sharded / max(total, 1)


def test_eight_devices():
  assert jax.device_count() == 8


def test_make_mesh_fill_and_errors():
  mesh = sharding.make_mesh([('data', -1), ('fsdp', 2), ('tensor', 2)])
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  with pytest.raises(ValueError, match='needs 16 devices'):
    sharding.make_mesh([('data', 4), ('fsdp', 4)])
  with pytest.raises(ValueError, match='at most one'):
    sharding.make_mesh([('data', -1), ('fsdp', -1)])


def test_logical_to_spec_respects_divisibility_and_reuse():
  mesh = sharding.make_mesh([('data', 2), ('fsdp', 2), ('tensor', 2)])
  assert sharding.logical_to_spec(('embed', 'mlp'), (64, 128), mesh, RULES) == P('fsdp', 'tensor')
  assert sharding.logical_to_spec(('embed', 'mlp'), (63, 128), mesh, RULES) == P(None, 'tensor')
  assert sharding.logical_to_spec(('embed', 'embed'), (64, 64), mesh, RULES) == P('fsdp', None)
  assert sharding.logical_to_spec(('batch', None), (8, 3), mesh, RULES) == P(('data', 'fsdp'), None)
  assert sharding.logical_to_spec(('batch', None), (2, 3), mesh, RULES) == P('data', None)
  assert sharding.logical_to_spec(None, (5,), mesh, RULES) == P()


def _forward(model):
  graphdef, state = nnx.split(model)

  @jax.jit
  def fwd(state, x):
    m = nnx.merge(graphdef, state, copy=True)
    hol, patch = m.encode(x)
    return hol, patch, m.decode(hol, patch)
  return fwd, state


def test_sharded_forward_equals_single_device():
  cfg = tiny_tokenizer_config('U')
  x = random_images(b=8, seed=4)
  ref_model = Tokenizer(cfg, rngs=nnx.Rngs(0))
  ref_model.eval()
  fwd, state = _forward(ref_model)
  ref = fwd(state, jnp.asarray(x))

  mesh = sharding.make_mesh([('data', 2), ('fsdp', 2), ('tensor', 2)])
  model = sharding.create_sharded(lambda: Tokenizer(cfg, rngs=nnx.Rngs(0)), mesh, RULES)
  model.eval()
  # params are born sharded, with the values of the single-device init (up to jit rounding)
  for a, b in zip(param_leaves(ref_model), param_leaves(model)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  # compare the forward on exactly the same values: reshard the reference state onto the mesh
  state = nnx.state(ref_model)
  nnx.update(model, jax.device_put(state, sharding.state_shardings(state, mesh, RULES)))
  kernel = model.holistic_encoder.e_causal.layers[0].ffn.w12.kernel[...]
  assert kernel.sharding.spec == P('fsdp', 'tensor')
  assert fraction_sharded(nnx.state(model, nnx.Param)) > 0.5
  fwd, state = _forward(model)
  xs = jax.device_put(x, sharding.batch_sharding(mesh, RULES, 4))
  got = fwd(state, xs)
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(ref[0]))
  np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(ref[1]))
  np.testing.assert_allclose(np.asarray(got[2]), np.asarray(ref[2]), atol=1e-5, rtol=1e-5)


def test_cheap_tracer_probes_skip_the_jaxpr_walk_and_restore_jax(monkeypatch):
  """flax probes `getattr(tracer, 'sharding', None)` on every variable update; JAX's property
  builds its error message by walking the jaxpr (find_progenitors) before `__getattr__` answers
  the same AttributeError. Inside the context the probe still gives None but walks nothing;
  after it JAX's own property is back; models built through create_sharded equal an eager build."""
  from jax._src import core as jax_core
  from jax._src.interpreters import partial_eval as pe
  original = jax_core.Tracer.__dict__['sharding']
  walks = []
  real = pe.JaxprStackFrame.find_progenitors
  monkeypatch.setattr(pe.JaxprStackFrame, 'find_progenitors',
                      lambda self, t: walks.append(1) or real(self, t))
  seen = {}

  def f(x):
    y = x * 2
    with sharding.cheap_tracer_probes():
      seen['inside'] = (getattr(y, 'sharding', None), len(walks))
    seen['outside'] = (getattr(y, 'sharding', None), len(walks))
    return y

  jax.jit(f)(jnp.ones(3))
  assert seen['inside'] == (None, 0)
  assert seen['outside'] == (None, 1)  # JAX's own property walked the jaxpr once
  assert jax_core.Tracer.__dict__['sharding'] is original

  mesh = sharding.make_mesh([('data', -1)])
  cfg = tiny_tokenizer_config()
  built = sharding.create_sharded(lambda: Tokenizer(cfg, rngs=nnx.Rngs(0)), mesh, sharding.DEFAULT_RULES)
  eager = Tokenizer(cfg, rngs=nnx.Rngs(0))
  for a, b in zip(param_leaves(built), param_leaves(eager)):  # jitted vs eager init: last bits
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
