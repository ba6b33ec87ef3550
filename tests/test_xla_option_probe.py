"""hita_jax.tools.xla_option_probe: which op kind an XLA option set breaks, on the CPU backend (the
tool's GPU use is a device-lease command; here its records, its checks and its failure reports)."""
import json
import sys

import jax
import jax.numpy as jnp
import pytest

from hita_jax.errors import UserError
from hita_jax.tools import xla_option_probe as probe_tool


def test_probes_run_against_the_cpu_fp32_reference_and_write_records(tmp_path, monkeypatch):
  monkeypatch.setenv('OUT', str(tmp_path))
  recs = probe_tool.run('exnd:xla_gpu_exclude_nondeterministic_ops=true',
                        ['gemm', 'scatter_add', 'nearest_code', 'attn_cudnn'], rtol=0.05,
                        in_process=True, timeout=60)
  assert [r['status'] for r in recs] == ['ok', 'ok', 'ok', 'skipped']
  assert recs[0]['xla'] == {'xla_gpu_exclude_nondeterministic_ops': True}
  # bf16 products against fp32: close, not equal (the reference is independent of the program)
  assert 0 < recs[0]['max_rel_diff'] < 0.02
  assert recs[1]['max_rel_diff'] < 1e-6  # fp32 scatter-add on both sides
  lines = [json.loads(x) for x in open(tmp_path / 'xla_option_probe.jsonl')]
  assert lines[:4] == recs
  assert lines[4]['status'] == {'gemm': 'ok', 'scatter_add': 'ok', 'nearest_code': 'ok',
                                'attn_cudnn': 'skipped'}


def test_a_difference_beyond_rtol_is_a_mismatch():
  (rec,) = probe_tool.run('base:', ['gemm'], rtol=0.0, in_process=True, timeout=60)
  assert rec['status'] == 'mismatch' and rec['max_rel_diff'] > 0


def test_a_probe_that_raises_is_reported_and_the_next_one_runs(monkeypatch):
  def broken(key):
    def fn(x):
      raise RuntimeError('raw_hash_map<>::at\nmore lines')
    return fn, (jnp.ones(3),), fn
  monkeypatch.setitem(probe_tool.PROBES, 'broken', (broken, None))
  recs = probe_tool.run('base:', ['broken', 'scatter_add'], rtol=0.05, in_process=True, timeout=60)
  assert recs[0]['status'] == 'failed' and recs[0]['stage'] == 'compile'
  assert recs[0]['error'] == 'RuntimeError: raw_hash_map<>::at'
  assert recs[1]['status'] == 'ok'


def test_each_probe_in_its_own_process_and_a_dead_process_is_a_crash(monkeypatch):
  rec = probe_tool.probe_in_child('scatter_add', 'base:', 0.05, timeout=120)
  assert rec['status'] == 'ok' and rec['probe'] == 'scatter_add'
  monkeypatch.setattr(probe_tool, '_child_command', lambda *a: [
      sys.executable, '-c', 'import sys; sys.stderr.write("F0000 aborted in the runtime"); sys.exit(134)'])
  rec = probe_tool.probe_in_child('gemm', 'base:', 0.05, timeout=60)
  assert rec == {'probe': 'gemm', 'status': 'crashed', 'rc': 134,
                 'stderr_tail': 'F0000 aborted in the runtime'}
  monkeypatch.setattr(probe_tool, '_child_command', lambda *a: [
      sys.executable, '-c', 'import time; time.sleep(30)'])
  rec = probe_tool.probe_in_child('gemm', 'base:', 0.05, timeout=1)
  assert rec['status'] == 'crashed' and 'no record within 1 s' in rec['error']


def test_a_set_xla_rejects_or_a_malformed_one_names_the_fix():
  with pytest.raises(UserError, match="xla_no_such_option_anywhere.*check the option names"):
    probe_tool.check_option_set('bogus:xla_no_such_option_anywhere=true')
  with pytest.raises(UserError, match='NAME:xla_option=value'):
    probe_tool.check_option_set('bogus:xla_gpu_autotune_level')


@pytest.mark.parametrize('name', sorted(probe_tool.PROBES))
def test_every_probe_builds_a_program_of_its_op_kind(name):
  """Each probe lowers (the op kinds it names are in its program) without running it; one that
  needs another backend (cuDNN attention) lowers its CPU reference."""
  case, backends = probe_tool.PROBES[name]
  fn, args, ref_fn = case(jax.random.key(0))
  runs_here = not backends or jax.default_backend() in backends
  text = jax.jit(fn if runs_here else ref_fn).lower(*args).as_text()
  kind = {'conv': 'convolution', 'gemm': 'dot_general', 'attn': 'dot_general',
          'scatter': 'scatter', 'nearest': 'reduce', 'group': 'reduce'}[name.split('_')[0].rstrip('0123456789x')]
  assert kind in text
  jax.jit(ref_fn).lower(*args)
