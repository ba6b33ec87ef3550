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


def test_kernel_time_by_source_line():
  """Each kernel's HLO instruction traced back to the model line that made it: a fusion through
  its fused computation, the gradient told apart from the forward pass."""
  from hita_jax.models.rope import apply_rope
  f = jax.jit(jax.grad(lambda x, c, s: jnp.tanh(apply_rope(x, c, s)).sum()))
  x, c, s = jnp.ones((2, 8, 2, 16)), jnp.ones((8, 8)), jnp.zeros((8, 8))
  hlo = f.lower(x, c, s).compile().as_text()
  sources = profile_summary.hlo_sources(hlo)
  fusions = [n for n in sources if 'fusion' in n and sources[n][0]]
  assert fusions and all(sources[n][0].startswith('hita_jax/models/rope.py:')
                         or 'test_profile_summary.py:' in sources[n][0] for n in fusions)
  rope_lines = {v[0] for v in sources.values() if v[0] and v[0].startswith('hita_jax/models/rope.py:')}
  assert rope_lines, sources
  rows = [{'kernel': n, 'calls': 2, 'ms': 1.0, 'share': 0.0} for n in fusions] + [
      {'kernel': 'not_in_the_module.7', 'calls': 1, 'ms': 0.5, 'share': 0.0},
      {'kernel': 'ALL', 'calls': 2 * len(fusions) + 1, 'ms': len(fusions) + 0.5, 'share': 1.0}]
  table = profile_summary.by_source_line(rows, hlo, top=0)
  assert sum(r['ms'] for r in table) == pytest.approx(len(fusions) + 0.5)
  assert {r['source'] for r in table if r['source'] != '?'} <= {f'{v[0]} {d}' for v in sources.values()
                                                               if v[0] for d in ('fwd', 'bwd')}
  assert [r for r in table if r['source'] == '?'][0]['ms'] == 0.5
  assert any(r['source'].endswith(' bwd') for r in table)
  assert 'source (an op there)' in profile_summary.format_sources(table)
  # older XLA: source_file / source_line in the metadata itself
  old = ('ENTRY %main.3 (p: f32[4]) -> f32[4] {\n'
         '  %p = f32[4]{0} parameter(0)\n'
         '  ROOT %loop_add_fusion.2 = f32[4]{0} fusion(%p), kind=kLoop, calls=%fc, metadata={op_name='
         '"jit(f)/jvp()/add" source_file="/x/site-packages/hita_jax/models/gpt.py" source_line=262}\n}\n')
  assert profile_summary.hlo_sources(old)['loop_add_fusion.2'] == ('hita_jax/models/gpt.py:262',
                                                                    'jit(f)/jvp()/add')


def test_bench_gpt_train_profile_names_source_lines(monkeypatch, tmp_path):
  """`bench gpt_train --profile`: the kernel table, the kinds and the time by source line (from
  the step's optimized HLO, compiled from abstract arguments since the step donates its own)."""
  from hita_jax.tools import bench
  monkeypatch.setattr(bench, 'full_size_config', lambda size, **kw: bench.GPTConfig(
      dim=32, n_layer=2, n_head=2, vocab_size=16, num_holistic=4, grid=3, num_classes=3, **kw))
  out = bench.bench_gpt_train('B', 2, warmup=1, iters=1, profile_dir=str(tmp_path))
  assert out['profile'][-1]['kernel'] == 'ALL' and out['profile_kinds']
  assert out['dropout_rng'] == 'hash'  # recorded: rows from before 2026-12-06 ran Threefry masks
  sources = out['profile_sources']
  assert sources and sum(r['share'] for r in sources) <= 1.0 + 1e-9
  # the CPU trace names most events after runtime thunks ('?'), but its fusions after the HLO's
  assert any(r['source'].startswith('hita_jax/models/gpt.py:') for r in sources), sources
  assert all(set(r) == {'source', 'op', 'kernels', 'calls', 'ms', 'share'} for r in sources)
