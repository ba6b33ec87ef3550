"""The tokenizer CNN's GroupNorm on the current accelerator: the CNN encoder + decoder's forward and
backward per norm program (`bench cnn_train`) and the norm alone per resolution and per spelling of
its sums (`bench gn_sums`). Run through `python -m hita_jax.tools.bench cnn_train|gn_sums`."""
from __future__ import annotations

import time
from unittest import mock

import jax
import jax.numpy as jnp
from flax import nnx

from hita_jax.models import cnn, layers
from hita_jax.models.cnn import CNNDecoder, CNNEncoder
from hita_jax.tools.ab import best_time, peak_memory


def bench_cnn_train(batch, image_size=336, iters=10, dtype=jnp.bfloat16, ch=128, rounds=2,
                    ch_mult=(1, 1, 2, 2, 4), enc_blocks=2, dec_blocks=3):
  """The tokenizer's CNN encoder + decoder (official widths, bf16 compute) forward and backward on an
  L2 loss, timed alternately in one process: 'fused' (the GroupNorm(+swish) op with each
  ResnetBlock's conv1 bias folded into norm2; the baseline the others are compared with), without
  the fold ('nofold', the program of 912b101), what the fused op replaced ('flax': flax's GroupNorm
  in fp32, cast back, then swish in the activation dtype, autodiff; the program before
  2026-12-05e), the recomputing backward ('recompute', the tokenizer's default `cnn_norm_impl` since
  2026-12-06), the convs' bias gradients as per-channel sums ('bias_sums', layers.CONV_BIAS='sums'),
  the 1x1 convolutions as GEMMs ('gemm_1x1', layers.CONV_1X1='gemm') and the other spellings of
  the per-channel sums ('sum_<spelling>', layers.SPATIAL_SUMS).
  `ch_mult`, `enc_blocks`, `dec_blocks`: the official depth by default (tests shrink it)."""
  rngs = nnx.Rngs(0)
  enc = CNNEncoder(ch=ch, ch_mult=ch_mult, num_res_blocks=enc_blocks, z_channels=512,
                   dtype=dtype, rngs=rngs)
  dec = CNNDecoder(ch=ch, ch_mult=ch_mult, num_res_blocks=dec_blocks, z_channels=512,
                   dtype=dtype, rngs=rngs)
  graph, params, rest = nnx.split((enc, dec), nnx.Param, ...)
  x = jax.random.uniform(jax.random.key(1), (batch, image_size, image_size, 3), minval=-1, maxval=1)

  def loss(params, x):
    e, d = nnx.merge(graph, params, rest)
    return jnp.mean(jnp.square(d(e(x)) - x))

  fused = layers.group_norm

  def unfolded_group_norm(x, scale, bias, groups, eps, swish, pre_bias=None, backward='shared'):
    return fused(x, scale, bias, groups, eps, swish)

  def flax_group_norm(x, scale, bias, groups, eps, swish, pre_bias=None, backward='shared'):
    norm = nnx.GroupNorm(x.shape[-1], num_groups=groups, epsilon=eps, use_fast_variance=False,
                         dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    norm.scale[...], norm.bias[...] = scale, bias
    y = norm(x.astype(jnp.float32)).astype(x.dtype)
    return y * jax.nn.sigmoid(y) if swish else y

  def recompute_group_norm(x, scale, bias, groups, eps, swish, pre_bias=None, backward='shared'):
    return fused(x, scale, bias, groups, eps, swish, pre_bias, 'recompute')

  with_bias = lambda m, x: m(x)  # conv1 adds its own bias again; the norms drop pre_bias
  variants = {'fused': {}, 'nofold': dict(group_norm=unfolded_group_norm, conv=with_bias),
              'flax': dict(group_norm=flax_group_norm, conv=with_bias),
              'recompute': dict(group_norm=recompute_group_norm),
              'bias_sums': dict(conv_bias='sums'),  # layers.CONV_BIAS
              'gemm_1x1': dict(conv_1x1='gemm')}  # layers.CONV_1X1
  # The fused op with the other spellings of its per-channel sums (layers.SPATIAL_SUM).
  default_sum = layers._spelling()
  variants.update({f'sum_{s}': dict(spatial_sum=s) for s in layers.SPATIAL_SUMS if s not in ('auto', default_sum)})
  steps, res = {}, {'bench': 'cnn_train', 'batch': batch, 'image_size': image_size,
                    'spatial_sum': default_sum}
  for name, patch in variants.items():
    with mock.patch.object(layers, 'group_norm', patch.get('group_norm', fused)), \
         mock.patch.object(layers, 'SPATIAL_SUM', patch.get('spatial_sum', layers.SPATIAL_SUM)), \
         mock.patch.object(layers, 'CONV_BIAS', patch.get('conv_bias', layers.CONV_BIAS)), \
         mock.patch.object(layers, 'CONV_1X1', patch.get('conv_1x1', layers.CONV_1X1)), \
         mock.patch.object(cnn, 'conv_without_bias', patch.get('conv', cnn.conv_without_bias)):
      t0 = time.perf_counter()
      steps[name] = jax.jit(jax.value_and_grad(loss)).lower(params, x).compile()
      res[f'{name}_compile_s'] = time.perf_counter() - t0
  times = {name: [] for name in steps}
  for _ in range(rounds):  # alternate, so drift hits all
    for name, step in steps.items():
      times[name].append(best_time(lambda i: step(params, x), iters, 1)[0])
  for name, t in times.items():
    res[f'{name}_step_s'] = min(t)
  # The programs compute the same loss and gradients (up to bf16 rounding): the A/B is fair.
  outs = {n: steps[n](params, x) for n in steps}
  # Over all gradients at once: a leaf whose true gradient is 0 (the attention's key bias) has only
  # rounding noise, which a per-leaf ratio would blow up.
  sq = lambda t: sum(float(jnp.sum(jnp.square(v.astype(jnp.float32)))) for v in jax.tree.leaves(t))
  (l1, g1) = outs['fused']
  for other in [n for n in steps if n != 'fused']:
    l2, g2 = outs[other]
    res[f'loss_abs_diff_{other}'] = float(abs(l1 - l2))
    res[f'grad_rel_diff_{other}'] = (sq(jax.tree.map(jnp.subtract, g1, g2)) / sq(g2)) ** 0.5
    res[f'speedup_vs_{other}'] = res[f'{other}_step_s'] / res['fused_step_s']
  res.update(peak_memory())
  return res


def bench_gn_sums(batch, iters=20, rounds=2, shapes=None):
  """The fused GroupNorm + swish (with a folded conv bias) alone at each of the tokenizer CNN's
  resolutions (Hita-V widths, 336 px, bf16), forward and forward + backward, once per spelling of
  its per-channel sums (`layers.SPATIAL_SUMS`) and per backward (`layers.GN_BACKWARDS`), beside a
  copy of x (read + write) as the bandwidth reference. Reports ms per call and x-sized passes
  (time / (bytes of x / copy rate)). The floor is 4 passes forward (mean, variance, then read x and
  write y) and 7 for the vjp (its output y is dropped: the two statistics passes, one pass over
  x and dy for the sums, then x and dy read and dx written)."""
  shapes = shapes or [(336, 128), (168, 128), (84, 256), (42, 256), (21, 512)]  # (size, channels)
  res = {'bench': 'gn_sums', 'batch': batch, 'default': layers._spelling(), 'rows': []}
  timed = lambda fn, *args: best_time(lambda i: fn(*args), iters, rounds)

  for size, c in shapes:
    k = jax.random.split(jax.random.key(size), 6)
    x = (jax.random.normal(k[0], (batch, size, size, c)) + 0.3).astype(jnp.bfloat16)
    dy = jax.random.normal(k[1], x.shape).astype(jnp.bfloat16)
    scale, bias, pre = (1 + 0.1 * jax.random.normal(k[2], (c,)), 0.1 * jax.random.normal(k[3], (c,)),
                        0.1 * jax.random.normal(k[4], (c,)))
    copy_s, _ = timed(jax.jit(lambda x: x + 1), x)
    nbytes = x.size * x.dtype.itemsize
    row = {'size': size, 'channels': c, 'x_gb': nbytes / 1e9, 'copy_ms': copy_s * 1e3,
           'copy_tb_s': 2 * nbytes / copy_s / 1e12}
    pass_s = copy_s / 2  # one x-sized read or write at the copy's rate
    ref = None
    names = [(sp, 'shared') for sp in layers.SPATIAL_SUMS if sp != 'auto']
    names += [(sp, 'recompute') for sp in ('flat', 'split')]
    fwd_s = {}  # the forward depends on the spelling only
    for spelling, backward in names:
      with mock.patch.object(layers, 'SPATIAL_SUM', spelling):
        fwd = jax.jit(lambda x, s, b, p: layers.group_norm(x, s, b, 32, 1e-6, True, p))
        vjp = jax.jit(lambda x, s, b, p, dy: jax.vjp(
            lambda *a: layers.group_norm(*a[:3], 32, 1e-6, True, a[3], backward), x, s, b, p)[1](dy))
        if spelling not in fwd_s:
          fwd_s[spelling] = timed(fwd, x, scale, bias, pre)[0]
        b_s, grads = timed(vjp, x, scale, bias, pre, dy)
      if ref is None:
        ref = grads
      err = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32))) /
                      (float(jnp.max(jnp.abs(r.astype(jnp.float32)))) + 1e-30)) for g, r in zip(grads, ref))
      name = spelling if backward == 'shared' else f'{spelling}+{backward}'
      row[name] = {'fwd_ms': fwd_s[spelling] * 1e3, 'fwd_bwd_ms': b_s * 1e3,
                   'fwd_passes': fwd_s[spelling] / pass_s, 'fwd_bwd_passes': b_s / pass_s,
                   'grad_max_rel_diff_vs_first': err}
    res['rows'].append(row)
  res.update(peak_memory())
  return res
