"""AR training: code extraction, pre-extracted == on-the-fly, 1 vs 8 devices, SIGKILL resume."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hita_jax import config_lib, sharding
from hita_jax.checkpoint import save_params
from hita_jax.data import codes, sources
from hita_jax.pretrained import TOKENIZER_EXPORT_FILTER as EXPORT_FILTER
from hita_jax.models.tokenizer import Tokenizer
from hita_jax.tasks import train_ar as ar
from hita_jax.errors import UserError
from tests.conftest import ROOT

ENV = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
ENV.update(JAX_PLATFORMS='cpu', JAX_DISABLE_MOST_OPTIMIZATIONS='1')


@pytest.fixture(scope='module')
def tokenizer_export(tmp_path_factory):
  d = tmp_path_factory.mktemp('tok')
  config = config_lib.load_config(f'{ROOT}/configs/hita_b.py:tiny')
  tok = Tokenizer(config_lib.tokenizer_config_from(config.tokenizer), rngs=nnx.Rngs(0))
  save_params(str(d / 'export'), tok, filt=EXPORT_FILTER, config={})
  return str(d / 'export')


@pytest.fixture(scope='module')
def codes_dir(tokenizer_export, tmp_path_factory):
  w = tmp_path_factory.mktemp('extract')
  r = subprocess.run([sys.executable, '-m', 'hita_jax.main', f'--config={ROOT}/configs/hita_b.py:tiny',
                      f'--workdir={w}', '--config.task=extract_codes',
                      f'--config.init.tokenizer={tokenizer_export}', '--config.extract_codes.max_examples=48',
                      '--config.extract_codes.examples_per_shard=32', '--config.extract_codes.views=flip'],
                     cwd=ROOT, env=ENV, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-3000:]
  return str(w / 'codes')


def _config(tokenizer_export, codes=''):
  config = config_lib.load_config(f'{ROOT}/configs/hita_b.py:tiny')
  config.init.tokenizer = tokenizer_export
  config.train_ar.codes_dir = codes
  config.train_ar.global_batch_size = 8
  return config


def test_extraction_writes_shards_and_manifest(codes_dir):
  files = sorted(os.listdir(codes_dir))
  assert files == ['codes-00000-00000.array_record', 'codes-00000-00001.array_record', 'manifest.json']
  src = codes.CodesSource(codes_dir)
  assert len(src) == 48  # one record per image, holding the image and its mirror image
  rec = src[0]
  assert rec['holistic_codes'].shape == (2, 16) and rec['patch_codes'].shape == (2, 64)
  manifest = json.load(open(os.path.join(codes_dir, 'manifest.json')))
  assert manifest['views'] == 'flip' and manifest['num_views'] == 2
  assert manifest['tokenizer_checkpoint'].endswith('export')


def test_pre_extracted_and_on_the_fly_agree(tokenizer_export, codes_dir):
  config = _config(tokenizer_export)
  mesh = sharding.make_mesh([('data', 1)], jax.devices()[:1])
  parts, state, tok_state = ar.build(config, mesh)
  source = sources.make_source(config.data)
  dec = sources.DecodeAugment(source, config.tokenizer.image_size, train=False)
  items = [dec.random_map((source[i], i), np.random.default_rng(0)) for i in range(8)]
  images = np.stack([it['image'] for it in items])
  labels = np.asarray([it['label'] for it in items], np.int32)
  src = codes.CodesSource(codes_dir)  # the first 8 records are these 8 images, in order
  pre = {k: np.stack([src[i][k][0] for i in range(8)]) for k in ('holistic_codes', 'patch_codes')}
  fly = jax.jit(lambda b: ar.codes_from_batch(parts, tok_state, b))(
      {'image': jnp.asarray(images), 'label': jnp.asarray(labels)})
  np.testing.assert_array_equal(np.asarray(fly[1]), pre['holistic_codes'])
  np.testing.assert_array_equal(np.asarray(fly[2]), pre['patch_codes'])
  step = jax.jit(lambda s, b: ar.train_step(parts, config, s, tok_state, b, jax.random.key(0)))
  _, m_fly = step(jax.tree.map(jnp.copy, state), {'image': jnp.asarray(images), 'label': jnp.asarray(labels)})
  _, m_pre = step(state, {'label': jnp.asarray(labels), 'holistic_codes': jnp.asarray(pre['holistic_codes']),
                          'patch_codes': jnp.asarray(pre['patch_codes'])})
  assert float(m_fly['loss']) == float(m_pre['loss'])


def _one_step(config, mesh, batch):
  parts, state, _ = ar.build(config, mesh)
  rules = [tuple(r) for r in config.logical_axis_rules]
  b = {k: jax.device_put(v, sharding.batch_sharding(mesh, rules, v.ndim)) for k, v in batch.items()}
  state, m = jax.jit(lambda s, b: ar.train_step(parts, config, s, None, b, jax.random.key(0)))(state, b)
  return jax.device_get(m), jax.device_get(state['params'])


@pytest.mark.parametrize('axes', [[('data', -1)], [('data', 1), ('fsdp', -1)],
                                  [('data', 1), ('fsdp', 4), ('tensor', 2)]],
                         ids=['dp', 'fsdp', 'fsdp_tensor'])
def test_one_step_on_1_and_8_devices_agree(tokenizer_export, codes_dir, axes):
  config = _config(tokenizer_export, codes_dir)
  config.train_ar.adam_eps = 1e-3  # see test_tokenizer_training: keeps Adam's first step smooth in g
  src = codes.CodesSource(codes_dir)
  recs = [codes.pick_view(src[i], np.random.default_rng(i)) for i in range(8)]
  batch = {k: np.stack([r[k] for r in recs]).astype(np.int32)
           for k in ('label', 'holistic_codes', 'patch_codes')}
  m1, p1 = _one_step(config, sharding.make_mesh([('data', 1)], jax.devices()[:1]), batch)
  m8, p8 = _one_step(config, sharding.make_mesh(axes), batch)
  for k in m1:
    assert float(m8[k]) == pytest.approx(float(m1[k]), rel=1e-5, abs=1e-6), k
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def _cmd(w, tok, codes, steps):
  return [sys.executable, '-m', 'hita_jax.main', f'--config={ROOT}/configs/hita_b.py:tiny',
          f'--workdir={w}', f'--config.init.tokenizer={tok}', f'--config.train_ar.codes_dir={codes}',
          f'--config.train_ar.num_steps={steps}', '--config.train_ar.log_every=1', '--config.train_ar.ckpt_every=3',
          '--config.train_ar.global_batch_size=8']


def test_resume_after_sigkill(tokenizer_export, codes_dir, tmp_path):
  ref = str(tmp_path / 'ref')
  r = subprocess.run(_cmd(ref, tokenizer_export, codes_dir, 6), cwd=ROOT, env=ENV, capture_output=True,
                     text=True)
  assert r.returncode == 0, r.stderr[-3000:]
  assert os.path.exists(os.path.join(ref, 'export', 'ema', 'config.json'))
  w = str(tmp_path / 'killed')
  p = subprocess.Popen(_cmd(w, tokenizer_export, codes_dir, 1000), cwd=ROOT, env=ENV,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt = os.path.join(w, 'checkpoints', '3')
  deadline = time.time() + 300
  while not os.path.isdir(ckpt) and time.time() < deadline and p.poll() is None:
    time.sleep(0.3)
  time.sleep(1.0)
  p.send_signal(signal.SIGKILL)
  p.wait()
  r = subprocess.run(_cmd(w, tokenizer_export, codes_dir, 6), cwd=ROOT, env=ENV, capture_output=True,
                     text=True)
  assert r.returncode == 0, r.stderr[-3000:]
  resumed = int(r.stdout.split('resumed from step ')[1].split()[0])
  read = lambda d: {x['step']: x for x in map(json.loads, open(os.path.join(d, 'metrics.jsonl')))}
  a, b = read(ref), read(w)
  for step in range(resumed + 1, 7):
    assert b[step]['loss'] == pytest.approx(a[step]['loss'], rel=1e-5), step


def test_synthetic_codes_checkpoint_and_resume(tmp_path):
  """`codes_dir=synthetic` (the throughput source) saves its iterator with the train state at the
  final step and a longer run resumes from it with the batches an uninterrupted run would draw."""
  from hita_jax import config_lib
  from hita_jax.data.codes import SyntheticCodes
  from hita_jax.models.gpt import gpt_config_from
  from hita_jax.tasks import train_ar
  config = config_lib.load_config(f'{ROOT}/configs/hita_b.py:tiny')
  config.train_ar.codes_dir = 'synthetic'
  config.train_ar.num_steps = 2
  config.train_ar.log_every = 1
  train_ar.run(config, str(tmp_path))
  config.train_ar.num_steps = 3
  state = train_ar.run(config, str(tmp_path))
  assert int(state['step']) == 3
  lines = [json.loads(x) for x in open(tmp_path / 'metrics.jsonl')]
  assert [x['step'] for x in lines if 'loss' in x] == [1, 2, 3]
  cfg = gpt_config_from(config.gpt)
  a, b = SyntheticCodes(cfg, 4, 7), SyntheticCodes(cfg, 4, 7)
  first = [next(a) for _ in range(3)]
  b.set_state({'seed': 7, 'step': 2})
  np.testing.assert_array_equal(next(b)['patch_codes'], first[2]['patch_codes'])
  with pytest.raises(ValueError, match='seed'):
    b.set_state({'seed': 8, 'step': 0})


def test_lr_decay_options():
  """`train_ar.lr_decay`: the official constant LR, or cosine to 0 at the last step (with an optional
  warm-up); anything else is named before a model is built."""
  config = config_lib.load_config(f'{ROOT}/configs/hita_b.py:tiny')
  tr = config.train_ar
  assert ar.learning_rate(tr) == tr.lr  # the official schedule stays a constant
  tr.num_steps, tr.lr_decay, tr.warmup_steps = 100, 'cosine', 10
  sched = ar.learning_rate(tr)
  assert float(sched(0)) == 0.0 and float(sched(10)) == pytest.approx(tr.lr)
  assert float(sched(55)) == pytest.approx(tr.lr / 2, rel=1e-3) and float(sched(100)) == pytest.approx(0.0, abs=1e-12)
  tr.codes_dir = 'synthetic'
  tr.lr_decay = 'linear'
  with pytest.raises(UserError, match='train_ar.lr_decay'):
    ar.validate(config)
