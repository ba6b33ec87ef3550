"""The fused GroupNorm (+ swish) op of the tokenizer's CNN: values and gradients equal to
flax's GroupNorm (two-pass variance) followed by swish, in fp32 and bf16, with a VJP that makes
fewer passes over the activations than autodiff of the reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hita_jax.models import layers
from hita_jax.models.layers import GroupNorm, group_norm

SPELLINGS = [s for s in layers.SPATIAL_SUMS if s != 'auto']


def _reference(x, scale, bias, groups, eps, swish):
  ref = nnx.GroupNorm(x.shape[-1], num_groups=groups, epsilon=eps, use_fast_variance=False,
                      dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  ref.scale[...], ref.bias[...] = scale, bias
  y = ref(x.astype(jnp.float32))
  if swish:
    y = y * jax.nn.sigmoid(y)
  return y.astype(x.dtype)


def _inputs(shape, dtype, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  c = shape[-1]
  # An offset and a spread per channel, so the mean and the two-pass variance both matter.
  x = (3.0 + 2.0 * jax.random.normal(k[0], shape) * jax.random.uniform(k[1], (c,), minval=0.2))
  scale = 1.0 + 0.5 * jax.random.normal(k[2], (c,))
  bias = 0.3 * jax.random.normal(k[3], (c,))
  return x.astype(dtype), scale, bias


@pytest.mark.parametrize('swish', [False, True])
@pytest.mark.parametrize('shape,groups', [((2, 6, 5, 32), 8), ((3, 4, 4, 64), 32), ((2, 7, 16), 4)])
def test_fp32_values_and_gradients_match_flax_then_swish(shape, groups, swish):
  x, scale, bias = _inputs(shape, jnp.float32)
  w = jax.random.normal(jax.random.key(9), shape)
  ours = lambda x, s, b: group_norm(x, s, b, groups, 1e-6, swish)
  ref = lambda x, s, b: _reference(x, s, b, groups, 1e-6, swish)
  np.testing.assert_allclose(ours(x, scale, bias), ref(x, scale, bias), rtol=1e-5, atol=1e-5)
  g_ours = jax.grad(lambda *a: jnp.sum(ours(*a) * w), argnums=(0, 1, 2))(x, scale, bias)
  g_ref = jax.grad(lambda *a: jnp.sum(ref(*a) * w), argnums=(0, 1, 2))(x, scale, bias)
  for name, a, b in zip(('dx', 'dscale', 'dbias'), g_ours, g_ref):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4, err_msg=name)


@pytest.mark.parametrize('swish', [False, True])
def test_bf16_matches_fp32_within_bf16_rounding(swish):
  """bf16 in and out (statistics and swish in fp32): values and gradients within bf16 error of
  the fp32 op on the same (bf16-representable) inputs; dscale/dbias stay fp32. This checks the
  rounding only (a wrong rule would be wrong on both sides): the fp32 test above checks the
  gradients against flax."""
  shape, groups = (2, 8, 8, 64), 32
  x16, scale, bias = _inputs(shape, jnp.bfloat16, seed=3)
  x32 = x16.astype(jnp.float32)
  w = jax.random.normal(jax.random.key(5), shape)
  f = lambda x, s, b: group_norm(x, s, b, groups, 1e-6, swish)
  y16, y32 = f(x16, scale, bias), f(x32, scale, bias)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(y16.astype(jnp.float32), y32, rtol=1e-2, atol=1e-2)
  # The output is rounded once: exactly the fp32 result rounded to bf16.
  np.testing.assert_array_equal(y16, y32.astype(jnp.bfloat16))
  loss = lambda x, s, b: jnp.sum(f(x, s, b).astype(jnp.float32) * w)
  g16 = jax.grad(loss, argnums=(0, 1, 2))(x16, scale, bias)
  g32 = jax.grad(loss, argnums=(0, 1, 2))(x32, scale, bias)
  assert g16[0].dtype == jnp.bfloat16 and g16[1].dtype == g16[2].dtype == jnp.float32
  for name, a, b in zip(('dx', 'dscale', 'dbias'), g16, g32):
    b = np.asarray(b)
    np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=2e-2,
                               atol=2e-2 * float(np.abs(b).max()), err_msg=name)


def test_module_keeps_the_parameter_paths_and_matches_the_function():
  norm = GroupNorm(32, groups=8, rngs=nnx.Rngs(0))
  params = nnx.state(norm, nnx.Param)
  assert sorted('/'.join(map(str, p)) for p, _ in nnx.to_flat_state(params)) == [
      'norm/bias', 'norm/scale']
  x, _, _ = _inputs((2, 4, 4, 32), jnp.float32)
  np.testing.assert_allclose(norm(x, swish=True),
                             group_norm(x, norm.norm.scale[...], norm.norm.bias[...], 8, 1e-6, True))


def test_gradients_under_jit_remat_and_vmap_equal_eager():
  x, scale, bias = _inputs((3, 4, 5, 16), jnp.float32, seed=7)
  w = jax.random.normal(jax.random.key(2), x.shape)
  loss = lambda x, s, b: jnp.sum(group_norm(x, s, b, 4, 1e-6, True) * w)
  eager = jax.grad(loss, argnums=(0, 1, 2))(x, scale, bias)
  remat = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2)))(x, scale, bias)
  for a, b in zip(remat, eager):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # per example: each row normalised on its own, so vmap over rows equals the batched op
  per_row = jax.vmap(lambda xi, wi: jax.grad(lambda xi: jnp.sum(
      group_norm(xi[None], scale, bias, 4, 1e-6, True)[0] * wi))(xi))(x, w)
  np.testing.assert_allclose(per_row, eager[0], rtol=1e-5, atol=1e-5)


def _bytes_accessed(fn, x):
  """XLA's estimate of the bytes the compiled gradient program reads and writes, in units of x."""
  loss = lambda x: jnp.sum(fn(x).astype(jnp.float32) * x.astype(jnp.float32))
  cost = jax.jit(jax.grad(loss)).lower(x).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost['bytes accessed'] / x.nbytes


def test_gradient_program_moves_fewer_bytes_than_autodiff_of_the_reference():
  """GN -> swish forward and backward at a CNN-like size: the reference's autodiff moves ~42x the
  activation's bytes on the CPU backend, the fused op ~26x (2026-12-05)."""
  x, scale, bias = _inputs((4, 64, 64, 128), jnp.bfloat16)
  ours = _bytes_accessed(lambda x: group_norm(x, scale, bias, 32, 1e-6, True), x)
  ref = _bytes_accessed(lambda x: _reference(x, scale, bias, 32, 1e-6, True), x)
  assert ours < 0.75 * ref, (ours, ref)


def test_cnn_bench_times_programs_that_compute_the_same_gradients():
  """`bench cnn_train` (the GPU A/B of this op: as shipped, without the conv-bias fold, flax's
  GroupNorm then swish, the recomputing backward, the other sum spellings) at a small image in
  fp32: every variant compiled and timed, the same loss and gradients (in bf16 they differ by
  rounding, ~2 %). A two-level CNN with one ResnetBlock a level: every kind of block the official
  depth has, in an eighth of the compile time."""
  from hita_jax.tools import bench
  res = bench.bench_cnn_train(1, image_size=32, iters=1, dtype=jnp.float32, ch=32, rounds=1,
                              ch_mult=(1, 2), enc_blocks=1, dec_blocks=1)
  others = [k[:-len('_step_s')] for k in res if k.endswith('_step_s') and k != 'fused_step_s']
  sums = {f'sum_{s}' for s in SPELLINGS if s != layers._spelling()}  # the default's is 'fused'
  assert set(others) == {'nofold', 'flax', 'recompute', 'bias_sums', 'gemm_1x1'} | sums, others
  for other in others:
    assert res['fused_step_s'] > 0 and res[f'{other}_step_s'] > 0
    assert res[f'loss_abs_diff_{other}'] < 1e-6, res
    assert res[f'grad_rel_diff_{other}'] < 1e-4, res


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_pre_bias_equals_adding_it_before_and_gives_its_gradient(dtype):
  """group_norm(x, ..., pre_bias=b) is the GroupNorm (+ swish) of x + b, and its VJP's gradient
  for b (from per-channel sums, not a pass over dx) is the per-channel sum of dx; in bf16 within
  rounding of the fp32 op."""
  shape, groups = (2, 6, 5, 32), 8
  x, scale, bias = _inputs(shape, dtype, seed=7)
  pre = 0.5 * jax.random.normal(jax.random.key(11), (shape[-1],))
  w = jax.random.normal(jax.random.key(12), shape)
  ours = lambda x, s, b, p: group_norm(x, s, b, groups, 1e-6, True, p)
  ref = lambda x, s, b, p: _reference(x.astype(jnp.float32) + p, s, b, groups, 1e-6, True)
  loss = lambda f: lambda *a: jnp.sum(f(*a).astype(jnp.float32) * w)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  x32 = x.astype(jnp.float32)
  np.testing.assert_allclose(np.asarray(ours(x, scale, bias, pre), np.float32),
                             ref(x32, scale, bias, pre), rtol=tol, atol=tol)
  g = jax.grad(loss(ours), argnums=(0, 1, 2, 3))(x, scale, bias, pre)
  g_ref = jax.grad(loss(ref), argnums=(0, 1, 2, 3))(x32, scale, bias, pre)
  assert g[3].dtype == pre.dtype and g[3].shape == pre.shape
  for name, a, b in zip(('dx', 'dscale', 'dbias', 'dpre_bias'), g, g_ref):
    b = np.asarray(b)
    np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=max(tol, 2e-4),
                               atol=max(tol, 2e-4) * float(np.abs(b).max()), err_msg=name)
  # The pre-bias gradient is the per-channel sum of dx (what the conv's bias gradient was).
  np.testing.assert_allclose(g[3], np.asarray(g[0], np.float32).sum((0, 1, 2)),
                             rtol=tol, atol=tol * float(np.abs(g[3]).max()))


def test_conv_without_bias_then_pre_bias_is_the_resnet_block_it_replaced():
  """The CNN's ResnetBlock (conv1's bias folded into norm2) equals conv1 with its bias, then
  GroupNorm + swish, in fp32: values and every parameter's gradient, paths unchanged."""
  from hita_jax.models.cnn import ResnetBlock
  from hita_jax.models.layers import conv_without_bias
  block = ResnetBlock(32, 64, groups=8, rngs=nnx.Rngs(3))
  for i, (_, v) in enumerate(nnx.to_flat_state(nnx.state(block, nnx.Param))):
    v.set_value(jax.random.normal(jax.random.key(i), v.get_value().shape) * 0.2)

  def unfolded(block, x):
    h = block.conv1(block.norm1(x, swish=True))
    h = block.conv2(block.norm2(h, swish=True))
    return block.nin_shortcut(x) + h

  x = jax.random.normal(jax.random.key(4), (2, 8, 8, 32))
  graph, params, rest = nnx.split(block, nnx.Param, ...)
  f = lambda p, fn: jnp.sum(jnp.sin(fn(nnx.merge(graph, p, rest), x)))
  np.testing.assert_allclose(block(x), unfolded(block, x), rtol=1e-5, atol=1e-5)
  g1 = jax.grad(f)(params, lambda b, x: b(x))
  g2 = jax.grad(f)(params, unfolded)
  flat1, flat2 = nnx.to_flat_state(g1), nnx.to_flat_state(g2)
  assert [p for p, _ in flat1] == [p for p, _ in flat2]
  for (p, a), (_, b) in zip(flat1, flat2):
    b = np.asarray(b.get_value())
    np.testing.assert_allclose(a.get_value(), b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()),
                               err_msg='/'.join(map(str, p)))
  with pytest.raises(ValueError, match='plain NHWC'):
    conv_without_bias(block.conv1, x[0])


def test_cnn_norm_impls_compute_the_same_function_with_the_same_parameters():
  """tokenizer.cnn_norm_impl ('fused' with the conv1-bias fold, 'fused_recompute' the same with the
  recomputing backward, 'fused_nofold', 'xla' = autodiff of the same formula) is an A/B switch (`tools/tok_ab`): the same parameter paths and draws, and in
  fp32 the same values and gradients for the encoder + decoder; a bad value is named."""
  from hita_jax.errors import UserError
  from hita_jax.models.cnn import CNNDecoder, CNNEncoder
  from hita_jax.models.tokenizer import Tokenizer, TokenizerConfig

  def build(impl):
    kw = dict(ch=16, ch_mult=(1, 2), z_channels=32, groups=4, norm_impl=impl, rngs=nnx.Rngs(5))
    return CNNEncoder(num_res_blocks=1, **kw), CNNDecoder(num_res_blocks=1, **kw)

  x = jax.random.uniform(jax.random.key(6), (2, 16, 16, 3), minval=-1, maxval=1)
  loss = lambda graph, rest: lambda p: jnp.sum(jnp.sin(3 * (lambda e, d: d(e(x)))(*nnx.merge(graph, p, rest))))
  results = {}
  for impl in layers.NORM_IMPLS:
    enc, dec = build(impl)
    # the switch reaches every norm, and the fold only under 'fused' and 'fused_recompute'
    norms = [mod for _, mod in nnx.iter_graph((enc, dec)) if isinstance(mod, GroupNorm)]
    assert norms and {n.impl for n in norms} == {impl}
    blocks = [mod for _, mod in nnx.iter_graph((enc, dec)) if type(mod).__name__ == 'ResnetBlock']
    assert {b.fold_conv1_bias for b in blocks} == {impl in ('fused', 'fused_recompute')}
    graph, params, rest = nnx.split((enc, dec), nnx.Param, ...)
    jaxpr = str(jax.make_jaxpr(loss(graph, rest))(params))
    assert ('custom_vjp_call' in jaxpr) == (impl != 'xla'), impl
    val, grads = jax.value_and_grad(loss(graph, rest))(params)
    results[impl] = (float(val), nnx.to_flat_state(params), nnx.to_flat_state(grads))
  val0, params0, grads0 = results['fused']
  for impl in ('fused_recompute', 'fused_nofold', 'xla'):
    val, params, grads = results[impl]
    assert [p for p, _ in params] == [p for p, _ in params0]
    for (_, a), (_, b) in zip(params, params0):
      np.testing.assert_array_equal(a.get_value(), b.get_value())
    np.testing.assert_allclose(val, val0, rtol=1e-5)
    # atol from the largest gradient: a leaf whose true gradient is 0 (the attention's key bias)
    # holds only rounding noise
    scale = max(float(np.abs(b.get_value()).max()) for _, b in grads0)
    for (p, a), (_, b) in zip(grads, grads0):
      np.testing.assert_allclose(a.get_value(), b.get_value(), rtol=1e-4, atol=1e-5 * scale,
                                 err_msg=f"{impl}: {'/'.join(map(str, p))}")
  with pytest.raises(UserError, match='cnn_norm_impl'):
    Tokenizer(TokenizerConfig(cnn_norm_impl='flax'), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='GroupNorm impl'):
    GroupNorm(8, groups=4, impl='fast', rngs=nnx.Rngs(0))


@pytest.mark.parametrize('backward', layers.GN_BACKWARDS)
@pytest.mark.parametrize('spelling', SPELLINGS)
@pytest.mark.parametrize('pre', [False, True])
@pytest.mark.parametrize('shape', [(2, 6, 5, 32), (3, 7, 32)])
def test_sum_spellings_and_backwards_match_flax_in_fp32(spelling, backward, pre, shape, monkeypatch):
  """Every spelling of the per-channel sums (layers.SPATIAL_SUM) and both backwards compute the
  reference's values and gradients in fp32, with and without a folded pre-bias, on images and
  on sequences (one spatial axis)."""
  monkeypatch.setattr(layers, 'SPATIAL_SUM', spelling)
  groups = 8
  x, scale, bias = _inputs(shape, jnp.float32, seed=13)
  p = 0.5 * jax.random.normal(jax.random.key(14), (shape[-1],)) if pre else jnp.zeros((shape[-1],))
  w = jax.random.normal(jax.random.key(15), shape)
  ours = lambda x, s, b, p: group_norm(x, s, b, groups, 1e-6, True, p if pre else None, backward)
  ref = lambda x, s, b, p: _reference(x + p, s, b, groups, 1e-6, True)
  np.testing.assert_allclose(ours(x, scale, bias, p), ref(x, scale, bias, p), rtol=1e-5, atol=1e-5)
  argnums = (0, 1, 2, 3) if pre else (0, 1, 2)
  g = jax.grad(lambda *a: jnp.sum(ours(*a) * w), argnums=argnums)(x, scale, bias, p)
  g_ref = jax.grad(lambda *a: jnp.sum(ref(*a) * w), argnums=argnums)(x, scale, bias, p)
  for name, a, b in zip(('dx', 'dscale', 'dbias', 'dpre_bias'), g, g_ref):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4 * float(np.abs(b).max()), err_msg=name)


@pytest.mark.parametrize('spelling,backward', [('split', 'shared'), ('split', 'recompute'),
                                               ('flat', 'recompute'), ('variadic', 'shared')])
def test_fast_paths_bf16_match_fp32_within_bf16_rounding(spelling, backward, monkeypatch):
  """The GPU spelling ('split', the 'auto' pick there) and the recomputing backward in bf16
  against the same op in fp32 (inputs bf16-representable): the output is the fp32 result rounded
  once; dx, dscale, dbias and the pre-bias gradient within bf16 error."""
  monkeypatch.setattr(layers, 'SPATIAL_SUM', spelling)
  shape, groups = (2, 8, 8, 64), 32
  x16, scale, bias = _inputs(shape, jnp.bfloat16, seed=21)
  x32 = x16.astype(jnp.float32)
  pre = 0.5 * jax.random.normal(jax.random.key(22), (shape[-1],))
  w = jax.random.normal(jax.random.key(23), shape)
  f = lambda x, s, b, p: group_norm(x, s, b, groups, 1e-6, True, p, backward)
  y16, y32 = f(x16, scale, bias, pre), f(x32, scale, bias, pre)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_array_equal(y16, y32.astype(jnp.bfloat16))
  loss = lambda x, s, b, p: jnp.sum(f(x, s, b, p).astype(jnp.float32) * w)
  g16 = jax.grad(loss, argnums=(0, 1, 2, 3))(x16, scale, bias, pre)
  g32 = jax.grad(loss, argnums=(0, 1, 2, 3))(x32, scale, bias, pre)
  assert g16[0].dtype == jnp.bfloat16 and all(g.dtype == jnp.float32 for g in g16[1:])
  for name, a, b in zip(('dx', 'dscale', 'dbias', 'dpre_bias'), g16, g32):
    b = np.asarray(b)
    np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=2e-2,
                               atol=2e-2 * float(np.abs(b).max()), err_msg=name)


def test_auto_spelling_is_split_on_gpu_and_flat_elsewhere(monkeypatch):
  monkeypatch.setattr(layers, 'SPATIAL_SUM', 'auto')
  assert layers._spelling() == ('split' if jax.default_backend() == 'gpu' else 'flat')
  for backend, want in (('gpu', 'split'), ('cpu', 'flat'), ('tpu', 'flat')):
    monkeypatch.setattr(jax, 'default_backend', lambda b=backend: b)
    assert layers._spelling() == want, backend


def test_bad_spelling_and_backward_are_named(monkeypatch):
  x, scale, bias = _inputs((1, 4, 4, 8), jnp.float32)
  with pytest.raises(ValueError, match='backward must be one of'):
    group_norm(x, scale, bias, 4, 1e-6, True, None, 'stored')
  with pytest.raises(ValueError, match='backward must be one of'):  # differentiated: the VJP's forward
    jax.grad(lambda x: jnp.sum(group_norm(x, scale, bias, 4, 1e-6, True, None, 'stored')))(x)
  monkeypatch.setattr(layers, 'SPATIAL_SUM', 'tree')
  with pytest.raises(ValueError, match='SPATIAL_SUM must be one of'):
    group_norm(x, scale, bias, 4, 1e-6, True)


def _full_size_reductions(backward, spelling, monkeypatch):
  """Reductions over a full-size (spatial) operand in the gradient's jaxpr, and whether an
  optimization barrier is there."""
  monkeypatch.setattr(layers, 'SPATIAL_SUM', spelling)
  x, scale, bias = _inputs((2, 8, 8, 32), jnp.float32)
  pre = jnp.ones((32,))
  loss = lambda x, p: jnp.sum(jnp.sin(group_norm(x, scale, bias, 8, 1e-6, True, p, backward)))
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, pre)
  found = []

  def walk(jp):
    for eqn in jp.eqns:
      if eqn.primitive.name in ('reduce_sum', 'reduce') and eqn.invars[0].aval.size >= x.size:
        found.append(eqn.primitive.name)
      for v in eqn.params.values():  # into the custom VJP's and pjit's inner jaxprs
        for j in (v if isinstance(v, (list, tuple)) else [v]):
          if hasattr(j, 'jaxpr') and hasattr(j.jaxpr, 'eqns'):
            walk(j.jaxpr)
          elif hasattr(j, 'eqns'):
            walk(j)
  walk(jaxpr.jaxpr)
  return len(found), 'optimization_barrier' in str(jaxpr)


def test_recompute_backward_has_one_full_size_reduction_fewer_and_cuts_the_sharing(monkeypatch):
  """Under the conv-bias fold the shared backward sums x-hat in a reduction of its own; the
  recomputing one takes those sums from the forward's sums of x (one full-size reduction fewer)
  and recomputes dy * swish'(y) behind an optimization barrier (nothing for XLA to write out)."""
  shared, shared_barrier = _full_size_reductions('shared', 'flat', monkeypatch)
  recompute, recompute_barrier = _full_size_reductions('recompute', 'flat', monkeypatch)
  # the loss's sum (1), the forward's mean and variance (2), the backward's sums of dy and
  # dy * x-hat (2), and of x-hat when shared (1)
  assert (shared, recompute) == (6, 5)
  assert recompute_barrier and not shared_barrier


def test_gn_sums_bench_times_every_spelling_and_backward_on_the_same_gradients():
  """`bench gn_sums` (the op alone per resolution, the GPU A/B of layers.SPATIAL_SUM and the
  backwards): every variant timed, bf16 gradients within rounding of the first variant's."""
  from hita_jax.tools import bench
  res = bench.bench_gn_sums(1, iters=1, rounds=1, shapes=[(12, 64)])
  row, = res['rows']
  variants = ['flat', 'split', 'variadic', 'flat+recompute', 'split+recompute']
  assert [k for k in row if isinstance(row[k], dict)] == variants
  for v in variants:
    assert row[v]['fwd_ms'] > 0 and row[v]['fwd_bwd_ms'] > 0 and row[v]['fwd_bwd_passes'] > 0
    assert row[v]['grad_max_rel_diff_vs_first'] < 2e-2, (v, row[v])


@pytest.mark.parametrize('spelling,backward', [('split', 'recompute'), ('split', 'shared')])
def test_barriers_under_jit_vmap_and_remat_equal_eager(spelling, backward, monkeypatch):
  """The optimization barriers of the 'split' sums and the recomputing backward under
  jit(vmap(grad(checkpoint))): per-image gradients equal the eager batched op's."""
  monkeypatch.setattr(layers, 'SPATIAL_SUM', spelling)
  x, scale, bias = _inputs((3, 4, 5, 16), jnp.float32, seed=31)
  pre = 0.3 * jax.random.normal(jax.random.key(32), (16,))
  w = jax.random.normal(jax.random.key(33), x.shape)
  f = lambda x, p: group_norm(x, scale, bias, 4, 1e-6, True, p, backward)
  eager = jax.grad(lambda x, p: jnp.sum(f(x, p) * w), argnums=(0, 1))(x, pre)
  per_image = jax.jit(jax.vmap(jax.grad(jax.checkpoint(
      lambda xi, wi, p: jnp.sum(f(xi[None], p)[0] * wi)), argnums=(0, 2)), in_axes=(0, 0, None)))(x, w, pre)
  np.testing.assert_allclose(per_image[0], eager[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(per_image[1].sum(0), eager[1], rtol=1e-4, atol=1e-4)


def test_cnn_with_the_gpu_spelling_computes_what_it_computes_on_cpu(monkeypatch):
  """The CNN encoder + decoder with the GPU's 'split' sums (layers.SPATIAL_SUM='auto' there),
  alone and with the convs' bias gradients as sums (layers.CONV_BIAS='sums'), equals the CPU's
  'flat' in fp32, values and gradients, through the fused op and through autodiff of the
  formula ('xla')."""
  from hita_jax.models.cnn import CNNDecoder, CNNEncoder
  x = jax.random.uniform(jax.random.key(8), (2, 16, 16, 3), minval=-1, maxval=1)
  for impl in ('fused', 'xla'):
    kw = dict(ch=16, ch_mult=(1, 2), z_channels=32, groups=4, norm_impl=impl, rngs=nnx.Rngs(5))
    graph, params, rest = nnx.split((CNNEncoder(num_res_blocks=1, **kw), CNNDecoder(num_res_blocks=1, **kw)),
                                    nnx.Param, ...)
    loss = lambda p: jnp.sum(jnp.sin(3 * (lambda e, d: d(e(x)))(*nnx.merge(graph, p, rest))))
    out = {}
    for spelling, bias in (('flat', 'xla'), ('split', 'xla'), ('split', 'sums')):
      monkeypatch.setattr(layers, 'SPATIAL_SUM', spelling)
      monkeypatch.setattr(layers, 'CONV_BIAS', bias)
      out[spelling, bias] = jax.jit(jax.value_and_grad(loss))(params)
    v0, g0 = out['flat', 'xla']
    scale = max(float(np.abs(b).max()) for b in jax.tree.leaves(g0))
    for key in (('split', 'xla'), ('split', 'sums')):
      v1, g1 = out[key]
      np.testing.assert_allclose(v1, v0, rtol=1e-5)
      for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale, err_msg=f'{impl} {key}')


@pytest.mark.parametrize('spelling', SPELLINGS)
def test_conv_bias_sums_equal_nnx_conv(spelling, monkeypatch):
  """layers.CONV_BIAS='sums' (the bias gradient as per-channel sums under a custom VJP): the same
  values and gradients as nnx.Conv in fp32 for a stride-1 SAME conv and a stride-2 VALID one;
  in bf16 the forward is bit-equal and the gradients within bf16 error of nnx.Conv's bf16 ones
  (against fp32: the next test and the whole CNN's)."""
  from hita_jax.models.layers import conv, conv_apply
  monkeypatch.setattr(layers, 'SPATIAL_SUM', spelling)
  for kw in (dict(), dict(stride=2, padding='VALID')):
    for dtype in (jnp.float32, jnp.bfloat16):
      m = conv(8, 16, 3, dtype=dtype, rngs=nnx.Rngs(1), **kw)
      m.bias[...] = 0.5 * jax.random.normal(jax.random.key(2), (16,))
      x = jax.random.normal(jax.random.key(3), (2, 9, 9, 8)).astype(dtype)
      graph, params = nnx.split(m, nnx.Param)
      w = jax.random.normal(jax.random.key(4), m(x).shape)
      out = {}
      for impl in ('xla', 'sums'):
        monkeypatch.setattr(layers, 'CONV_BIAS', impl)
        f = lambda p, x: jnp.sum(conv_apply(nnx.merge(graph, p), x).astype(jnp.float32) * w)
        out[impl] = (conv_apply(m, x), jax.grad(f, argnums=(0, 1))(params, x))
      (y0, (gp0, gx0)), (y1, (gp1, gx1)) = out['xla'], out['sums']
      np.testing.assert_array_equal(y1, y0)
      tol = 1e-5 if dtype == jnp.float32 else 2e-2
      np.testing.assert_allclose(np.asarray(gx1, np.float32), np.asarray(gx0, np.float32), rtol=tol, atol=tol)
      for (p, a), (_, b) in zip(nnx.to_flat_state(gp1), nnx.to_flat_state(gp0)):
        b = np.asarray(b.get_value(), np.float32)
        np.testing.assert_allclose(np.asarray(a.get_value(), np.float32), b, rtol=tol,
                                   atol=tol * float(np.abs(b).max()), err_msg=f'{kw} {dtype} {p}')
  monkeypatch.setattr(layers, 'CONV_BIAS', 'fused')
  with pytest.raises(ValueError, match='CONV_BIAS must be one of'):
    conv_apply(m, x)


def test_conv_bias_sums_in_bf16_stay_within_rounding_of_fp32(monkeypatch):
  """CONV_BIAS='sums' with bf16 compute against the fp32 conv on the same (bf16-representable)
  input: every gradient within bf16 error of fp32, and within 1.5x nnx.Conv's bf16 gradients'
  distance from it (the sums reduce in fp32)."""
  from hita_jax.models.layers import conv, conv_apply
  x16 = jax.random.normal(jax.random.key(3), (2, 9, 9, 8)).astype(jnp.bfloat16)
  bias = 0.5 * jax.random.normal(jax.random.key(2), (16,))
  w = jax.random.normal(jax.random.key(4), (2, 9, 9, 16))

  def grads(dtype, impl):
    monkeypatch.setattr(layers, 'CONV_BIAS', impl)
    m = conv(8, 16, 3, dtype=dtype, rngs=nnx.Rngs(1))
    m.bias[...] = bias
    graph, params = nnx.split(m, nnx.Param)
    f = lambda p, x: jnp.sum(conv_apply(nnx.merge(graph, p), x).astype(jnp.float32) * w)
    gp, gx = jax.grad(f, argnums=(0, 1))(params, x16.astype(dtype))
    return [np.asarray(a, np.float32) for a in jax.tree.leaves(gp)] + [np.asarray(gx, np.float32)]

  ref = grads(jnp.float32, 'xla')
  err = lambda gs: [float(np.abs(a - r).max()) / float(np.abs(r).max()) for a, r in zip(gs, ref)]
  e_sums, e_xla = err(grads(jnp.bfloat16, 'sums')), err(grads(jnp.bfloat16, 'xla'))
  assert max(e_sums) <= 2e-2, e_sums
  for a, b in zip(e_sums, e_xla):
    assert a <= 1.5 * b + 1e-3, (e_sums, e_xla)


@pytest.mark.parametrize('impl,spelling,conv_bias', [
    ('fused', 'split', 'xla'), ('fused_recompute', 'split', 'xla'), ('fused_nofold', 'split', 'xla'),
    ('fused_recompute', 'split', 'sums'), ('fused_recompute', 'flat', 'xla')])
def test_cnn_fast_paths_in_bf16_stay_within_rounding_of_fp32(impl, spelling, conv_bias, monkeypatch):
  """The CNN encoder + decoder with bf16 compute through each fused-norm path (the conv1-bias fold
  adds that bias in fp32 inside the norm, not after the bf16 conv), the GPU's sums spelling and
  the conv bias sums: loss and gradients within 3x the plain bf16 program's ('xla' norms)
  distance from the fp32 reference ('xla' norms, flat sums)."""
  from hita_jax.models.cnn import CNNDecoder, CNNEncoder
  x = jax.random.uniform(jax.random.key(6), (2, 16, 16, 3), minval=-1, maxval=1)

  def run(norm_impl, dtype, spelling='flat', conv_bias='xla'):
    monkeypatch.setattr(layers, 'SPATIAL_SUM', spelling)
    monkeypatch.setattr(layers, 'CONV_BIAS', conv_bias)
    kw = dict(ch=16, ch_mult=(1, 2), z_channels=32, groups=4, norm_impl=norm_impl, dtype=dtype,
              rngs=nnx.Rngs(5))
    graph, params, rest = nnx.split((CNNEncoder(num_res_blocks=1, **kw), CNNDecoder(num_res_blocks=1, **kw)),
                                    nnx.Param, ...)
    loss = lambda p: jnp.sum(jnp.sin(3 * (lambda e, d: d(e(x)))(*nnx.merge(graph, p, rest))).astype(jnp.float32))
    val, g = jax.jit(jax.value_and_grad(loss))(params)
    return float(val), [np.asarray(a, np.float32) for a in jax.tree.leaves(g)]

  v32, g32 = run('xla', jnp.float32)
  scale = max(float(np.abs(g).max()) for g in g32)
  err = lambda gs: max(float(np.abs(a - b).max()) for a, b in zip(gs, g32)) / scale
  v_plain, g_plain = run('xla', jnp.bfloat16)
  v_fast, g_fast = run(impl, jnp.bfloat16, spelling, conv_bias)
  assert abs(v_fast - v32) <= 3 * abs(v_plain - v32) + 1e-2 * abs(v32)
  assert err(g_fast) <= 3 * err(g_plain) + 1e-3, (err(g_fast), err(g_plain))


@pytest.mark.parametrize('conv_bias', layers.CONV_BIASES)
def test_one_by_one_convs_as_gemms_are_the_same_function(conv_bias, monkeypatch):
  """layers.CONV_1X1='gemm' runs the CNN's 1x1 convolutions (attention projections, channel
  shortcuts) and the tokenizer's quant convs as products over the channel axis: the traced
  program has no 1x1 convolution left and the others untouched; in fp32 the same loss and
  gradients as the convolutions (with either bias gradient), and in bf16 within bf16 rounding of
  fp32; a bad value is named."""
  from hita_jax.models.cnn import CNNDecoder, CNNEncoder
  monkeypatch.setattr(layers, 'CONV_BIAS', conv_bias)

  def build(dtype):
    kw = dict(ch=16, ch_mult=(1, 2), z_channels=32, groups=4, dtype=dtype, rngs=nnx.Rngs(5))
    return CNNEncoder(num_res_blocks=1, **kw), CNNDecoder(num_res_blocks=1, **kw)

  x = jax.random.uniform(jax.random.key(6), (2, 16, 16, 3), minval=-1, maxval=1)
  loss = lambda graph, rest: lambda p: jnp.sum(
      jnp.sin(3 * (lambda e, d: d(e(x)))(*nnx.merge(graph, p, rest))).astype(jnp.float32))

  def run(mode, dtype):
    monkeypatch.setattr(layers, 'CONV_1X1', mode)
    graph, params, rest = nnx.split(build(dtype), nnx.Param, ...)
    text = jax.jit(jax.value_and_grad(loss(graph, rest))).lower(params).as_text()
    convs = [line for line in text.splitlines() if 'stablehlo.convolution' in line]
    val, grads = jax.value_and_grad(loss(graph, rest))(params)
    return convs, float(val), [np.asarray(g, np.float32) for g in jax.tree.leaves(grads)]

  conv_ops, v_conv, g_conv = run('conv', jnp.float32)
  gemm_ops, v_gemm, g_gemm = run('gemm', jnp.float32)
  one = lambda ops: [o for o in ops if '1x1x' in o]
  assert one(conv_ops) and not one(gemm_ops)
  assert len(gemm_ops) == len(conv_ops) - len(one(conv_ops))
  np.testing.assert_allclose(v_gemm, v_conv, rtol=1e-5)
  scale = max(float(np.abs(g).max()) for g in g_conv)
  for a, b in zip(g_gemm, g_conv):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
  # bf16 compute: as close to fp32 as the convolutions' bf16 program is
  _, v16, g16 = run('gemm', jnp.bfloat16)
  _, v16_conv, g16_conv = run('conv', jnp.bfloat16)
  err = lambda gs: max(float(np.abs(a - b).max()) for a, b in zip(gs, g_conv)) / scale
  assert abs(v16 - v_conv) <= 3 * abs(v16_conv - v_conv) + 1e-2 * abs(v_conv)
  assert err(g16) <= 3 * err(g16_conv) + 1e-3
  monkeypatch.setattr(layers, 'CONV_1X1', 'cudnn')
  with pytest.raises(ValueError, match='CONV_1X1 must be one of'):
    layers.conv_apply(layers.conv(4, 4, 1, rngs=nnx.Rngs(0)), jnp.zeros((1, 2, 2, 4)))


def test_tokenizer_quant_convs_follow_the_one_by_one_switch(monkeypatch):
  """The tokenizer's quant / post-quant 1x1 convs go through conv_apply, so CONV_1X1 reaches them:
  no 1x1 convolution is left in the encoder's program, and the same pre-quant features either way."""
  from hita_jax.models.tokenizer import Tokenizer
  from hita_jax import config_lib
  cfg = config_lib.tokenizer_config_from(config_lib.tokenizer_model_config('V', tiny=True))
  model = Tokenizer(cfg, rngs=nnx.Rngs(0))
  model.eval()
  img = jax.random.uniform(jax.random.key(1), (1, cfg.image_size, cfg.image_size, 3), minval=-1, maxval=1)
  out = {}
  for mode in layers.CONV_1X1S:
    monkeypatch.setattr(layers, 'CONV_1X1', mode)
    pre_hol, pre_patch, _ = model.encode_pre_quant(img)
    out[mode] = np.asarray(pre_patch)
    text = jax.jit(lambda im: model.encode_pre_quant(im)[1]).lower(img).as_text()
    one = [ln for ln in text.splitlines() if 'stablehlo.convolution' in ln and '1x1x' in ln]
    assert bool(one) == (mode == 'conv'), mode
  np.testing.assert_allclose(out['gemm'], out['conv'], rtol=1e-5, atol=1e-5)


def _cnn_lpips(dtype):
  """A tiny CNN encoder + decoder and LPIPS (no dropout): a loss of their parameters (the
  reconstruction's sin-sum plus LPIPS against the input: every conv kind the tokenizer trains),
  and the parameters."""
  from hita_jax.models.cnn import CNNDecoder, CNNEncoder
  from hita_jax.models.lpips import LPIPS
  kw = dict(ch=16, ch_mult=(1, 2), z_channels=32, groups=4, dtype=dtype, rngs=nnx.Rngs(5))
  model = (CNNEncoder(num_res_blocks=1, **kw), CNNDecoder(num_res_blocks=1, **kw),
           LPIPS(rngs=nnx.Rngs(7), dtype=dtype, dropout=0.0))
  x = jax.random.uniform(jax.random.key(6), (2, 32, 32, 3), minval=-1, maxval=1)
  graph, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p):
    enc, dec, lp = nnx.merge(graph, p, rest)
    y = dec(enc(x)).astype(jnp.float32)
    return jnp.sum(jnp.sin(3 * y)) + jnp.sum(lp(x, jnp.tanh(y)))
  return loss, params


def _assert_bf16_as_close(v16, g16, v16_base, g16_base, v32, g32):
  """A bf16 program's loss and gradients are as close to fp32 as the default bf16 program's."""
  scale = max(float(np.abs(g).max()) for g in g32)
  err = lambda gs: max(float(np.abs(a - b).max()) for a, b in zip(gs, g32)) / scale
  assert abs(v16 - v32) <= 3 * abs(v16_base - v32) + 1e-2 * abs(v32)
  assert err(g16) <= 3 * err(g16_base) + 1e-3, (err(g16), err(g16_base))


def test_conv_switches_on_the_cnn_and_lpips_are_the_same_function(monkeypatch):
  """CONV_BIAS='sums' with CONV_1X1='gemm' on the encoder + decoder + LPIPS (whose VGG convs go
  through conv_apply too): the same loss and gradients as the defaults in fp32, and in bf16 within
  bf16 rounding of fp32 as the defaults' bf16 program is."""
  def run(conv_bias, conv_1x1, dtype):
    monkeypatch.setattr(layers, 'CONV_BIAS', conv_bias)
    monkeypatch.setattr(layers, 'CONV_1X1', conv_1x1)
    loss, params = _cnn_lpips(dtype)
    val, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(val), [np.asarray(g, np.float32) for g in jax.tree.leaves(grads)]

  v32, g32 = run('xla', 'conv', jnp.float32)
  v_sw, g_sw = run('sums', 'gemm', jnp.float32)
  np.testing.assert_allclose(v_sw, v32, rtol=1e-6)
  scale = max(float(np.abs(g).max()) for g in g32)
  for a, b in zip(g_sw, g32):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale)
  _assert_bf16_as_close(*run('sums', 'gemm', jnp.bfloat16), *run('xla', 'conv', jnp.bfloat16), v32, g32)
