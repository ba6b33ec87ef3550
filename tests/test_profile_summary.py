"""profile_summary on a CPU trace: every kernel, then the same time grouped by kind."""
import jax
import jax.numpy as jnp
import pytest

from hita_jax.tools import profile_summary


def test_profile_table_and_kinds(tmp_path):
  f = jax.jit(lambda x: jnp.tanh(x @ x) + jnp.sum(x))
  x = jnp.ones((64, 64))
  f(x).block_until_ready()
  rows = profile_summary.profile(lambda: f(x).block_until_ready(), str(tmp_path), repeats=2, top=0)
  assert rows[-1]['kernel'] == 'ALL' and len(rows) > 1
  kinds = profile_summary.group_by_kind(rows)
  assert sum(k['ms'] for k in kinds) == pytest.approx(rows[-1]['ms'])
  assert sum(k['calls'] for k in kinds) == rows[-1]['calls']
  assert len(kinds) <= len(rows) - 1
  by_kind = profile_summary.group_by_kind([
      {'kernel': 'loop_add_fusion.3', 'calls': 2, 'ms': 1.0, 'share': 0.25},
      {'kernel': 'loop_add_fusion.12', 'calls': 1, 'ms': 2.0, 'share': 0.5},
      {'kernel': 'pallas_call', 'calls': 1, 'ms': 1.0, 'share': 0.25},
      {'kernel': 'ALL', 'calls': 4, 'ms': 4.0, 'share': 1.0}])
  assert by_kind[0] == {'kernel': 'loop_add_fusion', 'calls': 3, 'ms': 3.0, 'share': 0.75}
