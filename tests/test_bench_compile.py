"""bench fanin_compile (tools/bench_compile): the flat optimizer's pattern per leaf count and spelling."""
import re

import jax
import numpy as np
import pytest

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


def test_parallel_compile_times_each_program_in_both_modes():
  """bench parallel_compile on a two-level CNN: both modes compile both programs and say so."""
  for mode in ('seq', 'threads'):
    res = bench_compile.bench_parallel_compile(batches=(2, 1), image_size=16, mode=mode, ch_mult=(1, 2))
    assert res['mode'] == mode and len(res['compile_each_s']) == 2
    assert res['compile_wall_s'] > 0 and res['overlap'] > 0
    if mode == 'seq':  # one after another: the wall is their sum
      assert res['overlap'] == pytest.approx(1.0, abs=0.05)
