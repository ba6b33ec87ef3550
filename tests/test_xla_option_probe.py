"""hita_jax.tools.xla_option_probe: which op kind an XLA option set breaks, on the CPU backend (the
tool's GPU use is a device-lease command; here its records, its checks and its failure reports).
conftest pins JAX_PLATFORMS=cpu, so the cuDNN probe is the one skipped."""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hita_jax.errors import UserError
from hita_jax.tools import xla_option_probe as probe_tool

EXND = 'exnd:xla_gpu_exclude_nondeterministic_ops=true'


def test_probes_run_base_and_the_set_against_the_cpu_fp32_reference(tmp_path, monkeypatch):
  monkeypatch.setenv('OUT', str(tmp_path))
  recs = probe_tool.run([EXND], ['gemm', 'scatter_add', 'nearest_code', 'attn_cudnn'], rtol=0.05,
                        in_process=True, timeout=60)
  assert [(r['probe'], r['options'], r['status']) for r in recs] == [
      ('gemm', 'base', 'ok'), ('gemm', 'exnd', 'ok'), ('scatter_add', 'base', 'ok'),
      ('scatter_add', 'exnd', 'ok'), ('nearest_code', 'base', 'ok'), ('nearest_code', 'exnd', 'ok'),
      ('attn_cudnn', 'base', 'skipped'), ('attn_cudnn', 'exnd', 'skipped')]
  assert recs[1]['xla'] == {'xla_gpu_exclude_nondeterministic_ops': True} and recs[0]['xla'] == {}
  # bf16 products against fp32: close, not equal (the reference is independent of the program)
  assert 0 < recs[0]['max_rel_diff'] < 0.02
  assert recs[2]['max_rel_diff'] < 1e-6 and recs[4]['max_rel_diff'] == 0  # fp32 sums; same codes
  lines = [json.loads(x) for x in open(tmp_path / 'xla_option_probe.jsonl')]
  assert lines[:-1] == recs
  assert lines[-1]['broken_by'] == {'exnd': []}
  assert lines[-1]['status']['attn_cudnn/exnd'] == 'skipped'


def test_a_difference_beyond_rtol_is_a_mismatch():
  recs = probe_tool.run([], ['gemm'], rtol=0.0, in_process=True, timeout=60)
  assert recs[0]['status'] == 'mismatch' and recs[0]['max_rel_diff'] > 0


def test_non_finite_outputs_or_other_shapes_are_infinitely_far():
  w = {'a': np.ones(3, np.float32), 'i': np.arange(3)}
  assert probe_tool._max_rel_diff(w, w) == 0
  assert probe_tool._max_rel_diff({'a': np.array([1, np.nan, 1], np.float32), 'i': np.arange(3)}, w) == np.inf
  assert probe_tool._max_rel_diff({'a': np.array([1, np.inf, 1], np.float32), 'i': np.arange(3)}, w) == np.inf
  assert probe_tool._max_rel_diff({'a': np.ones(4, np.float32), 'i': np.arange(3)}, w) == np.inf
  assert probe_tool._max_rel_diff({'a': np.ones(3, np.float32)}, w) == np.inf
  assert probe_tool._max_rel_diff({'a': np.ones(3, np.float32), 'i': np.array([0, 1, 1])}, w) == pytest.approx(1 / 3)


def _raising_at(stage):
  def case(key):
    def fn(x):
      if stage == 'compile':
        raise RuntimeError('bad trace\nmore lines')
      def fail(x):
        raise RuntimeError('raw_hash_map<>::at')
      return jax.pure_callback(fail, jax.ShapeDtypeStruct((3,), jnp.float32), x)
    return fn, (jnp.ones(3),), (lambda x: x)
  return case


def test_a_probe_that_raises_is_reported_with_its_stage_and_the_next_one_runs(monkeypatch):
  monkeypatch.setitem(probe_tool.PROBES, 'at_trace', (_raising_at('compile'), None))
  monkeypatch.setitem(probe_tool.PROBES, 'at_run', (_raising_at('run'), None))
  recs = probe_tool.run([], ['at_trace', 'at_run', 'scatter_add'], rtol=0.05, in_process=True, timeout=60)
  assert (recs[0]['status'], recs[0]['stage'], recs[0]['error']) == ('failed', 'compile', 'RuntimeError: bad trace ... more lines')
  assert (recs[1]['status'], recs[1]['stage']) == ('failed', 'run') and 'raw_hash_map' in recs[1]['error']
  assert recs[2]['status'] == 'ok'


def test_a_probe_is_charged_to_a_set_only_where_base_is_ok(monkeypatch):
  """broken_by: a probe failing under base too is not the set's; one failing under the set only is."""
  real = probe_tool.probe

  def fake(name, opts, rtol):
    if name == 'gemm' and opts:
      return {'probe': name, 'status': 'failed', 'stage': 'run', 'error': 'IndexError: at'}
    if name == 'scatter_add':
      return {'probe': name, 'status': 'crashed'}
    return real(name, opts, rtol)
  monkeypatch.setattr(probe_tool, 'probe', fake)
  recs = probe_tool.run([EXND, 'det:xla_gpu_deterministic_ops=true'], ['gemm', 'scatter_add', 'attn_cudnn'],
                        rtol=0.05, in_process=True, timeout=60)
  assert probe_tool.broken_by(recs) == {'exnd': ['gemm'], 'det': ['gemm']}
  recs = [{'probe': 'gemm', 'options': o, 'status': s} for o, s in
          (('base', 'ok'), ('exnd', 'failed'), ('det', 'ok'))] + [
         {'probe': 'scatter_add', 'options': o, 'status': 'crashed'} for o in ('base', 'exnd')]
  assert probe_tool.broken_by(recs) == {'exnd': ['gemm'], 'det': []}


def test_each_probe_in_its_own_process_applies_its_set_and_a_dead_process_is_a_crash(monkeypatch):
  rec = probe_tool.probe_in_child('scatter_add', 'base:', 0.05, timeout=120)
  assert rec['status'] == 'ok' and rec['probe'] == 'scatter_add' and rec['rc'] == 0
  # the child compiles with the set it is given: an option XLA does not know fails its compile
  rec = probe_tool.probe_in_child('scatter_add', 'x:xla_no_such_option_anywhere=true', 0.05, timeout=120)
  assert (rec['status'], rec['stage']) == ('failed', 'compile')
  assert 'xla_no_such_option_anywhere' in rec['error']
  monkeypatch.setattr(probe_tool, '_child_command', lambda *a: [sys.executable, '-c', (
      'import sys; sys.stderr.write("frames\\nF0000 00:00 thunk.cc:1] Check failed: ok\\nmore\\n"); '
      'sys.exit(134)')])
  rec = probe_tool.probe_in_child('gemm', 'base:', 0.05, timeout=60)
  assert (rec['status'], rec['rc']) == ('crashed', 134)
  assert rec['error'] == 'F0000 00:00 thunk.cc:1] Check failed: ok'
  monkeypatch.setattr(probe_tool, '_child_command', lambda *a: [
      sys.executable, '-c', 'import time; print("{\\"probe\\": \\"gemm\\", \\"status\\": \\"ok\\"}", flush=True); time.sleep(30)'])
  rec = probe_tool.probe_in_child('gemm', 'base:', 0.05, timeout=2)
  assert (rec['status'], rec['rc']) == ('ok', None)  # its record came before it hung
  monkeypatch.setattr(probe_tool, '_child_command', lambda *a: [
      sys.executable, '-c', 'import time; time.sleep(30)'])
  rec = probe_tool.probe_in_child('gemm', 'base:', 0.05, timeout=1)
  assert rec['status'] == 'crashed' and rec['error'] == 'no exit within 1 s'


def test_past_the_deadline_probes_are_not_run_and_the_summary_is_written(tmp_path, monkeypatch):
  monkeypatch.setenv('OUT', str(tmp_path))
  recs = probe_tool.run([EXND], ['gemm'], rtol=0.05, in_process=True, timeout=60, deadline=-1)
  assert [r['status'] for r in recs] == ['not_run', 'not_run']
  lines = [json.loads(x) for x in open(tmp_path / 'xla_option_probe.jsonl')]
  assert lines[-1]['broken_by'] == {'exnd': []}


def test_a_set_xla_rejects_or_a_malformed_one_names_the_fix():
  with pytest.raises(UserError, match="xla_no_such_option_anywhere.*check the option names"):
    probe_tool.check_option_set('bogus:xla_no_such_option_anywhere=true')
  with pytest.raises(UserError, match='NAME:xla_option=value'):
    probe_tool.check_option_set('bogus:xla_gpu_autotune_level')
  with pytest.raises(UserError, match='NAME:xla_option=value'):  # no NAME: would probe nothing
    probe_tool.check_option_set('xla_gpu_exclude_nondeterministic_ops=true')
  with pytest.raises(UserError, match='must differ'):
    probe_tool.run(['base:xla_gpu_autotune_level=2'], ['gemm'], 0.05, True, 60)


@pytest.mark.parametrize('name', sorted(probe_tool.PROBES))
def test_every_probe_builds_a_program_of_its_op_kind(name):
  """Each probe lowers to a program holding its op kind (without running it); one that needs
  another backend (cuDNN attention) lowers its CPU reference."""
  case, backends = probe_tool.PROBES[name]
  fn, args, ref_fn = case(jax.random.key(0))
  runs_here = not backends or jax.default_backend() in backends
  text = jax.jit(fn if runs_here else ref_fn).lower(*args).as_text()
  kind = {'conv3x3': 'stablehlo.convolution', 'conv3x3_stride2': 'stablehlo.convolution',
          'conv3x3_bias': 'stablehlo.convolution', 'conv1x1': 'stablehlo.convolution',
          'gemm': 'stablehlo.dot_general', 'attn_cudnn': 'stablehlo.dot_general',
          'attn_xla': 'stablehlo.exponential', 'scatter_add': 'stablehlo.scatter',
          'nearest_code': 'stablehlo.scatter', 'group_norm': 'stablehlo.rsqrt'}[name]
  assert kind in text
  if name == 'conv3x3_stride2':
    assert 'window_strides = array<i64: 2, 2>' in text or 'stride = [2, 2]' in text
  jax.jit(ref_fn).lower(*args)
