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
  # a dict or list value keeps its commas (XLA option sets as one arm item)
  assert tok_ab.parse_arm("o:train_ar.gpu_compiler_options={'a': True, 'b': 2},x.y=[1, 2],z='p,q'") == (
      'o', ["train_ar.gpu_compiler_options={'a': True, 'b': 2}", 'x.y=[1, 2]', "z='p,q'"])
  with pytest.raises(UserError, match='unbalanced'):
    tok_ab.parse_arm("o:train_ar.gpu_compiler_options={'a': True")
  with pytest.raises(UserError, match='must differ'):
    tok_ab.run_ab([('a', []), ('a', [])], 2, DEMO)
  # the second arm's typo is named before the first arm's build starts
  with pytest.raises(UserError, match="no key 'tokenizer.dinov2_scn'"):
    tok_ab.run_ab([('a', []), ('b', ['tokenizer.dinov2_scn=True'])], 2, DEMO)


@pytest.mark.slow  # ~2.5 min: a build and three compiles of the demo step for a device-side tool
def test_arms_share_a_state_agree_and_are_timed_alternately(tmp_path, monkeypatch):
  """Three arms from one build: the base, a graph switch with a layers switch (the scan and 1x1
  convolutions as products), and `train_tokenizer.step_stages=3` (its programs' convolutions counted
  and their compiles listed)."""
  monkeypatch.setenv('OUT', str(tmp_path))
  tok_ab.main(['--config', DEMO, '--batch', '2', '--steps', '2', '--rounds', '2',
               '--arm', 'base:', '--arm', 'scan:tokenizer.dinov2_scan=True,layers.CONV_1X1=gemm',
               '--arm', 'staged:train_tokenizer.step_stages=3'])
  from hita_jax.models import layers
  assert layers.CONV_1X1 == 'conv'  # the arm's layers switch held for its own trace only
  recs = [json.loads(x) for x in open(tmp_path / 'tok_ab.jsonl')]
  assert [(r['stage'], r['arm']) for r in recs[:3]] == [
      ('compiled', 'base'), ('compiled', 'scan'), ('compiled', 'staged')]
  base, scan, staged, summary = recs[3:]
  assert (base['arm'], scan['arm'], staged['arm']) == ('base', 'scan', 'staged')
  assert scan['set'] == {'tokenizer.dinov2_scan': True, 'layers.CONV_1X1': 'gemm'} and base['set'] == {}
  assert 0 < scan['convolutions'] < base['convolutions']  # its 1x1 convolutions became products
  assert base['compile_cold'] and not scan['compile_cold']
  # the scan stacks weights inside the call, and the products take the 1x1 kernels as they are:
  # same parameters, so one donated state serves all three
  assert scan['shares_state_of'] == 'base' and base['shares_state_of'] is None
  assert scan['abstract_build'] and not base['abstract_build']  # only its graph was made
  assert staged['abstract_build'] and staged['shares_state_of'] == 'base'
  assert len(staged['compile_each_s']) == 3 and staged['convolutions'] == base['convolutions']
  # same state, batch and key: fp32 losses equal up to the programs' different fusions
  assert set(base['first_step']) >= {'g_loss', 'rec_loss'}
  for r in (scan, staged):
    assert all(d < 1e-5 for d in r['loss_abs_diff_vs_first'].values()), r
  for r in (base, scan, staged):
    assert len(r['step_s_rounds']) == 2 and r['step_s'] == min(r['step_s_rounds']) > 0
  assert summary['speedup_vs_first']['base'] == 1.0
  assert summary['speedup_vs_first']['scan'] == pytest.approx(base['step_s'] / scan['step_s'])


@pytest.mark.slow  # ~1 min: two builds of the tiny trainer
def test_a_tokenizer_only_arm_gets_the_graph_a_full_build_makes():
  """An arm differing from the first in parameter-keeping `tokenizer.*` switches reuses the first
  arm's build with its own generator graph: the same graph `train_tokenizer.build` makes for it
  (so the same program), while an arm that changes anything else, or the parameters, is built."""
  import jax
  from hita_jax import config_lib, sharding
  from hita_jax.tasks import train_tokenizer as tt
  from hita_jax.tools.tok_compile import apply_overrides

  def config(*items):
    c = config_lib.load_config(f'{ROOT}/configs/tokenizer_v.py:tiny')
    c.init.allow_random_dinov2 = True
    c.tokenizer_loss.lpips_weights = 'random'
    apply_overrides(c, list(items))
    return c

  mesh = sharding.make_mesh([('data', -1)])
  c0 = config()
  parts0, state0, _, _ = tt.build(c0, mesh)
  c1 = config('tokenizer.dinov2_scan=True', 'tokenizer.cnn_norm_impl=xla')
  derived = tok_ab.tokenizer_only_parts(parts0, state0, c0, c1)
  full, state1, _, _ = tt.build(c1, mesh)
  assert derived.g_def == full.g_def and derived.g_def != parts0.g_def
  assert derived.cfg == full.cfg and derived.d_def == full.d_def
  assert jax.tree.structure(state1) == jax.tree.structure(state0)
  assert tok_ab.tokenizer_only_parts(parts0, state0, c0, config('tokenizer_loss.disc_weight=0.0')) is None
  assert tok_ab.tokenizer_only_parts(parts0, state0, c0, config('tokenizer.num_holistic=8')) is None
