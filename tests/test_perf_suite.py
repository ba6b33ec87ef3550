"""The benchmark suite's report: pairing with the best official variant, targets, doc regeneration."""
import json

import pytest

from hita_jax.tools import perf_suite


def _write(tmp_path, recs):
  path = tmp_path / 'suite.jsonl'
  path.write_text(''.join(json.dumps({'time': '2026-11-29T00:00:00+00:00', **r}) + '\n' for r in recs))
  return str(path)


def test_report_pairs_best_official_and_checks_targets(tmp_path):
  recs = [
      {'side': 'ours', 'kind': 'ar_train', 'model': 'B', 'batch': 64, 'images_s': 1300.0, 'mfu': 0.52},
      {'side': 'official', 'kind': 'ar_train', 'model': 'B', 'batch': 64, 'variant': 'eager', 'images_s': 400.0},
      {'side': 'official', 'kind': 'ar_train', 'model': 'B', 'batch': 64, 'variant': 'compiled', 'images_s': 900.0},
      {'side': 'ours', 'kind': 'ar_train', 'model': 'L', 'batch': 64, 'images_s': 400.0, 'mfu': 0.50},
      {'side': 'official', 'kind': 'ar_train', 'model': 'L', 'batch': 64, 'variant': 'compiled', 'images_s': 300.0},
      {'side': 'ours', 'kind': 'sample', 'size': 'B', 'model': 'B', 'batch': 64, 'images_s': 250.0,
       'jax': '0.x', 'device': 'GPU'},
      {'side': 'official', 'kind': 'sample', 'model': 'B', 'batch': 64, 'variant': 'compiled', 'images_s': 80.0},
      {'side': 'ours', 'kind': 'tok_train', 'model': 'Hita-V', 'batch': 16, 'images_s': 130.0, 'compile_s': 70.0},
      {'side': 'official', 'kind': 'tok_train', 'model': 'Hita-V', 'batch': 16, 'variant': 'eager', 'images_s': 41.0},
      {'side': 'ours', 'kind': 'ar_train', 'model': 'XL', 'batch': 32, 'error': 'boom'},
  ]
  rows, env = perf_suite.table(perf_suite.load([_write(tmp_path, recs)]))
  by = {(r['kind'], r['model']): r for r in rows}
  assert by['ar_train', 'B']['ratio_best'] == pytest.approx(1300 / 900)  # the compiled one is best
  assert by['ar_train', 'B']['met'] is True
  assert by['ar_train', 'L']['met'] is False  # 1.33x but MFU under 55 %
  assert by['sample', 'B']['met'] is True
  assert by['tok_train', 'Hita-V']['met'] is False  # 3.17x eager but compile over 60 s
  assert by['ar_train', 'XL']['met'] is False and by['ar_train', 'XL']['target'] == 'run failed'
  assert env['device'] == 'GPU' and env['date'] == '2026-11-29'


def test_report_regenerates_only_its_section(tmp_path):
  doc = tmp_path / 'PERF.md'
  doc.write_text(f'# P\n\nintro\n\n{perf_suite.BEGIN}\nold table\n{perf_suite.END}\n\nanalysis\n')
  path = _write(tmp_path, [{'side': 'ours', 'kind': 'sample', 'model': 'B', 'batch': 64, 'images_s': 9.0}])
  perf_suite.main(['report', path, '--write', str(doc)])
  text = doc.read_text()
  assert 'old table' not in text and '| sampling GPT-B, CFG 1.5 | 64 | 9.0 |' in text
  assert text.startswith('# P\n\nintro') and text.endswith('analysis\n')
  (tmp_path / 'bare.md').write_text('# no markers\n')
  with pytest.raises(ValueError, match='perf_suite:begin'):
    perf_suite.write_doc(str(tmp_path / 'bare.md'), 'x')


def test_ar_train_records_carry_their_environment(tmp_path, monkeypatch):
  """An `ar_train` record (a `main` subprocess that reports no versions) carries this machine's
  versions, so a lease that measured only training rows still has its environment line."""
  import jax
  env = perf_suite._env()
  assert env['jax'] == jax.__version__ and env['python']
  monkeypatch.setattr(perf_suite, '_sh', lambda cmd, timeout: (1, 'no run here'))
  perf_suite.ours_train(str(tmp_path), 'B', 2)
  rec = json.loads((tmp_path / 'suite.jsonl').read_text().splitlines()[0])
  assert rec['jax'] == jax.__version__ and rec['error'] == 'no run here'
  rows, env = perf_suite.table(perf_suite.load([str(tmp_path / 'suite.jsonl')]))
  assert env['jax'] == jax.__version__


def test_official_specs_without_a_result_are_failed_rows(tmp_path, monkeypatch):
  """An official process that times out before a spec finishes (2026-12-06: the compiled XL past
  290 s) leaves a failed record for that spec, so the report says 'failed' instead of an empty
  column; a spec that finished keeps its figure, and a Python error inside the official script
  shows as failed too."""
  assert perf_suite.official_key('ar_compiled:GPT-XL:32') == 'ar_train_GPT-XL_bs32_compiled'
  assert perf_suite.official_key('sample:GPT-B:64') == 'sample_GPT-B_bs64_cfg1.5'
  assert perf_suite.official_key('tok:16') == 'tok_train_HitaV_bs16'
  assert perf_suite.official_key('ar') is None

  def fake_sh(cmd, timeout, env=None):  # the B spec finished and wrote its result; then the timeout
    (tmp_path / 'bench_official.json').write_text(json.dumps({
        'torch': '2.x', 'ar_train_GPT-B_bs64_compiled': {'images_s': 800.0},
        'sample_GPT-B_bs64_cfg1.5_compiled': {'error': "RuntimeError('boom')"}}))
    return 124, 'timed out after 290.0 s: b""'
  monkeypatch.setattr(perf_suite, '_sh', fake_sh)
  specs = ['ar_compiled:GPT-B:64', 'ar_compiled:GPT-XL:32', 'sample_compiled:GPT-B:64']
  perf_suite.run_official(str(tmp_path), '/nowhere', '/nowhere', specs, timeout=290)
  recs = perf_suite.load([str(tmp_path / 'suite.jsonl')])
  failed = [r for r in recs if r.get('kind') == 'ar_train' and r.get('error')]
  assert [(r['model'], r['batch'], r['variant']) for r in failed] == [('XL', 32, 'compiled')]
  assert 'rc 124' in failed[0]['error'] and 'timed out' in failed[0]['error']
  recs += [{'side': 'ours', 'kind': 'ar_train', 'model': m, 'batch': b, 'images_s': x, 'mfu': 0.45}
           for m, b, x in (('B', 64, 1000.0), ('XL', 32, 159.0))]
  recs.append({'side': 'ours', 'kind': 'sample', 'model': 'B', 'batch': 64, 'images_s': 116.0})
  rows, _ = perf_suite.table(recs)
  by = {(r['kind'], r['model']): r for r in rows}
  assert by['ar_train', 'B']['ratio_best'] == pytest.approx(1000 / 800)
  assert by['ar_train', 'XL']['compiled'] is None and by['ar_train', 'XL']['compiled_error']
  assert by['sample', 'B']['compiled_error'] and by['sample', 'B']['met'] is False
  text = perf_suite.markdown(rows, {k: None for k in ('date', 'device', 'jax', 'flax', 'optax',
                                                      'python', 'torch')}, 'cmd')
  assert '| AR train GPT-XL | 32 | 159.0 | 45.0% | — | failed | — |' in text
  assert '| sampling GPT-B, CFG 1.5 | 64 | 116.0 | — | — | failed | — |' in text


def test_ar_train_overrides_reach_main_and_mark_the_row(tmp_path, monkeypatch):
  """`run ours --set KEY=VALUE` passes the change to `main` as --config.KEY=VALUE, keeps it in the
  record, and the report names it (the row is not the shipped config); a key the config lacks
  stops before any run."""
  seen = []
  monkeypatch.setattr(perf_suite, '_sh', lambda cmd, timeout: (seen.append(cmd), (1, 'no run'))[1])
  perf_suite.main(['run', 'ours', '--out', str(tmp_path), '--only', 'ar_train:B:64',
                   '--set', 'gpt.attn_impl=pallas'])
  assert seen and '--config.gpt.attn_impl=pallas' in seen[0]
  path = str(tmp_path / 'suite.jsonl')
  rec = json.loads(open(path).read().splitlines()[0])
  assert rec['set'] == ['gpt.attn_impl=pallas']
  with open(path, 'w') as f:
    f.write(json.dumps({**rec, 'images_s': 100.0, 'mfu': 0.4, 'time': '2026-12-06T00:00:00+00:00'}) + '\n')
  rows, env = perf_suite.table(perf_suite.load([path]))
  assert '(not shipped: gpt.attn_impl=pallas)' in perf_suite.markdown(rows, env, 'cmd')
  with pytest.raises(perf_suite.UserError, match='gpt.no_such_key'):
    perf_suite.main(['run', 'ours', '--out', str(tmp_path), '--only', 'ar_train:B:64',
                     '--set', 'gpt.no_such_key=1'])
