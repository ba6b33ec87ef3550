"""bench fanin_compile (tools/bench_compile): the flat optimizer's pattern per leaf count and spelling."""
import re

import jax
import numpy as np

from hita_jax.tools import bench_compile


def test_every_spelling_computes_the_same_values_and_is_timed():
  res = bench_compile.bench_fanin_compile(counts=(9, 16))
  assert [(r['leaves'], r['spelling']) for r in res['rows']] == [
      (n, s) for n in (9, 16) for s in bench_compile.SPELLINGS]
  for r in res['rows']:
    assert r['compile_s'] > 0 and r['max_abs_diff_vs_one'] == 0.0, r


def test_grouped_spelling_keeps_each_concatenate_small():
  shapes = bench_compile._leaf_shapes(16)
  params = [np.full(s, 0.5, np.float32) for s in shapes]
  mu = np.zeros(sum(int(np.prod(s)) for s in shapes), np.float32)
  widths = {}
  for spelling in ('one', 'grouped'):
    text = jax.jit(lambda p, x, m, sp=spelling: bench_compile.optimizer_like(p, x, 1.5, m, sp)).lower(
        params, params, mu).compile().as_text()
    widths[spelling] = max(m.count('%') for m in re.findall(r'concatenate\(([^)]*)\)', text))
  assert widths['one'] == 16 and widths['grouped'] <= 4, widths  # groups of ceil(sqrt(16))
