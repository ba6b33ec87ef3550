"""FID, sFID, IS, precision/recall against a plain float64 numpy transcription of the ADM formulas."""
import numpy as np
import pytest
from scipy import linalg

from hita_jax.data import images
from hita_jax.metrics import adm


def write_reference_batch(path: str, images: np.ndarray, pool3: np.ndarray | None = None,
                          spatial: np.ndarray | None = None, **extra) -> None:
  """Writes an ADM-format reference batch (images plus statistics when activations are given)."""
  arrays = {'arr_0': np.asarray(images, np.uint8)}
  if pool3 is not None:
    s = adm.FIDStatistics.from_activations(pool3)
    arrays.update(mu=s.mu, sigma=s.sigma)
  if spatial is not None:
    s = adm.FIDStatistics.from_activations(spatial)
    arrays.update(mu_s=s.mu, sigma_s=s.sigma)
  arrays.update(extra)
  np.savez(path, **arrays)


def _feats(n, d, seed, shift=0.0):
  r = np.random.RandomState(seed)
  base = r.randn(n, d) @ (np.eye(d) + 0.1 * r.randn(d, d))
  return base + shift


def ref_fid(a, b):
  mu1, mu2 = a.mean(0), b.mean(0)
  s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  covmean = linalg.sqrtm(s1 @ s2)
  covmean = covmean[0] if isinstance(covmean, tuple) else covmean
  return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def ref_is(logits, split=5000):
  p = np.exp(logits - logits.max(1, keepdims=True))
  p = p / p.sum(1, keepdims=True)
  scores = []
  for i in range(0, len(p), split):
    q = p[i:i + split]
    scores.append(np.exp(np.mean(np.sum(q * (np.log(q) - np.log(q.mean(0, keepdims=True))), 1))))
  return float(np.mean(scores))


def ref_pr(ref, sample, k=3):
  def d2(u, v):
    return np.maximum((u ** 2).sum(1)[:, None] - 2 * u @ v.T + (v ** 2).sum(1)[None], 0)
  r_ref = np.sort(d2(ref, ref), axis=1)[:, k]
  r_s = np.sort(d2(sample, sample), axis=1)[:, k]
  d = d2(ref, sample)
  precision = np.mean(np.any(d <= r_ref[:, None], axis=0))
  recall = np.mean(np.any(d <= r_s[None, :], axis=1))
  return float(precision), float(recall)


def test_fid_matches_transcription_and_self_is_zero():
  a, b = _feats(300, 16, 0), _feats(250, 16, 1, shift=0.3)
  s_a = adm.FIDStatistics.from_activations(a)
  s_b = adm.FIDStatistics.from_activations(b)
  assert s_a.frechet_distance(s_b) == pytest.approx(ref_fid(a, b), rel=1e-6, abs=1e-6)
  assert abs(s_a.frechet_distance(s_a)) < 1e-6
  # sFID is the same formula on the spatial features
  sa, sb = _feats(200, 28, 2), _feats(200, 28, 3, shift=-0.1)
  got = adm.FIDStatistics.from_activations(sa).frechet_distance(
      adm.FIDStatistics.from_activations(sb))
  assert got == pytest.approx(ref_fid(sa, sb), rel=1e-6, abs=1e-6)


def test_fid_singular_fallback_and_shape_check():
  a = _feats(5, 16, 4)  # fewer samples than dims: singular covariances
  s = adm.FIDStatistics.from_activations(a)
  assert np.isfinite(s.frechet_distance(adm.FIDStatistics.from_activations(_feats(5, 16, 5))))
  with pytest.raises(ValueError, match='different sizes'):
    s.frechet_distance(adm.FIDStatistics.from_activations(_feats(5, 8, 5)))


def test_inception_score_matches_transcription():
  logits = np.random.RandomState(0).randn(12000, 50) * 3
  assert adm.inception_score(logits) == pytest.approx(ref_is(logits), rel=1e-6)
  assert adm.inception_score(np.zeros((100, 10))) == pytest.approx(1.0)


def test_precision_recall_matches_transcription():
  ref, sample = _feats(400, 8, 6), _feats(300, 8, 7, shift=0.5)
  est = adm.ManifoldEstimator(row_batch_size=128, col_batch_size=96, distance_dtype='float32')
  p, r = est.precision_recall(ref, sample)
  rp, rr = ref_pr(ref, sample)
  assert p == pytest.approx(rp, abs=1e-6) and r == pytest.approx(rr, abs=1e-6)
  assert 0 < p < 1 and 0 < r < 1
  # ADM's float16 distances agree up to a few borderline points
  p16, r16 = adm.ManifoldEstimator(distance_dtype='float16').precision_recall(ref, sample)
  assert abs(p16 - rp) < 0.02 and abs(r16 - rr) < 0.02
  assert adm.ManifoldEstimator().precision_recall(ref, ref) == (1.0, 1.0)


def test_reference_batch_round_trip(tmp_path):
  imgs = np.random.RandomState(0).randint(0, 256, (6, 8, 8, 3)).astype(np.uint8)
  pool, spatial = _feats(6, 4, 1), _feats(6, 3, 2)
  write_reference_batch(str(tmp_path / 'ref.npz'), imgs, pool, spatial)
  np.testing.assert_array_equal(images.read_images_npz(str(tmp_path / 'ref.npz')), imgs)
  stats = adm.read_statistics(str(tmp_path / 'ref.npz'))
  assert set(stats) == {'mu', 'sigma', 'mu_s', 'sigma_s'}
  np.testing.assert_allclose(stats['sigma'], np.cov(pool, rowvar=False))
  np.savez(tmp_path / 'bad.npz', arr_0=imgs.astype(np.float32))
  with pytest.raises(ValueError, match='uint8'):
    images.read_images_npz(str(tmp_path / 'bad.npz'))
  with pytest.raises(KeyError, match='arr_0'):
    np.savez(tmp_path / 'nokey.npz', x=imgs)
    images.read_images_npz(str(tmp_path / 'nokey.npz'))
  (tmp_path / 'corrupt.npz').write_bytes(b'garbage')
  with pytest.raises(ValueError, match='corrupt.npz'):
    images.read_images_npz(str(tmp_path / 'corrupt.npz'))
