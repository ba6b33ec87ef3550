"""hita_jax.tools.tok_ab: tokenizer-trainer switches timed alternately in one process."""
import json

import pytest

from hita_jax.errors import UserError
from hita_jax.tools import tok_ab
from tests.conftest import ROOT

DEMO = f'{ROOT}/configs/demo.py:fast'


def test_arms_parse_and_bad_ones_fail_before_any_build():
  assert tok_ab.parse_arm('base:') == ('base', [])
  assert tok_ab.parse_arm('new:tokenizer.attn_impl=auto,tokenizer.dinov2_scan=True') == (
      'new', ['tokenizer.attn_impl=auto', 'tokenizer.dinov2_scan=True'])
  with pytest.raises(UserError, match='NAME:KEY=VALUE'):
    tok_ab.parse_arm('tokenizer.dinov2_scan=True')
  with pytest.raises(UserError, match='must differ'):
    tok_ab.run_ab([('a', []), ('a', [])], 2, DEMO)
  # the second arm's typo is named before the first arm's build starts
  with pytest.raises(UserError, match="no key 'tokenizer.dinov2_scn'"):
    tok_ab.run_ab([('a', []), ('b', ['tokenizer.dinov2_scn=True'])], 2, DEMO)


@pytest.mark.slow  # ~2 min: two builds and compiles of the demo step for a device-side tool
def test_two_arms_share_a_state_agree_and_are_timed_alternately(tmp_path, monkeypatch):
  monkeypatch.setenv('OUT', str(tmp_path))
  tok_ab.main(['--config', DEMO, '--batch', '2', '--steps', '2', '--rounds', '2',
               '--arm', 'base:', '--arm', 'scan:tokenizer.dinov2_scan=True'])
  recs = [json.loads(x) for x in open(tmp_path / 'tok_ab.jsonl')]
  base, scan, summary = recs
  assert (base['arm'], scan['arm']) == ('base', 'scan')
  assert scan['set'] == {'tokenizer.dinov2_scan': True} and base['set'] == {}
  assert base['compile_cold'] and not scan['compile_cold']
  # the scan stacks weights inside the call: same parameters, so one donated state serves both
  assert scan['shares_state_of'] == 'base' and base['shares_state_of'] is None
  # same state, batch and key: fp32 losses equal up to the programs' different fusions
  assert set(base['first_step']) >= {'g_loss', 'rec_loss'}
  assert all(d < 1e-5 for d in scan['loss_abs_diff_vs_first'].values()), scan
  for r in (base, scan):
    assert len(r['step_s_rounds']) == 2 and r['step_s'] == min(r['step_s_rounds']) > 0
  assert summary['speedup_vs_first']['base'] == 1.0
  assert summary['speedup_vs_first']['scan'] == pytest.approx(base['step_s'] / scan['step_s'])
