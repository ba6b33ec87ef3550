"""How XLA's compile time grows with a flat optimizer's fan-in and fan-out (`bench fanin_compile`).

The tokenizer trainer's flat layout (`training.flat_vector` / `optimizer_step(flat=True)`) makes
one concatenate of a network's ~500 gradient leaves (twice for the generator: the clip's and the
gradient-norm metric's, plus the EMA's concatenate of the new parameters) and cuts the update
vector back into ~500 slices. Here the same pattern on synthetic leaves (a fusible product per
leaf as its 'gradient', Adam-like element-wise work on the concatenation, each leaf plus its slice
of the update) is compiled cold for several leaf counts and spellings, so the compile's growth
with the count (linear or worse) and what a spelling saves can be read off in seconds. The
spellings are `training.flat_vector` / `training._cut` with `group` (`training.FLAT_CONCAT_GROUP`)
0 or ceil(sqrt(leaves)): 'one' (neither grouped, as shipped), 'grouped' (both, the switch),
'grouped_concat' and 'grouped_cut' (one side only).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from hita_jax import training

SPELLINGS = ('one', 'grouped', 'grouped_concat', 'grouped_cut')


def _leaf_shapes(n: int, seed: int = 0) -> list[tuple[int, ...]]:
  """Shapes like a conv net's leaves: biases / norm scales (vectors) and small kernels."""
  r = np.random.RandomState(seed)
  shapes = []
  for i in range(n):
    c = int(r.choice([32, 64, 128]))
    shapes.append((c,) if i % 2 else (3, 3, c // 4, c))
  return shapes


def optimizer_like(params, xs, scale, mu, spelling: str):
  g_n = int(np.ceil(np.sqrt(len(params))))
  concat_group = g_n if spelling in ('grouped', 'grouped_concat') else 0
  cut_group = g_n if spelling in ('grouped', 'grouped_cut') else 0
  grads = [p * x * scale for p, x in zip(params, xs)]  # fusible 'gradients'
  g = training.flat_vector(grads, concat_group)
  norm = jnp.sqrt(jnp.sum(jnp.square(g)))
  mu = 0.9 * mu + 0.1 * g / jnp.maximum(norm, 1.0)
  update = -1e-3 * mu / (jnp.sqrt(jnp.abs(mu)) + 1e-8)
  new = [p + u for p, u in zip(params, training._cut(update, params, cut_group))]
  ema = 0.99 * training.flat_vector(new, concat_group)  # the flat EMA's concatenate
  return new, mu, ema, norm


def bench_fanin_compile(counts=(125, 250, 500), spellings=SPELLINGS) -> dict:
  res = {'bench': 'fanin_compile', 'counts': list(counts), 'rows': []}
  for n in counts:
    shapes = _leaf_shapes(n)
    params = [jnp.full(s, 0.5, jnp.float32) for s in shapes]
    xs = [jnp.full(s, 2.0, jnp.float32) for s in shapes]
    mu = jnp.zeros((sum(int(np.prod(s)) for s in shapes),), jnp.float32)
    ref = None
    for spelling in spellings:
      fn = jax.jit(lambda p, x, s, m, sp=spelling: optimizer_like(p, x, s, m, sp))
      t0 = time.perf_counter()
      lowered = fn.lower(params, xs, 1.5, mu)
      lower_s = time.perf_counter() - t0
      t0 = time.perf_counter()
      compiled = lowered.compile()
      compile_s = time.perf_counter() - t0
      out = compiled(params, xs, 1.5, mu)
      flat = np.concatenate([np.asarray(a).reshape(-1) for a in jax.tree.leaves(out)])
      ref = flat if ref is None else ref
      res['rows'].append({'leaves': n, 'spelling': spelling, 'lower_s': lower_s, 'compile_s': compile_s,
                          'max_abs_diff_vs_one': float(np.max(np.abs(flat - ref)))})
  return res


def cnn_grad_fn(ch_mult=(1, 1, 2, 2, 4), dtype=jnp.bfloat16):
  """(abstract params, abstract rest, grad function) of the CNN encoder + decoder on an L2 loss;
  the weights are never materialised (only lowered and compiled)."""
  from flax import nnx
  from hita_jax.models.cnn import CNNDecoder, CNNEncoder

  def make():
    rngs = nnx.Rngs(0)
    enc = CNNEncoder(ch=128, ch_mult=ch_mult, num_res_blocks=2, z_channels=512, dtype=dtype, rngs=rngs)
    dec = CNNDecoder(ch=128, ch_mult=ch_mult, num_res_blocks=3, z_channels=512, dtype=dtype, rngs=rngs)
    return enc, dec
  abstract = nnx.eval_shape(make)
  graph, params, rest = nnx.split(abstract, nnx.Param, ...)

  def loss(params, rest, x):
    e, d = nnx.merge(graph, params, rest)
    return jnp.mean(jnp.square(d(e(x)).astype(jnp.float32) - x))
  return params, rest, jax.grad(loss)


def bench_parallel_compile(batches=(16, 12), image_size=336, mode='threads',
                           ch_mult=(1, 1, 2, 2, 4)) -> dict:
  """Whether XLA compiles of separate programs overlap when started from threads on this backend
  (the GIL released during compile; the GPU autotuner's lock held only while timing). One CNN
  training program per batch size (distinct convolution shapes: no autotune result shared), lowered
  first, then compiled one after another ('seq') or all at once from a thread each ('threads'); run
  each mode in its own process so neither sees the other's caches."""
  from hita_jax import staging

  params, rest, grad = cnn_grad_fn(ch_mult)
  fn = jax.jit(grad)
  lowered = []
  t0 = time.perf_counter()
  for b in batches:
    x = jax.ShapeDtypeStruct((b, image_size, image_size, 3), jnp.float32)
    lowered.append(fn.lower(params, rest, x))
  lower_s = time.perf_counter() - t0
  if mode not in ('seq', 'threads'):
    raise ValueError(f'mode {mode!r}: seq or threads')
  _, timing = staging.compile_all(lowered, parallel=mode == 'threads')
  wall, each = timing['compile_wall_s'], timing['compile_each_s']
  return {'bench': 'parallel_compile', 'mode': mode, 'batches': list(batches), 'image_size': image_size,
          'ch_mult': list(ch_mult), 'lower_s': lower_s, 'compile_each_s': each, 'compile_wall_s': wall,
          'overlap': sum(each) / wall}
