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
