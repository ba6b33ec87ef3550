"""Determinism: the same config and seed give bit-identical parameters after N steps in two fresh
processes, and the data order is a function of (seed, step) only (resume-equivalent)."""
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from hita_jax import config_lib
from hita_jax.data.codes import SyntheticCodes
from hita_jax.data.sources import make_image_dataset
from hita_jax.models.gpt import gpt_config_from
from tests.conftest import ROOT

ENV = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
ENV.update(JAX_PLATFORMS='cpu')


def _batches(it, n):
  return [jax.tree.map(np.asarray, next(it)) for _ in range(n)]


def test_image_data_order_depends_on_seed_and_step_only():
  config = config_lib.load_config(f'{ROOT}/configs/tokenizer_v.py:tiny')
  config.data.num_records = 64

  def make(seed):
    it, _ = make_image_dataset(config.data, image_size=config.tokenizer.image_size, global_batch=4,
                               seed=seed, train=True)
    return it
  a = _batches(make(0), 3)
  b = make(0)
  np.testing.assert_array_equal(next(b)['image'], a[0]['image'])  # same seed: same batches
  state = b.get_state()
  c = make(0)  # a fresh iterator set to "after step 1" continues as the uninterrupted one
  c.set_state(state)
  for want in a[1:]:
    np.testing.assert_array_equal(next(c)['image'], want['image'])
  assert not np.array_equal(next(make(1))['image'], a[0]['image'])  # another seed: another order


def test_synthetic_codes_are_a_function_of_seed_and_step():
  cfg = gpt_config_from(config_lib.load_config(f'{ROOT}/configs/hita_b.py:tiny').gpt)
  a = _batches(SyntheticCodes(cfg, 8, 3), 3)
  b = SyntheticCodes(cfg, 8, 3)
  b.set_state({'seed': 3, 'step': 2})
  np.testing.assert_array_equal(next(b)['patch_codes'], a[2]['patch_codes'])
  # two processes of four rows each read the rows of the same global batch
  halves = [next(SyntheticCodes(cfg, 8, 3, i, 2))['patch_codes'] for i in range(2)]
  np.testing.assert_array_equal(np.concatenate(halves), a[0]['patch_codes'])


def _train_ar(workdir, cache=None):
  """3 steps of train_ar; `cache` = the run's config.compilation_cache (the test run's shared
  $JAX_COMPILATION_CACHE_DIR is then dropped, since it would win)."""
  cmd = [sys.executable, '-m', 'hita_jax.main', f'--config={ROOT}/configs/hita_b.py:tiny',
         f'--workdir={workdir}', '--config.train_ar.codes_dir=synthetic', '--config.train_ar.num_steps=3',
         '--config.train_ar.log_every=1']
  env = ENV
  if cache is not None:
    cmd.append(f'--config.compilation_cache={cache}')
    env = {k: v for k, v in ENV.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
    # cache every program however quick, fail on a broken entry, log each hit and miss
    env.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_RAISE_PERSISTENT_CACHE_ERRORS='1',
               JAX_LOG_COMPILES='1', JAX_EXPLAIN_CACHE_MISSES='1')
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  losses = [json.loads(x)['loss'] for x in open(os.path.join(workdir, 'metrics.jsonl'))]
  state = ocp.StandardCheckpointer().restore(os.path.join(workdir, 'checkpoints', '3', 'state'))
  return losses, state, r.stderr


@pytest.mark.slow
def test_train_ar_is_bit_identical_across_fresh_processes(tmp_path):
  """Two fresh processes: the first compiles into its workdir's compilation cache (the default
  config.compilation_cache='workdir'), the second runs from that cache (executables loaded, not
  compiled) and must still give the same bits."""
  l1, s1, log1 = _train_ar(tmp_path / 'a', cache='workdir')
  cache = tmp_path / 'a' / 'compilation_cache'
  entries = sorted(os.listdir(cache))
  assert any(e.startswith('jit_') for e in entries), f'nothing written to the workdir cache: {entries}'
  assert 'PERSISTENT COMPILATION CACHE MISS' in log1 and 'cache hit' not in log1
  l2, s2, log2 = _train_ar(tmp_path / 'b', cache=str(cache))
  assert not os.path.exists(tmp_path / 'b' / 'compilation_cache')
  # every program of the second run came from the cache: hits logged, no miss, no new entry
  hits = re.findall(r"Persistent compilation cache hit for '([^']+)'", log2)
  assert len(hits) >= 3 and 'PERSISTENT COMPILATION CACHE MISS' not in log2, log2[-3000:]
  assert sorted(os.listdir(cache)) == entries
  assert l1 == l2 and len(l1) == 3
  flat1, flat2 = jax.tree_util.tree_leaves_with_path(s1), jax.tree_util.tree_leaves_with_path(s2)
  assert [p for p, _ in flat1] == [p for p, _ in flat2]
  for (path, x), (_, y) in zip(flat1, flat2):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), jax.tree_util.keystr(path)
  assert any('params' in jax.tree_util.keystr(p) for p, _ in flat1)


def test_compilation_cache_setting(tmp_path, monkeypatch):
  """config.compilation_cache: 'workdir' -> <workdir>/compilation_cache, a path as given, '' off;
  $JAX_COMPILATION_CACHE_DIR wins over all of them."""
  import ml_collections
  from hita_jax import config_lib
  old = jax.config.jax_compilation_cache_dir
  try:
    monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR', raising=False)
    cfg = lambda v: ml_collections.ConfigDict({'compilation_cache': v})
    expect = str(tmp_path / 'compilation_cache')
    assert config_lib.setup_compilation_cache(cfg('workdir'), str(tmp_path)) == expect
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'compilation_cache')
    assert config_lib.setup_compilation_cache(cfg('/shared/xla'), str(tmp_path)) == '/shared/xla'
    assert config_lib.setup_compilation_cache(cfg(''), str(tmp_path)) is None
    assert config_lib.setup_compilation_cache(ml_collections.ConfigDict(), str(tmp_path)) is None
    monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', '/from/env')
    assert config_lib.setup_compilation_cache(cfg('workdir'), str(tmp_path)) == '/from/env'
  finally:
    jax.config.update('jax_compilation_cache_dir', old)
