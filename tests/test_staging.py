"""The tokenizer step as three programs compiled side by side (`train_tokenizer.step_stages=3`,
hita_jax/staging.py): the same updates as the one program, on one device and (slow) on an 8-device
mesh, in fp32 and bf16, with nothing applied on a non-finite step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hita_jax import config_lib, sharding, staging
from hita_jax.tasks import train_tokenizer as tt
from tests.conftest import ROOT


def test_carry_passes_a_pullback_between_programs_without_the_producers_inputs():
  """A pullback whose residuals include the producer's own input: packed without it, rebuilt from
  the consumer's argument, which the consumer donates (a buffer passed twice would be refused)."""
  carry = staging.Carry()

  def forward(w, x):
    y, pullback = jax.vjp(lambda w: jnp.sum(jnp.tanh(x @ w) * w[0]), w)
    return y, carry.pack(pullback, (w, x))

  def backward(w, x, packed):
    pullback = carry.unpack(packed, (w, x))
    g, = pullback(jnp.ones(()))
    return w - 0.1 * g

  w = jnp.arange(12.0).reshape(4, 3) / 10
  x = jnp.ones((2, 4))
  y, packed = jax.jit(forward)(w, x)
  assert len(packed) < len(jax.tree.leaves(jax.vjp(lambda w: jnp.sum(jnp.tanh(x @ w) * w[0]), w)[1]))
  want = w - 0.1 * jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w) * w[0]))(w)
  got = jax.jit(backward, donate_argnums=(0,))(w.copy(), x, packed)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)
  with pytest.raises(RuntimeError, match='trace the producing program first'):
    staging.Carry().unpack([], ())


def test_leading_axis_shardings_split_only_batch_leading_arrays():
  mesh = sharding.make_mesh([('data', 8)])
  batch_sh = sharding.batch_sharding(mesh, [('batch', ('data',))], 4)
  tree = {'act': jax.ShapeDtypeStruct((16, 5, 5, 8), jnp.float32),
          'w': jax.ShapeDtypeStruct((8, 8), jnp.float32), 's': jax.ShapeDtypeStruct((), jnp.float32),
          'odd': jax.ShapeDtypeStruct((16, 3), jnp.float32)}
  got = staging.leading_axis_shardings(tree, batch_sh, 16)
  assert got['act'].spec == jax.sharding.PartitionSpec(('data',), None, None, None)
  assert got['odd'].spec == jax.sharding.PartitionSpec(('data',), None)
  assert got['w'].spec == jax.sharding.PartitionSpec() and got['s'].spec == jax.sharding.PartitionSpec()
  assert staging.leading_axis_shardings(tree, batch_sh, 12)['act'].spec == jax.sharding.PartitionSpec()


def test_compile_all_compiles_each_program_from_threads():
  lowered = [jax.jit(lambda x, k=k: jnp.sin(x) * k).lower(jnp.ones(3)) for k in range(3)]
  exes, timing = staging.compile_all(lowered)
  assert [float(e(jnp.zeros(3) + 1)[0]) for e in exes] == pytest.approx([np.sin(1.0) * k for k in range(3)])
  assert len(timing['compile_each_s']) == 3 and timing['compile_wall_s'] > 0


def _config(dtype='float32', **loss):
  config = config_lib.load_config(f'{ROOT}/configs/tokenizer_v.py:tiny')
  config.tokenizer_loss.lpips_weights = 'random'
  config.tokenizer_loss.disc_start = 0
  config.train_tokenizer.global_batch_size = 8
  config.train_tokenizer.warmup_steps = 0
  config.train_tokenizer.adam_eps = 1e-3  # see test_tokenizer_sharding.py: a smooth first update
  config.train_tokenizer.compute_dtype = dtype
  config.tokenizer_loss.disc_batch_norm = 'global'
  for k, v in loss.items():
    config.tokenizer_loss[k] = v
  return config


def _run(config, mesh, stages, steps=2, images=None, first=None):
  """`steps` steps from a fresh build: each step's metrics and the final state (host copies); with
  a `first` dict, the state after the first step is put in it too."""
  config.train_tokenizer.step_stages = stages
  parts, state, frozen, _ = tt.build(config, mesh)
  rules = config_lib.axis_rules(config)
  size = config.tokenizer.image_size
  step = tt.make_train_step(parts, config)
  assert isinstance(step, tt.StagedTrainStep) == (stages == 3)
  out = []
  for i in range(steps):
    x = images[i] if images is not None else np.random.RandomState(i).randint(0, 256, (8, size, size, 3))
    batch = {'image': jax.device_put(np.asarray(x, np.uint8), sharding.batch_sharding(mesh, rules, 4))}
    state, metrics = step(state, frozen, batch, jax.random.key(0))
    out.append(jax.device_get(metrics))
    if i == 0 and first is not None:
      first.update(jax.device_get({k: state[k] for k in ('g_params', 'd_params')}))
  return out, jax.device_get(state), step


def _assert_same(ref, got, rel=1e-5, atol=1e-5):
  (m1, s1), (m3, s3) = ref, got
  for a, b in zip(m1, m3):
    assert set(a) == set(b)
    for k in a:
      r = 1e-4 if k.endswith('grad_norm') else rel
      assert float(b[k]) == pytest.approx(float(a[k]), rel=r, abs=1e-6), k
  for key in ('g_params', 'd_params', 'ema', 'opt_g', 'opt_d', 'd_stats'):
    for a, b in zip(jax.tree.leaves(s1[key]), jax.tree.leaves(s3[key])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=atol, err_msg=key)
  assert int(s1['step']) == int(s3['step'])


def test_three_programs_update_as_the_one_program_in_fp32_and_follow_it_in_bf16(quick_compile):
  """fp32: the staged step against the one program, two steps (the second from the first's state,
  with the discriminator on), on one device. bf16 compute (the GPU recipe) through the staged step
  against that fp32 one program's first step: the losses within bf16's resolution; the gradient
  norms (what the pullback carried between the programs) as fp32's and as the one bf16 program's;
  the updated parameters no further from fp32's than the one bf16 program's are. (One test: the
  fp32 one-program run is both halves' reference, built and compiled once.)"""
  one = lambda: sharding.make_mesh([('data', 1)], jax.devices()[:1])
  s32 = {}
  m1, s1, _ = _run(_config('float32'), one(), 1, first=s32)
  m3, s3, step = _run(_config('float32'), one(), 3)
  _assert_same((m1, s1), (m3, s3))
  assert len(step.timing['compile_each_s']) == 3

  m32 = m1
  s16, s16_one = {}, {}
  m16, _, _ = _run(_config('bfloat16'), one(), 3, steps=1, first=s16)
  m16_one, _, _ = _run(_config('bfloat16'), one(), 1, steps=1, first=s16_one)
  for k in ('g_loss', 'rec_loss', 'perceptual_loss', 'd_loss', 'vq_loss'):
    assert float(m16[0][k]) == pytest.approx(float(m32[0][k]), rel=3e-2, abs=1e-3), k
  # the gradients the pullback carried between programs: their norms as fp32's, and the staged
  # bf16 update as the one bf16 program's (only the programs' boundaries differ)
  for k in ('g_grad_norm', 'd_grad_norm'):
    assert float(m16[0][k]) == pytest.approx(float(m32[0][k]), rel=5e-2), k
    assert float(m16[0][k]) == pytest.approx(float(m16_one[0][k]), rel=1e-2), k
  for key in ('g_params', 'd_params'):
    gap = lambda s1, s2: max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                             for a, b in zip(jax.tree.leaves(s1[key]), jax.tree.leaves(s2[key])))
    # one Adam step moves a parameter by about the learning rate whichever program computed it;
    # the staged bf16 update is no further from fp32's than the one bf16 program's is
    assert gap(s16, s32) <= 1.5 * gap(s16_one, s32) + 1e-6, (key, gap(s16, s32), gap(s16_one, s32))
  assert int(m16[0]['nonfinite']) == 0
  assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(s16['g_params']))


@pytest.mark.slow  # ~30 s: the staged step's three programs partitioned over 8 devices
def test_three_programs_on_8_devices_update_as_the_one_program_on_1(quick_compile):
  """Data-parallel over 8: the later programs are lowered before the earlier ones run, from
  `leading_axis_shardings`; the same updates as the one program on one device."""
  config = _config()
  m1, s1, _ = _run(config, sharding.make_mesh([('data', 1)], jax.devices()[:1]), 1)
  m8, s8, _ = _run(config, sharding.make_mesh('data=-1,fsdp=1'), 3)
  _assert_same((m1, s1), (m8, s8))


def test_three_programs_apply_nothing_on_a_non_finite_step(quick_compile, monkeypatch):
  """A NaN loss (made for an all-black batch, as in test_nonfinite.py): the staged step keeps G, D,
  the statistics and both Adam states as they were, bit for bit, and only advances the step."""
  from hita_jax.models import losses
  real = losses.reconstruction_loss
  monkeypatch.setattr(losses, 'reconstruction_loss',
                      lambda x, recon: jnp.where(jnp.all(x == -1.0), jnp.nan, real(x, recon)))
  config = _config()
  config.train_tokenizer.step_stages = 3
  parts, state, frozen, _ = tt.build(config, sharding.make_mesh([('data', 1)], jax.devices()[:1]))
  before = jax.device_get({k: v for k, v in state.items() if k != 'g_rest'})
  step = tt.make_train_step(parts, config)
  size = config.tokenizer.image_size
  new, metrics = step(state, frozen, {'image': jnp.zeros((8, size, size, 3), jnp.uint8)}, jax.random.key(0))
  assert int(metrics['nonfinite']) == 1 and int(new['step']) == 1
  after = jax.device_get(new)
  for k in ('g_params', 'd_params', 'd_stats', 'opt_g', 'opt_d'):
    for a, b in zip(jax.tree.leaves(before[k]), jax.tree.leaves(after[k])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=k)


def test_step_stages_is_checked():
  from hita_jax.errors import UserError
  config = _config()
  config.train_tokenizer.step_stages = 2
  with pytest.raises(UserError, match='step_stages'):
    tt.validate(config)
