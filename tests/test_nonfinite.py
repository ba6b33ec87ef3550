"""NaN/Inf guard: a step whose loss or gradient norm is not finite is not applied, counted, and
N of them in a row stop the run naming the metric and the step; checkpoints stay finite."""
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from hita_jax import errors, training
from hita_jax.models.gpt import GPT
from hita_jax.tasks import train_ar
from tests.conftest import ROOT
from tests.faults_utils import ar_config, write_codes_dir


@pytest.fixture(autouse=True)
def _fast_compile():
  """XLA's cheapest compile (as the subprocess tests' JAX_DISABLE_MOST_OPTIMIZATIONS)."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', old)


def _poison_steps(monkeypatch, steps, poison):
  """The batch of each step in `steps` goes through `poison` (steps counted from 1 in this run)."""
  real, calls = training.global_batch, [0]

  def global_batch(local, shardings):
    calls[0] += 1
    if calls[0] in steps:
      local = poison(dict(local))
    return real(local, shardings)
  monkeypatch.setattr(training, 'global_batch', global_batch)


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r for r in map(json.loads, f)}


def _checkpoint_leaves(workdir, step):
  tree = ocp.StandardCheckpointer().restore(os.path.join(workdir, 'checkpoints', str(step), 'state'))
  return [np.asarray(x) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


@pytest.fixture
def nan_gpt(monkeypatch):
  """GPT.loss is NaN for a batch whose labels are all the null class (the poison below)."""
  real = GPT.loss

  def loss(self, labels, hol, patch, *, rng=None):
    lh, lp = real(self, labels, hol, patch, rng=rng)
    bad = jnp.all(labels == self.cfg.num_classes)
    return jnp.where(bad, jnp.nan, lh), lp
  monkeypatch.setattr(GPT, 'loss', loss)


@pytest.mark.slow  # a whole (tiny) run, ~40 s on a loaded 2-core machine; the unit test below stays default
def test_ar_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch, nan_gpt):
  config = ar_config(write_codes_dir(tmp_path / 'codes', ar_config('')), steps=12, max_nonfinite_steps=3)
  null = config.gpt.num_classes
  # step 2 alone is skipped; 4, 5, 6 in a row stop the run at 6
  _poison_steps(monkeypatch, {2, 4, 5, 6}, lambda b: {**b, 'label': np.full_like(b['label'], null)})
  w = str(tmp_path / 'run')
  with pytest.raises(errors.NonFiniteError, match=r'loss not finite for 3 steps in a row, the last at step 6'):
    train_ar.run(config, w)
  m = _metrics(w)
  assert sorted(m) == [1, 2, 3, 4, 5]  # step 6 raised before it was written
  assert 'loss' not in m[2] and m[2]['nonfinite_steps'] == 1
  assert np.isfinite(m[3]['loss']) and m[3]['nonfinite_steps'] == 1
  assert m[5]['nonfinite_steps'] == 3
  # the checkpoint at step 4 (a skipped step) holds the finite state of step 3
  leaves = _checkpoint_leaves(w, 4)
  assert leaves and all(np.all(np.isfinite(x)) for x in leaves)
  assert not os.path.exists(os.path.join(w, 'checkpoints', '8'))


def test_ar_skipped_step_leaves_params_optimizer_and_ema_unchanged(tmp_path, nan_gpt):
  from hita_jax import config_lib, sharding
  config = ar_config('synthetic')
  mesh = sharding.make_mesh(config_lib.mesh_spec(config, jax.device_count()))
  parts, state, _ = train_ar.build(config, mesh)
  before = jax.device_get(state)
  step = jax.jit(lambda s, b, r: train_ar.train_step(parts, config, s, None, b, r))
  n, g = 8, config.gpt
  batch = {'label': jnp.full((n,), g.num_classes, jnp.int32),
           'holistic_codes': jnp.zeros((n, g.num_holistic), jnp.int32),
           'patch_codes': jnp.zeros((n, g.grid ** 2), jnp.int32)}
  new, metrics = step(state, batch, jax.random.key(0))
  assert int(metrics['nonfinite']) == 1 and int(new['step']) == 1
  after = jax.device_get(new)
  for k in ('params', 'opt', 'ema'):
    for a, b in zip(jax.tree.leaves(before[k]), jax.tree.leaves(after[k])):
      np.testing.assert_array_equal(a, b)
  new, metrics = step(new, {**batch, 'label': jnp.zeros((n,), jnp.int32)}, jax.random.key(0))
  assert int(metrics['nonfinite']) == 0 and int(new['step']) == 2  # a finite batch is applied
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after['params']),
                                                       jax.tree.leaves(jax.device_get(new['params']))))


@pytest.mark.slow  # a tokenizer compile: ~2.5 min of CPU on a loaded 2-core machine
def test_tokenizer_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path):
  """In a one-device subprocess (this process has 8 CPU devices, whose compile is ~5x slower):
  tests/nonfinite_driver.py poisons steps 2, 4 and 5 with max_nonfinite_steps=2."""
  w = str(tmp_path / 'run')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(JAX_PLATFORMS='cpu', JAX_DISABLE_MOST_OPTIMIZATIONS='1')
  r = subprocess.run([sys.executable, '-m', 'tests.nonfinite_driver', w], cwd=ROOT, env=env,
                     capture_output=True, text=True)
  assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-3000:]
  assert re.search(r'g_loss.* not finite for 2 steps in a row, the last at step 5', r.stdout), r.stdout
  m = _metrics(w)
  assert sorted(m) == [1, 2, 3, 4]
  assert 'g_loss' not in m[2] and np.isfinite(m[3]['g_loss']) and m[4]['nonfinite_steps'] == 2
  leaves = _checkpoint_leaves(w, 4)
  assert leaves and all(np.all(np.isfinite(x)) for x in leaves)


def test_keep_if_finite_selects_per_array_without_a_conditional():
  """Old or new state per array (PRNG keys too), step always advanced; a select per array, so
  XLA's program has no conditional (whose outputs it filled by copying the whole new state)."""
  from hita_jax import training
  old = {'step': jnp.int32(3), 'w': jnp.zeros((4, 2)), 'n': jnp.int32(7), 'key': jax.random.key(0)}
  new = {'step': jnp.int32(4), 'w': jnp.ones((4, 2)), 'n': jnp.int32(8), 'key': jax.random.key(1)}
  fn = jax.jit(lambda o, n, loss: training.keep_if_finite(o, n, {'loss': loss}, ('loss',)))
  for loss, want, flag in ((1.0, new, 0), (float('nan'), old, 1)):
    state, m = fn(old, new, jnp.float32(loss))
    assert int(state['step']) == 4 and int(m['nonfinite']) == flag
    np.testing.assert_array_equal(state['w'], want['w'])
    assert int(state['n']) == int(want['n'])
    np.testing.assert_array_equal(jax.random.key_data(state['key']), jax.random.key_data(want['key']))
  hlo = fn.lower(old, new, jnp.float32(1.0)).compile().as_text()
  assert not re.search(r' conditional\(', hlo)  # the op (the test's own name is in the metadata)
  with pytest.raises(TypeError):  # a state array whose dtype changed is an error, as with the cond
    training.keep_if_finite(old, {**new, 'w': new['w'].astype(jnp.bfloat16)}, {'loss': 1.0}, ('loss',))


@pytest.mark.slow  # two tiny tokenizer builds and compiles (~65 s on the 2-core machine)
def test_tokenizer_skipped_step_leaves_everything_unchanged(monkeypatch):
  """A tokenizer step with a NaN loss leaves G, D, both Adam states, the EMA and the statistics as
  they were, in both optimizer layouts (flat: the update is zeroed and the EMA weights become
  (1, 0) instead of a select per tensor); the next finite step moves the parameters and the EMA,
  the same in both layouts."""
  from hita_jax.models import losses
  real = losses.reconstruction_loss

  def rec(x, recon):  # NaN for an all-black batch (uint8 0 -> -1)
    return jnp.where(jnp.all(x == -1.0), jnp.nan, real(x, recon))
  monkeypatch.setattr(losses, 'reconstruction_loss', rec)
  results = {layout: _tokenizer_skip_then_step(layout) for layout in ('flat', 'per_leaf')}
  # the same arithmetic in both layouts, up to the summation order of the norms
  for a, b in zip(results['flat'], results['per_leaf']):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _tokenizer_skip_then_step(layout):
  from hita_jax import config_lib, sharding
  from hita_jax.tasks import train_tokenizer as tt
  config = config_lib.load_config(f'{ROOT}/configs/tokenizer_v.py:tiny')
  config.tokenizer_loss.lpips_weights = 'random'
  config.tokenizer_loss.disc_start = 0
  config.train_tokenizer.optimizer_layout = layout
  parts, state, frozen, _ = tt.build(config, sharding.make_mesh([('data', 1)], jax.devices()[:1]))
  assert parts.flat_optimizer == parts.flat_ema == (layout == 'flat')
  assert (state['ema'].ndim == 1) if layout == 'flat' else isinstance(state['ema'], nnx.State)
  plain = lambda x: (jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
  host = lambda tree: jax.device_get(jax.tree.map(plain, tree))
  before = host(state)
  step = jax.jit(lambda s, b, r: tt.train_step(parts, config, s, frozen, b, r))
  size = config.tokenizer.image_size
  black = {'image': jnp.zeros((2, size, size, 3), jnp.uint8)}
  new, metrics = step(state, black, jax.random.key(0))
  assert int(metrics['nonfinite']) == 1 and int(new['step']) == 1
  after = host(new)
  for k in before:
    if k == 'step':
      continue
    for a, b in zip(jax.tree.leaves(before[k]), jax.tree.leaves(after[k])):
      a, b = np.asarray(a), np.asarray(b)
      if k != 'ema' and a.dtype == np.float32:  # bit for bit, signed zeros included
        a, b = a.view(np.uint32), b.view(np.uint32)
      np.testing.assert_array_equal(a, b, err_msg=k)  # the EMA: a -0.0 may come back +0.0
  images = {'image': jnp.asarray(np.random.RandomState(1).randint(0, 256, (2, size, size, 3)), jnp.uint8)}
  new, metrics = step(new, images, jax.random.key(0))
  assert int(metrics['nonfinite']) == 0 and np.isfinite(float(metrics['g_loss']))
  moved = host(new)
  for k in ('g_params', 'd_params', 'ema'):
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after[k]), jax.tree.leaves(moved[k]))), k
  # the EMA as the export sees it: a tree in both layouts
  return jax.tree.leaves(moved['g_params']) + jax.tree.leaves(host(tt.ema_params(parts, new)))


def test_optimizer_layout_auto_is_flat_only_for_replicated_parameters():
  from jax.sharding import NamedSharding, PartitionSpec as P
  from hita_jax.tasks.train_tokenizer import optimizer_is_flat
  mesh = jax.make_mesh((8,), ('fsdp',))
  rep = {'w': jax.device_put(jnp.zeros((8, 4)), NamedSharding(mesh, P()))}
  shard = {'w': jax.device_put(jnp.zeros((8, 4)), NamedSharding(mesh, P('fsdp')))}
  assert optimizer_is_flat('auto', rep) and not optimizer_is_flat('auto', shard)
  assert optimizer_is_flat('flat', shard) and not optimizer_is_flat('per_leaf', rep)
