"""The `evaluate` task end to end through `hita_jax.main`, plus the tokenizer-metric helpers."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from hita_jax.data import images
from hita_jax.metrics import image as image_metrics
from tests.conftest import ROOT


def _main(*args):
  r = subprocess.run([sys.executable, '-m', 'hita_jax.main', *args], cwd=ROOT, capture_output=True,
                     text=True)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  return r


def test_generation_metrics_end_to_end(tmp_path):
  r = np.random.RandomState(0)
  ref = r.randint(0, 256, (10, 32, 32, 3)).astype(np.uint8)
  sample = np.clip(ref.astype(int) + r.randint(-40, 40, ref.shape), 0, 255).astype(np.uint8)[:8]
  np.savez(tmp_path / 'ref.npz', arr_0=ref)
  np.savez(tmp_path / 'samples.npz', arr_0=sample, label=np.arange(8))
  _main(f'--config={ROOT}/configs/evaluate.py', f'--workdir={tmp_path}/w',
        f'--config.evaluate.sample_npz={tmp_path}/samples.npz',
        f'--config.evaluate.ref_npz={tmp_path}/ref.npz',
        '--config.evaluate.inception_weights=random', '--config.evaluate.batch_size=8')
  res = json.load(open(tmp_path / 'w' / 'eval_results.json'))
  assert res['num_samples'] == 8 and res['num_reference'] == 10
  for k in ('fid', 'sfid', 'precision', 'recall'):
    assert np.isfinite(res[k]), k
  assert os.path.exists(tmp_path / 'w' / 'config.json')
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path / 'w'))


def test_main_rejects_unknown_key_and_unavailable_task(tmp_path):
  r = subprocess.run([sys.executable, '-m', 'hita_jax.main', f'--config={ROOT}/configs/evaluate.py',
                      f'--workdir={tmp_path}', '--config.evaluate.sampel_npz=x'], cwd=ROOT,
                     capture_output=True, text=True)
  assert r.returncode != 0 and 'sampel_npz' in r.stderr
  r = subprocess.run([sys.executable, '-m', 'hita_jax.main', f'--config={ROOT}/configs/evaluate.py',
                      f'--workdir={tmp_path}', '--config.evaluate.mode=generation'], cwd=ROOT,
                     capture_output=True, text=True)
  assert r.returncode != 0 and 'sample_npz' in (r.stderr + r.stdout)


def test_tokenizer_metrics_on_a_folder_with_a_corrupt_file(tmp_path):
  d = tmp_path / 'images' / 'class_a'
  d.mkdir(parents=True)
  r = np.random.RandomState(1)
  for i in range(3):
    Image.fromarray(r.randint(0, 256, (80, 100, 3)).astype(np.uint8)).save(d / f'{i}.png')
  (d / 'broken.jpg').write_bytes(b'not an image')
  out = _main(f'--config={ROOT}/configs/evaluate.py:mode=tokenizer,tiny', f'--workdir={tmp_path}/w',
              f'--config.evaluate.images={tmp_path}/images', '--config.evaluate.inception_weights=random',
              '--config.evaluate.batch_size=8', '--config.evaluate.tokenizer_batch_size=2')
  assert 'skipped unreadable image' in out.stdout and '1 of 4 files were skipped' in out.stdout
  res = json.load(open(tmp_path / 'w' / 'eval_results.json'))
  assert res['num_images'] == 3
  assert 0 < res['patch_codebook_usage'] <= 1 and 0 < res['holistic_codebook_usage'] <= 1
  assert np.isfinite(res['psnr']) and -1 <= res['ssim_data_range_2'] <= 1


def test_center_crop_matches_adm():
  img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (500, 700, 3)).astype(np.uint8))
  out = images.center_crop_arr(img, 64)
  assert out.shape == (64, 64, 3) and out.dtype == np.uint8


def test_psnr_ssim_match_skimage():
  metrics = pytest.importorskip('skimage.metrics', reason='scikit-image not installed')
  r = np.random.RandomState(0)
  a = r.rand(40, 48, 3).astype(np.float32)
  b = np.clip(a + r.randn(*a.shape).astype(np.float32) * 0.05, 0, 1)
  assert image_metrics.psnr(a, b) == pytest.approx(metrics.peak_signal_noise_ratio(a, b), rel=1e-5)
  ref = metrics.structural_similarity(a, b, data_range=2.0, channel_axis=-1)
  assert image_metrics.ssim(a, b, data_range=2.0) == pytest.approx(ref, rel=1e-4)
