"""MetricLogger's lag mode (train_ar): a due period is written one `log` call later, after the next
step is dispatched, with the same records as writing at once; check() and close() lose nothing."""
import json
import os

import jax.numpy as jnp
import pytest

from hita_jax import training
from hita_jax.errors import NonFiniteError


def _metrics(step, nonfinite=0):
  return {'loss': jnp.float32(step), 'nonfinite': jnp.int32(nonfinite)}


def _records(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  return [json.loads(x) for x in open(path)]


def _logger(workdir, lag, total=7, **kw):
  return training.MetricLogger(str(workdir), total_steps=total, start_step=0, every=3,
                               images_per_step=4, line_keys=('loss',), watch=('loss',), lag=lag, **kw)


def _strip(recs):  # timing differs between runs
  return [{k: v for k, v in r.items() if k not in ('step_time_s', 'images_per_s')} for r in recs]


def test_lag_writes_each_period_one_call_later_with_the_same_records(tmp_path):
  now, lagged = tmp_path / 'now', tmp_path / 'lag'
  a, b = _logger(now, lag=False), _logger(lagged, lag=True)
  for step in range(1, 8):
    bad = int(step == 2)
    wa = a.log(step, _metrics(step, bad))
    wb = b.log(step, _metrics(step, bad))
    assert (wa is not None) == (step in (3, 6, 7))
    # the lagged logger writes step 3's period during step 4's call, 6's during 7's, 7 at once
    assert (wb is not None) == (step in (4, 7))
    assert [r['step'] for r in _records(lagged)] == [s for s in (3, 6, 7) if s < step or s == 7 == step]
  a.close()
  b.close()
  ra, rb = _records(now), _records(lagged)
  assert [r['step'] for r in rb] == [3, 6, 7]
  assert _strip(ra) == _strip(rb)
  assert rb[0]['loss'] == 2.0  # mean of steps 1 and 3: the skipped step 2 is left out
  assert rb[0]['nonfinite_steps'] == 1
  assert all(r['step_time_s'] > 0 for r in rb)


@pytest.mark.parametrize('how', ['check', 'close'])
def test_lag_check_and_close_write_the_waiting_period(tmp_path, how):
  log = _logger(tmp_path, lag=True, total=10)
  for step in range(1, 4):
    log.log(step, _metrics(step))
  assert _records(tmp_path) == []  # step 3 is due but waits for the next call
  getattr(log, how)()
  assert [r['step'] for r in _records(tmp_path)] == [3]
  log.log(4, _metrics(4))  # nothing written twice
  assert [r['step'] for r in _records(tmp_path)] == [3]
  log.close()


def test_lag_still_stops_on_nonfinite_steps_in_a_row(tmp_path):
  log = _logger(tmp_path, lag=True, total=10, max_nonfinite=2)
  log.log(1, _metrics(1))
  log.log(2, _metrics(2, nonfinite=1))
  log.log(3, _metrics(3, nonfinite=1))  # due: waits
  with pytest.raises(NonFiniteError, match='2 steps in a row'):
    log.check()  # before a save: the waiting period's flags are counted


def test_lag_due_step_before_the_last_and_check_between_writes(tmp_path):
  """Step 6 is due and 7 the last (every=3, total=7): step 7's call writes both periods; a check()
  between lagged writes counts each non-finite step once."""
  now, lagged = tmp_path / 'now', tmp_path / 'lag'
  a, b = _logger(now, lag=False), _logger(lagged, lag=True)
  for step in range(1, 8):
    bad = int(step in (4, 5))
    a.log(step, _metrics(step, bad))
    b.log(step, _metrics(step, bad))
    if step == 5:
      a.check()
      b.check()
  assert b.nonfinite_total == a.nonfinite_total == 2
  assert [r['step'] for r in _records(lagged)] == [3, 6, 7]
  assert _strip(_records(now)) == _strip(_records(lagged))
  assert _records(lagged)[1]['loss'] == 6.0  # steps 4 and 5 skipped
