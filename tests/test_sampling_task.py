"""The `sample` task: ADM-compatible .npz, and resume after SIGKILL without lost or duplicated images."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
from flax import nnx

from hita_jax import config_lib
from hita_jax.data import images
from hita_jax.checkpoint import save_params
from hita_jax.pretrained import TOKENIZER_EXPORT_FILTER as EXPORT_FILTER
from hita_jax.models.gpt import GPT, gpt_config_from
from hita_jax.models.tokenizer import Tokenizer
from tests.conftest import ROOT

ENV = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
ENV.update(JAX_PLATFORMS='cpu', JAX_DISABLE_MOST_OPTIMIZATIONS='1')


def _exports(tmp_path):
  config = config_lib.load_config(f'{ROOT}/configs/hita_b.py:tiny')
  tok = Tokenizer(config_lib.tokenizer_config_from(config.tokenizer), rngs=nnx.Rngs(0))
  save_params(str(tmp_path / 'tok'), tok, filt=EXPORT_FILTER, config={})
  gpt = GPT(gpt_config_from(config.gpt), rngs=nnx.Rngs(1))
  gpt.head[...] = jax.random.normal(jax.random.key(2), gpt.head.shape) * 0.5
  save_params(str(tmp_path / 'gpt'), gpt, config={'sample': {'legacy_pos128_embedding': False}})
  return str(tmp_path / 'tok'), str(tmp_path / 'gpt')


def _cmd(workdir, tok, gpt, n):
  return [sys.executable, '-m', 'hita_jax.main', f'--config={ROOT}/configs/hita_b.py:tiny',
          f'--workdir={workdir}', '--config.task=sample', f'--config.init.tokenizer={tok}',
          f'--config.init.gpt={gpt}', f'--config.sample.num_images={n}',
          '--config.sample.per_device_batch=3', '--config.sample.eval_size=32']


def test_sample_npz_and_resume_after_kill(tmp_path):
  tok, gpt = _exports(tmp_path)
  ref = str(tmp_path / 'ref')
  r = subprocess.run(_cmd(ref, tok, gpt, 10), cwd=ROOT, env=ENV, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-3000:]
  arr = images.read_images_npz(os.path.join(ref, 'samples.npz'))  # the ADM reader's checks
  assert arr.shape == (10, 32, 32, 3) and arr.dtype == np.uint8
  with np.load(os.path.join(ref, 'samples.npz')) as z:
    assert sorted(z.files) == ['arr_0', 'arr_1'] and z['arr_1'].shape == (10,)
    ref_imgs, ref_labels = z['arr_0'], z['arr_1']
  assert len(os.listdir(os.path.join(ref, 'samples', 'png'))) == 10
  w = str(tmp_path / 'killed')
  p = subprocess.Popen(_cmd(w, tok, gpt, 10), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
  first = os.path.join(w, 'samples', 'chunks', 'chunk_000000.npz')
  deadline = time.time() + 300
  while not os.path.exists(first) and time.time() < deadline and p.poll() is None:
    time.sleep(0.2)
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert os.path.exists(first)
  r = subprocess.run(_cmd(w, tok, gpt, 10), cwd=ROOT, env=ENV, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-3000:]
  with np.load(os.path.join(w, 'samples.npz')) as z:
    np.testing.assert_array_equal(z['arr_1'], ref_labels)
    np.testing.assert_array_equal(z['arr_0'], ref_imgs)
  # stage times summed over the killed run and its resumption (written after every chunk)
  t = json.load(open(os.path.join(w, 'sample_timings.json')))
  resumed = t['this_run']['images']
  assert 0 < resumed < 10
  assert 0 < t['this_run']['first_chunk_generate_s'] <= t['this_run']['generate_s']
  if t['runs'] == 2:    # the killed run recorded its chunk(s) before the kill
    assert t['images'] == 10 and t['generate_s'] > t['this_run']['generate_s']
  else:                 # killed between its chunk and the timings file
    assert t['runs'] == 1 and t['images'] == resumed
  # classes drawn at random, as test_net.py (the default), from the sample seed
  from hita_jax.tasks.sample import labels_for
  np.testing.assert_array_equal(ref_labels, labels_for(10, 10, 'random', 0))


def test_balanced_classes_are_one_value_away():
  from hita_jax.tasks.sample import labels_for
  assert sorted(labels_for(20, 10, 'balanced', 3).tolist()) == sorted(list(range(10)) * 2)
  r = labels_for(1000, 10, 'random', 3)
  assert r.min() >= 0 and r.max() < 10 and len(set(np.bincount(r, minlength=10))) > 1
