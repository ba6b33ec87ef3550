"""The tfds path that ImageNet training takes (`data.source=tfds`), end to end on a tiny real tfds
dataset built here: ArrayRecord files, an `image` (encoded JPEG) / `label` feature dict as in
`imagenet2012`. The tasks run as `python -m hita_jax.main` subprocesses that open the dataset by name
from its data_dir alone (tfds's read-only builder from the prepared files), as a user's run would."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from hita_jax import config_lib
from hita_jax.data import codes, sources
from tests.conftest import ROOT

import tensorflow_datasets as tfds  # a required dependency (requirements.txt)

NAME = 'hita_tiny_images'
NUM_IMAGES = 24
NUM_CLASSES = 10
ENV = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one CPU device
ENV.update(JAX_PLATFORMS='cpu', JAX_DISABLE_MOST_OPTIMIZATIONS='1', TF_CPP_MIN_LOG_LEVEL='3')


def _size(i):
  """(height, width) of image i: 40x50 .. 80x72, a different height for every image."""
  return 40 + (i * 40) // (NUM_IMAGES - 1), 50 + (i * 7) % 23


def _label(i):
  return (3 * i + 1) % NUM_CLASSES


def _image(i):
  h, w = _size(i)
  rng = np.random.default_rng(i)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  base = rng.uniform(40, 215, 3)
  img = base + 30 * np.sin(xx[..., None] / rng.uniform(3, 9)) + 20 * np.cos(yy[..., None] / 5)
  return np.clip(img, 0, 255).astype(np.uint8)


class HitaTinyImages(tfds.core.GeneratorBasedBuilder):
  """24 procedural RGB images of varied sizes, JPEG-encoded, in 10 classes (imagenet2012's features)."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
        'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES)}))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i in range(NUM_IMAGES):
      yield i, {'image': _image(i), 'label': _label(i)}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('tfds'))
  builder = HitaTinyImages(data_dir=d, file_format='array_record')
  assert builder.name == NAME
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return d


def _data_flags(data_dir):
  return ['--config.data.source=tfds', f'--config.data.name={NAME}', '--config.data.split=train',
          f'--config.data.data_dir={data_dir}', '--config.data.num_workers=0']


def _main(config, workdir, *flags):
  if 'allow_random_dinov2' in config_lib.load_config(f'{ROOT}/configs/{config}').init:
    flags += ('--config.init.allow_random_dinov2=True',)  # tiny DINOv2 without weights
  r = subprocess.run([sys.executable, '-m', 'hita_jax.main', f'--config={ROOT}/configs/{config}',
                      f'--workdir={workdir}', *flags], cwd=ROOT, env=ENV, capture_output=True, text=True)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  return r


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r for r in map(json.loads, f)}


def _expected_label(record):
  """The label image `record` was generated with, found from its size (unique per image)."""
  size = Image.open(io.BytesIO(record['bytes'])).size[::-1]
  return {_size(i): _label(i) for i in range(NUM_IMAGES)}[size]


def test_the_pipeline_reads_the_tfds_images_and_labels(data_dir):
  config = config_lib.load_config(f'{ROOT}/configs/tokenizer_v.py:tiny')
  config.data.source, config.data.name, config.data.split = 'tfds', NAME, 'train'
  config.data.data_dir, config.data.num_workers = data_dir, 0
  source = sources.make_source(config.data)
  assert isinstance(source, sources.TfdsSource) and len(source) == NUM_IMAGES
  for i in range(NUM_IMAGES):
    assert source[i]['label'] == _expected_label(source[i]), i
  it, _ = sources.make_image_dataset(config.data, image_size=config.data.image_size, global_batch=8,
                                     seed=0)
  batch = next(it)
  assert batch['image'].shape == (8, config.data.image_size, config.data.image_size, 3)
  assert batch['image'].dtype == np.uint8 and batch['image'].std() > 0
  assert set(batch['label'].tolist()) <= {_label(i) for i in range(NUM_IMAGES)}
  assert int(batch['skipped'].sum()) == 0


@pytest.mark.slow  # three task subprocesses, ~2.5 min: keeps the default run near 20 minutes
def test_train_tokenizer_extract_codes_train_ar(data_dir, tmp_path):
  data = _data_flags(data_dir)
  # 1. the tokenizer, 3 steps on the tfds images
  tok = str(tmp_path / 'tok')
  _main('tokenizer_v.py:tiny', tok, *data, '--config.train_tokenizer.num_steps=3',
        '--config.train_tokenizer.log_every=1', '--config.train_tokenizer.ckpt_every=3',
        '--config.train_tokenizer.image_every=3', '--config.train_tokenizer.global_batch_size=8',
        '--config.train_tokenizer.warmup_steps=1', '--config.tokenizer_loss.lpips_weights=random',
        '--config.tokenizer_loss.disc_start=2')
  m = _metrics(tok)
  assert sorted(m) == [1, 2, 3]
  for step in m.values():
    for k in ('g_loss', 'rec_loss', 'd_loss'):
      assert np.isfinite(step[k]), (step['step'], k)
  assert m[3]['skipped_images'] == 0
  export = os.path.join(tok, 'export', 'ema')
  assert os.path.exists(os.path.join(export, 'config.json'))
  assert os.path.exists(os.path.join(tok, 'reconstructions_0000003.png'))

  # 2. codes of every tfds image, in the dataset's order, with its label
  ext = str(tmp_path / 'extract')
  _main('hita_b.py:tiny', ext, *data, '--config.task=extract_codes', f'--config.init.tokenizer={export}',
        '--config.extract_codes.examples_per_shard=16', '--config.extract_codes.batch_size=16',
        '--config.extract_codes.views=center')
  codes_dir = os.path.join(ext, 'codes')
  assert sorted(os.listdir(codes_dir)) == ['codes-00000-00000.array_record',
                                           'codes-00000-00001.array_record', 'manifest.json']
  manifest = json.load(open(os.path.join(codes_dir, 'manifest.json')))
  assert manifest['data']['source'] == 'tfds' and manifest['data']['name'] == NAME
  src = codes.CodesSource(codes_dir)
  assert len(src) == NUM_IMAGES  # one record per image
  tfds_src = tfds.data_source(NAME, split='train', data_dir=data_dir)
  assert [int(src[i]['label']) for i in range(NUM_IMAGES)] == \
      [int(tfds_src[i]['label']) for i in range(NUM_IMAGES)]
  rec = src[0]
  assert rec['holistic_codes'].shape[0] == 1 and rec['patch_codes'].shape[0] == 1

  # 3. the AR model, 3 steps on those codes
  ar = str(tmp_path / 'ar')
  _main('hita_b.py:tiny', ar, *data, f'--config.init.tokenizer={export}',
        f'--config.train_ar.codes_dir={codes_dir}', '--config.train_ar.num_steps=3',
        '--config.train_ar.log_every=1', '--config.train_ar.ckpt_every=3',
        '--config.train_ar.global_batch_size=8', '--config.train_ar.sample_every=0')
  m = _metrics(ar)
  assert sorted(m) == [1, 2, 3] and all(np.isfinite(s['loss']) for s in m.values())
  assert os.path.exists(os.path.join(ar, 'export', 'ema', 'config.json'))
