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

Inception features are computed in global batches sharded over every device of the mesh (every
process reads all images; with several processes the features are gathered with
`process_allgather`); tokenizer reconstructions run on each process's first device. Process 0
writes the results to `<workdir>/eval_results.json` and the CLU metric writers.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Iterable

import jax
import numpy as np
from flax import nnx
from PIL import Image

from hita_jax import config_lib, pretrained
from hita_jax.data.images import iter_center_crops, read_images_npz, to_uint8, to_unit
from hita_jax.metrics import adm
from hita_jax.metrics.image import psnr, ssim
from hita_jax.metrics.inception_features import InceptionRunner, progress_printer
from hita_jax.errors import UserError


def generation_metrics(runner: InceptionRunner, sample_path: str, ref_path: str,
                       distance_dtype: str = 'float16', timings: dict | None = None) -> dict[str, Any]:
  """`timings`, when given, receives the seconds of each stage (reading, Inception, statistics)."""
  timings = {} if timings is None else timings
  t = time.time()
  ref_images = read_images_npz(ref_path)
  samples = read_images_npz(sample_path)
  timings['read_npz_s'] = time.time() - t
  t = time.time()
  ref_pool, ref_spatial, _ = runner(ref_images, progress_printer('reference'))
  timings['inception_reference_s'] = time.time() - t
  t = time.time()
  pool, spatial, logits = runner(samples, progress_printer('samples'))
  timings['inception_samples_s'] = time.time() - t
  t = time.time()
  stats = adm.read_statistics(ref_path)
  ref_fid = (adm.FIDStatistics(stats['mu'], stats['sigma']) if 'mu' in stats
             else adm.FIDStatistics.from_activations(ref_pool))
  ref_sfid = (adm.FIDStatistics(stats['mu_s'], stats['sigma_s']) if 'mu_s' in stats
              else adm.FIDStatistics.from_activations(ref_spatial))
  prec, rec = adm.ManifoldEstimator(distance_dtype=distance_dtype).precision_recall(ref_pool, pool)
  out = {
      'num_samples': int(len(samples)), 'num_reference': int(len(ref_images)),
      'fid': adm.FIDStatistics.from_activations(pool).frechet_distance(ref_fid),
      'sfid': adm.FIDStatistics.from_activations(spatial).frechet_distance(ref_sfid),
      'precision': prec, 'recall': rec,
      'reference_statistics': 'precomputed (npz)' if 'mu' in stats else 'computed from arr_0',
  }
  if runner.has_logits:
    out['inception_score'] = adm.inception_score(logits)
  else:
    out['inception_score'] = None
    out['inception_score_note'] = ('these Inception weights have no classifier head (fid-helper '
                                   'ships pool3 only); pass a pytorch-fid/torch-fidelity .pth for IS')
  timings['statistics_s'] = time.time() - t  # FID/sFID, precision/recall, IS
  return out


# -- tokenizer metrics --------------------------------------------------------------------------

def to_eval_uint8_pil(x: np.ndarray, size: int = 256) -> np.ndarray:
  """[-1, 1] HWC float -> `to_uint8` -> PIL default-filter resize to `size` (vqgan_test.py)."""
  return np.array(Image.fromarray(np.asarray(to_uint8(x))).resize((size, size)))


def tokenizer_metrics(tokenizer, images: Iterable[np.ndarray], runner: InceptionRunner, *,
                      batch_size: int = 8, eval_size: int = 256) -> dict[str, Any]:
  """`images`: uint8 HWC arrays already centre-cropped to the tokenizer's input size."""
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
    x = np.asarray(to_unit(np.stack(buf)))
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
      'rfid': adm.FIDStatistics.from_activations(pool).frechet_distance(
          adm.FIDStatistics.from_activations(gt_pool)),
      'psnr': float(np.mean(psnrs)),
      'ssim_data_range_2': float(np.mean(ssims)),
      'ssim_note': 'official vqgan_test.py convention: data_range=2.0 on [0, 1] images',
      'patch_codebook_usage': len(used_patch) / cfg.codebook_size,
      'holistic_codebook_usage': len(used_hol) / cfg.codebook_size,
  }
  out['ris'] = adm.inception_score(logits) if runner.has_logits else None
  return out


def run(config, workdir: str) -> dict[str, Any]:
  ev = config.evaluate
  config_lib.check_paths(config)
  if ev.mode == 'tokenizer':  # before any model is allocated
    pretrained.require_dinov2(config.init.tokenizer, config.init.dinov2, key=config.init.tokenizer_key,
                              allow_random=config.init.allow_random_dinov2)
  runner = InceptionRunner(pretrained.load_inception(ev.inception_weights), batch_size=ev.batch_size)
  if ev.mode == 'generation':
    if not ev.sample_npz or not ev.ref_npz:
      raise UserError('evaluate.mode=generation needs --config.evaluate.sample_npz and '
                       '--config.evaluate.ref_npz')
    results = generation_metrics(runner, ev.sample_npz, ev.ref_npz, ev.distance_dtype)
  elif ev.mode == 'tokenizer':
    if not ev.images:
      raise UserError('evaluate.mode=tokenizer needs --config.evaluate.images (an .npz or a folder)')
    tcfg = config_lib.tokenizer_config_from(config.tokenizer)
    tok = pretrained.load_tokenizer(tcfg, config.init.tokenizer, key=config.init.tokenizer_key,
                                    dinov2=config.init.dinov2,
                                    allow_random_dinov2=config.init.allow_random_dinov2)
    images = iter_center_crops(ev.images, tcfg.image_size)
    if ev.max_images:
      images = (img for i, img in zip(range(ev.max_images), images))
    results = tokenizer_metrics(tok, images, runner, batch_size=ev.tokenizer_batch_size)
  else:
    raise UserError(f"evaluate.mode must be 'generation' or 'tokenizer', got {ev.mode!r}")
  results['inception_weights'] = ev.inception_weights or 'fid-helper'
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'eval_results.json')
  if jax.process_index() == 0:  # every process computed the same results
    with open(path, 'w') as f:
      json.dump(results, f, indent=1)
  from clu import metric_writers  # imports TensorFlow: only once results are written
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  writer.write_scalars(0, {f'eval/{k}': v for k, v in results.items()
                           if isinstance(v, (int, float)) and v is not None})
  writer.close()
  print(json.dumps(results, indent=1))
  print(f'wrote {path}')
  return results
