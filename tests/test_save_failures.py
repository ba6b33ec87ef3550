"""Disk full / unwritable workdir: a failing write stops with a message naming the path, and the
previous checkpoint or export stays intact and restorable (a failing writer: the Orbax handler
raises ENOSPC as a full disk does)."""
import errno
import os

import grain
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from hita_jax import checkpoint
from hita_jax.errors import SaveError


def _disk_full(*a, **k):
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _data():
  return iter(grain.MapDataset.range(100).batch(2).to_iter_dataset())


def test_failing_train_state_save_names_the_path_and_keeps_the_previous_one(tmp_path, monkeypatch):
  d = str(tmp_path / 'checkpoints')
  mngr = checkpoint.checkpoint_manager(d, every=1, keep=3)
  it = _data()
  state = {'w': jnp.arange(4.0), 'step': jnp.asarray(1, jnp.int32)}
  next(it)
  checkpoint.save_train_state(mngr, 1, state, it)
  checkpoint.finish_saves(mngr)
  with monkeypatch.context() as m:
    m.setattr(ocp.StandardCheckpointHandler, 'async_save', _disk_full)
    with pytest.raises(SaveError, match=rf'cannot write the checkpoint of step 2 under {d}: .*No space left '
                                        r'.*step 1 is intact'):
      checkpoint.save_train_state(mngr, 2, {'w': jnp.zeros(4), 'step': jnp.asarray(2, jnp.int32)}, it)
      checkpoint.finish_saves(mngr)
  mngr.close()
  fresh = checkpoint.checkpoint_manager(d, every=1, keep=3)
  it2 = _data()
  restored, step = checkpoint.resume(fresh, {'w': jnp.zeros(4), 'step': jnp.asarray(0, jnp.int32)}, it2)
  assert step == 1 and int(restored['step']) == 1
  np.testing.assert_array_equal(np.asarray(restored['w']), np.arange(4.0))
  np.testing.assert_array_equal(next(it2), next(it))  # the data iterator resumes where it was


class _Tiny(nnx.Module):
  def __init__(self, value):
    self.w = nnx.Param(jnp.full((3,), value))


def test_failing_export_names_the_path_and_keeps_the_previous_export(tmp_path, monkeypatch):
  d = str(tmp_path / 'export')
  checkpoint.save_params(d, _Tiny(1.0), config={'v': 1})
  with monkeypatch.context() as m:
    m.setattr(ocp.StandardCheckpointer, 'save', _disk_full)
    with pytest.raises(SaveError, match=rf'cannot write the params export {d}: .*No space left.*unchanged'):
      checkpoint.save_params(d, _Tiny(2.0), config={'v': 2}, overwrite=True)
  got = checkpoint.load_params(d, _Tiny(0.0))
  np.testing.assert_array_equal(np.asarray(got.w[...]), np.ones(3))
  assert checkpoint.read_export_config(d)['config'] == {'v': 1}
  assert sorted(os.listdir(tmp_path)) == ['export']  # nothing half-written left beside it
  checkpoint.save_params(d, _Tiny(2.0), config={'v': 2}, overwrite=True)  # and a later write succeeds
  np.testing.assert_array_equal(np.asarray(checkpoint.load_params(d, _Tiny(0.0)).w[...]), np.full(3, 2.0))
