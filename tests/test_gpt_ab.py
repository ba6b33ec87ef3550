"""hita_jax.tools.gpt_ab: GPT switches timed alternately in one process on one set of weights."""
import pytest

from hita_jax.errors import UserError
from hita_jax.tools import gpt_ab
from tests.test_gpt import tiny_cfg


@pytest.mark.slow  # ~30 s: two compiles of a training step for a device-side tool
def test_two_arms_on_a_tiny_gpt():
  base = tiny_cfg(token_dropout=0.1, resid_dropout=0.1, ffn_dropout=0.1, dropout_rng='threefry')
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


@pytest.mark.slow  # ~40 s: two tiny train_ar builds and compiles on the CPU
def test_trainer_arms_time_train_ars_own_step(monkeypatch):
  """--trainer: each arm is train_ar's jitted step under config overrides; the first step of each
  runs on the same state, batch and key (hash and Threefry masks: nearby, different gradients).
  An arm whose XLA options do not compile is reported and left out; the others are timed."""
  from hita_jax import config_lib
  config = config_lib.hita_recipe('B', 'tiny')
  # the options reach the CPU compiler too, so an unknown one fails the third arm's compile
  monkeypatch.setattr(config_lib, 'gpu_compiler_options', lambda o: dict(o) if o else None)
  recs = gpt_ab.run_trainer_ab([('base', []), ('threefry', ['gpt.dropout_rng=threefry']),
                                ('bad', ["train_ar.gpu_compiler_options={'no_such_xla_option': 1, 'x': 2}"])],
                               'B', 16, steps=1, rounds=2, config=config)
  a, b, bad, summary = recs
  assert bad['arm'] == 'bad' and 'no_such_xla_option' in bad['failed'] and 'step_s' not in bad
  assert set(summary['step_s']) == {'base', 'threefry'}
  assert (a['set'], b['set']) == ({}, {'gpt.dropout_rng': 'threefry'}) and a['trainer'] and summary['trainer']
  for r in (a, b):
    assert len(r['step_s_rounds']) == 2 and r['step_s'] > 0 and r['mfu'] > 0
    assert r['last_loss'] == r['last_loss'] and r['compile_s'] > 0
  diff = b['first_step_abs_diff_vs_first']
  assert 1e-5 < diff['grad_norm'] < 0.5 * a['first_step']['grad_norm']
  # the caller's config is left as it was
  assert (config.gpt.dropout_rng, config.train_ar.codes_dir, config.train_ar.global_batch_size) == ('hash', '', 8)


def test_trainer_arms_name_a_bad_key():
  from hita_jax import config_lib
  config = config_lib.hita_recipe('B', 'tiny')
  with pytest.raises(UserError, match="--arm 'gpt.dropout_rgn=hash': the config has no key 'gpt.dropout_rgn'"):
    gpt_ab.run_trainer_ab([('a', []), ('b', ['gpt.dropout_rgn=hash'])], 'B', 4, config=config)
  with pytest.raises(UserError, match='gpt.token_dropout is set by train_ar .* train_ar.token_dropout='):
    gpt_ab.run_trainer_ab([('a', []), ('b', ['gpt.token_dropout=0.0'])], 'B', 4, config=config)
  assert config.train_ar.codes_dir == ''
