"""hita_jax.tools.gpt_ab: GPT switches timed alternately in one process on one set of weights."""
import pytest

from hita_jax.errors import UserError
from hita_jax.tools import gpt_ab
from tests.test_gpt import tiny_cfg


@pytest.mark.slow  # ~30 s: two compiles of a training step for a device-side tool
def test_two_arms_on_a_tiny_gpt():
  base = tiny_cfg(token_dropout=0.1, resid_dropout=0.1, ffn_dropout=0.1)
  recs = gpt_ab.run_ab([('base', []), ('hash', ['dropout_rng=hash'])], 'B', 2, steps=1, rounds=2, base=base)
  a, b, summary = recs
  assert (a['arm'], b['arm'], a['set'], b['set']) == ('base', 'hash', {}, {'dropout_rng': 'hash'})
  for r in (a, b):
    assert len(r['step_s_rounds']) == 2 and r['step_s'] == min(r['step_s_rounds']) > 0
    assert r['last_loss'] == r['last_loss'] and r['mfu'] > 0  # finite
  assert summary['speedup_vs_first'] == {'base': 1.0, 'hash': pytest.approx(a['step_s'] / b['step_s'])}


def test_bad_arms_are_named():
  base = tiny_cfg()
  with pytest.raises(UserError, match='GPTConfig field'):
    gpt_ab.run_ab([('a', []), ('b', ['dropout_rgn=hash'])], 'B', 2, base=base)
  with pytest.raises(UserError, match='dropout_rng must be one of'):
    gpt_ab.run_ab([('a', []), ('b', ['dropout_rng=philox'])], 'B', 2, base=base)
  with pytest.raises(UserError, match='changes the parameters'):
    gpt_ab.run_ab([('a', []), ('b', ['n_layer=3'])], 'B', 2, base=base)
  with pytest.raises(UserError, match='must differ'):
    gpt_ab.run_ab([('a', []), ('a', [])], 'B', 2, base=base)
