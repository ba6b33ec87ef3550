"""Extraction views (centre, flip, LlamaGen ten-crop) and the record format."""
import numpy as np
import pytest
from PIL import Image

from hita_jax.data import codes, images


def _image(h=50, w=70, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_five_crop_positions_follow_torchvision():
  img = _image(44, 44)
  tl, tr, bl, br, c = images.five_crop(img, 40)
  np.testing.assert_array_equal(tl, img[:40, :40])
  np.testing.assert_array_equal(tr, img[:40, 4:])
  np.testing.assert_array_equal(bl, img[4:, :40])
  np.testing.assert_array_equal(br, img[4:, 4:])
  np.testing.assert_array_equal(c, img[2:42, 2:42])  # round((44 - 40) / 2) = 2
  with pytest.raises(ValueError, match='larger than the image'):
    images.five_crop(img, 45)


def test_ten_crop_is_llamagen_centre_crop_then_ten_crop():
  pil = Image.fromarray(_image(50, 70))
  views = images.image_views(pil, 32, 'ten_crop', crop_range=1.1)
  assert views.shape == (10, 32, 32, 3) and views.dtype == np.uint8
  big = images.center_crop_arr(pil, 35)  # int(32 * 1.1)
  np.testing.assert_array_equal(views[:5], np.stack(images.five_crop(big, 32)))
  mirror = big[:, ::-1]
  np.testing.assert_array_equal(views[5:], np.stack(images.five_crop(mirror, 32)))
  # torchvision's order: the mirror image's top-left crop is the mirrored top-right crop.
  np.testing.assert_array_equal(views[5], views[1][:, ::-1])
  # all ten views differ from each other on a random image
  assert len({v.tobytes() for v in views}) == 10


def test_centre_and_flip_views():
  pil = Image.fromarray(_image(40, 60))
  c = images.image_views(pil, 32, 'center')
  f = images.image_views(pil, 32, 'flip')
  assert c.shape == (1, 32, 32, 3) and f.shape == (2, 32, 32, 3)
  np.testing.assert_array_equal(f[0], c[0])
  np.testing.assert_array_equal(f[1], c[0][:, ::-1])


def test_record_round_trip_and_view_choice():
  hol = np.arange(3 * 4).reshape(3, 4)
  patch = 100 + np.arange(3 * 9).reshape(3, 9)
  rec = codes.unpack(codes.pack(7, hol, patch), num_holistic=4)
  assert rec['label'] == 7
  np.testing.assert_array_equal(rec['holistic_codes'], hol)
  np.testing.assert_array_equal(rec['patch_codes'], patch)
  seen = set()
  for s in range(40):
    v = codes.pick_view(rec, np.random.default_rng(s))
    k = int(v['holistic_codes'][0]) // 4
    np.testing.assert_array_equal(v['patch_codes'], patch[k])  # holistic and patch of one view
    seen.add(k)
  assert seen == {0, 1, 2}


def test_unknown_views_name_is_rejected():
  with pytest.raises(ValueError, match="views='five_crop'"):
    images.image_views(Image.new('RGB', (40, 40)), 32, 'five_crop')
