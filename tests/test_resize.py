"""PyTorch/kornia-exact resampling matrices."""
import numpy as np
import pytest

from hita_jax.models import resize


def test_matrices_are_partitions_of_unity():
  for m in (resize.torch_bicubic_matrix(37, 16), resize.torch_bicubic_matrix(21, 16, scale_factor=16.1 / 21),
            resize.torch_bicubic_aa_matrix(37, 16), resize.kornia_resize_matrix(336, 224),
            resize.torch_bicubic_matrix(336, 256)):
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)


def test_identity_when_same_size():
  np.testing.assert_allclose(resize.torch_bicubic_matrix(9, 9), np.eye(9), atol=1e-12)
  np.testing.assert_allclose(resize.torch_bicubic_matrix(9, 9, align_corners=True), np.eye(9), atol=1e-12)


def test_pos_table_offset_guard():
  with pytest.raises(ValueError, match='offset'):
    resize.interpolate_pos_table(np.zeros((16, 2), np.float32), 4, (3, 3), offset=1.5, antialias=False)




@pytest.mark.parametrize('n_in,n_out', [(21, 16), (336, 256), (16, 21), (37, 16)])
def test_bicubic_matches_torch(torch, n_in, n_out):
  F = torch.nn.functional
  x = np.random.RandomState(0).randn(1, 2, n_in, n_in).astype(np.float32)
  ref = F.interpolate(torch.from_numpy(x), size=(n_out, n_out), mode='bicubic').numpy()
  m = resize.torch_bicubic_matrix(n_in, n_out)
  np.testing.assert_allclose(np.einsum('oh,pw,bchw->bcop', m, m, x), ref, atol=5e-6)  # float32 accumulation-order noise


@pytest.mark.parametrize('grid,out,offset,aa', [(21, 16, 0.1, False), (37, 16, 0.0, True),
                                                 (37, 23, 0.1, False), (4, 8, 0.1, False)])
def test_scale_factor_interpolation_matches_torch(torch, grid, out, offset, aa):
  F = torch.nn.functional
  x = np.random.RandomState(1).randn(grid * grid, 3).astype(np.float32)
  sf = (out + offset) / grid
  ref = F.interpolate(torch.from_numpy(x).reshape(1, grid, grid, 3).permute(0, 3, 1, 2),
                      scale_factor=(sf, sf), mode='bicubic', antialias=aa)
  ref = ref.permute(0, 2, 3, 1).reshape(out * out, 3).numpy()
  got = np.asarray(resize.interpolate_pos_table(x, grid, (out, out), offset=offset, antialias=aa))
  np.testing.assert_allclose(got, ref, atol=5e-6)  # float32 accumulation-order noise


def test_kornia_style_resize_matches_torch_composition(torch):
  F = torch.nn.functional
  """kornia = gaussian blur (sigma 0.25, 3 taps, reflect) then bicubic align_corners=True."""
  x = np.random.RandomState(2).rand(1, 1, 336, 336).astype(np.float32)
  sigma = (336 / 224 - 1) / 2
  g = np.exp(-np.arange(-1, 2) ** 2 / (2 * sigma ** 2))
  g /= g.sum()
  t = torch.from_numpy(x)
  t = F.pad(t, (1, 1, 1, 1), mode='reflect')
  k = torch.from_numpy(np.outer(g, g).astype(np.float32))[None, None]
  blurred = F.conv2d(t, k)
  ref = F.interpolate(blurred, size=(224, 224), mode='bicubic', align_corners=True).numpy()
  m = resize.kornia_resize_matrix(336, 224)
  np.testing.assert_allclose(np.einsum('oh,pw,bchw->bcop', m, m, x), ref, atol=5e-6)  # float32 accumulation-order noise
