"""Reshard restore (#13): a train_ar checkpoint written on 8 devices (FSDP) restores onto 4 devices,
1 device (sub-meshes here) with identical parameters and the same next-step loss. (Onto 2
processes x 4 devices: tests/test_multiprocess.py.)"""
import functools

import jax
import numpy as np
import pytest

from hita_jax import checkpoint, config_lib, sharding, training
from hita_jax.data.codes import SyntheticCodes
from hita_jax.data.sources import make_image_dataset
from hita_jax.tasks import train_ar as ar
from tests.conftest import ROOT


def _config():
  config = config_lib.load_config(f'{ROOT}/configs/hita_b.py:tiny')
  config.train_ar.codes_dir = 'synthetic'  # no tokenizer: the batch below is fixed codes
  config.train_ar.global_batch_size = 8
  return config


def _step(config, mesh, state, parts, batch):
  rules = config_lib.axis_rules(config)
  sh = {k: sharding.batch_sharding(mesh, rules, v.ndim) for k, v in batch.items()}
  step = jax.jit(functools.partial(ar.train_step, parts, config))
  return step(state, None, training.global_batch(batch, sh), jax.random.key(0))


@pytest.mark.slow
def test_fsdp8_checkpoint_restores_on_4_and_1_devices(tmp_path):
  config = _config()
  data = lambda: make_image_dataset(config.data, image_size=64, global_batch=8, seed=0)[0]
  mesh8 = sharding.make_mesh('data=1,fsdp=8,tensor=1')
  parts, state, _ = ar.build(config, mesh8)
  batch = next(SyntheticCodes(parts.cfg, 8, seed=1))
  state, _ = _step(config, mesh8, state, parts, batch)  # moments and EMA away from their init
  mngr = checkpoint.checkpoint_manager(str(tmp_path / 'ckpt'), every=1, keep=1, async_save=False)
  checkpoint.save_train_state(mngr, 1, state, data())
  mngr.wait_until_finished()
  saved = sharding.to_host(state)
  _, want = _step(config, mesh8, state, parts, batch)
  sharded_over_8 = [x for x in jax.tree.leaves(state['params']) if len(x.sharding.device_set) == 8
                    and not x.sharding.is_fully_replicated]
  assert sharded_over_8  # the checkpoint really is FSDP-sharded
  for n, axes in ((4, 'data=1,fsdp=4,tensor=1'), (1, 'data=1,fsdp=1,tensor=1')):
    mesh = sharding.make_mesh(axes, jax.devices()[:n])
    parts_n, fresh, _ = ar.build(config, mesh)
    restored, step = checkpoint.resume(mngr, fresh, data())
    assert step == 1
    for x in jax.tree.leaves(restored):
      assert x.sharding.mesh == mesh, f'{n} devices: an array was not placed on the target mesh'
    jax.tree.map(np.testing.assert_array_equal, sharding.to_host(restored), saved)
    _, got = _step(config, mesh, restored, parts_n, batch)
    for k in ('loss', 'grad_norm'):
      np.testing.assert_allclose(float(got[k]), float(want[k]), rtol=1e-5, err_msg=f'{n} devices: {k}')
