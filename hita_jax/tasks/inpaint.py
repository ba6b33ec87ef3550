"""The `inpaint` task (paper Fig. 2b / 9 and the quantitative analysis of Fig. 7 / appendix C):
zero-shot completion of the lower part of an image by the class-conditional AR model.

For a retained fraction r the upper `round(r x grid)` token rows are kept: the image with everything
below those rows set to grey (`inpaint.fill='median'`: to the kept rows' median colour, mostly the
background) is encoded, its patch codes of the kept rows are teacher-forced as the
sampler's prefix (`prefix_codes` / `prefix_mask`), and the rest is sampled with CFG for the image's
class, then decoded. With `inpaint.refine` = n, n more rounds follow: the kept pixel rows pasted
over the completion are encoded (a whole image, so the grey area no longer shifts the kept codes
through the encoder's attention) and the rest is sampled again. Two variants, as the paper compares:
  `holistic`  the masked image's holistic codes are forced too;
  `none`      the holistic codes are sampled by the model (only the kept patch rows are forced).

Measured per (r, variant) on `inpaint.num_images` images (`completions` each):
  class_accuracy        a classifier's accuracy on the completions (`inpaint.classifier`), as decoded;
  class_accuracy_pasted the same on the in-painted images (the original's kept pixel rows pasted
                        over the completion), beside
  class_accuracy_kept_only  the same on the masked inputs, no completion: what the kept rows alone
                        tell the classifier (the completion's share is the difference);
  feature_similarity    mean cosine similarity of completion and original features (default: the
                        FID Inception's pool3);
  fid                   FID of the completions against the originals (same features; null, with
                        `fid_error`, when too few images make its matrix square root complex);
  kept_psnr_db          PSNR of the kept pixel rows against the original, beside
  kept_psnr_reconstruction_db  the same rows of the plain reconstruction (the tokenizer's error).
Grids `inpaint_r<r>_<variant>.png`: columns original | masked | completions.
"""
from __future__ import annotations

import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from hita_jax import config_lib, pretrained
from hita_jax.errors import UserError
from hita_jax.data.images import image_grid, load_image_set, save_png
from hita_jax.data.sources import labelled_images
from hita_jax.metrics.adm import FIDStatistics
from hita_jax.models.gpt import gpt_config_from
from hita_jax.models.sampler import generate
from hita_jax.tasks.style_transfer import CodeIO

GREY = 128  # the masked area: 0 in the tokenizer's [-1, 1] range


def kept_rows(fraction: float, grid: int) -> int:
  rows = int(round(fraction * grid))
  if not 0 < rows < grid:
    raise ValueError(f'retained fraction {fraction} keeps {rows} of {grid} token rows; use 0 < r < 1 '
                     f'with at least one row kept and one completed')
  return rows


def mask_images(images_u8: np.ndarray, rows: int, grid: int, fill: str = 'grey') -> np.ndarray:
  """Pixels below the first `rows` token rows set to grey, or (`fill='median'`) to each image's
  median colour of the kept rows (mostly its background)."""
  if fill not in ('grey', 'median'):
    raise ValueError(f"in-painting fill {fill!r}: use 'grey' or 'median'")
  out = np.array(images_u8, copy=True)
  kept = rows * (images_u8.shape[1] // grid)
  out[:, kept:] = (GREY if fill == 'grey' else
                   np.median(out[:, :kept].reshape(len(out), -1, out.shape[-1]), axis=1)[:, None, None])
  return out


def prefix(hol, patch, rows: int, grid: int, with_holistic: bool):
  """Codes and mask for the sampler: the kept patch rows (and the holistic codes if asked)."""
  seq = jnp.concatenate([hol, patch], axis=1)
  s = hol.shape[1]
  pos = jnp.arange(seq.shape[1])
  mask = ((pos >= s) & (pos < s + rows * grid)) | ((pos < s) & with_holistic)
  return seq, jnp.broadcast_to(mask, seq.shape)


def _sample(gpt, codes, mask, labs, key, *, sample_cfg, batch, legacy_pos128_embedding):
  out = []
  for i in range(0, len(labs), batch):  # fixed batch: one sampler compilation
    n = min(batch, len(labs) - i)
    pad = lambda a: jnp.pad(a[i:i + n], [(0, batch - n)] + [(0, 0)] * (a.ndim - 1))  # noqa: E731
    seq = generate(gpt, pad(jnp.asarray(labs)), jax.random.fold_in(key, i),
                   cfg_scale=sample_cfg.cfg_scale, cfg_interval=sample_cfg.cfg_interval,
                   temperature=sample_cfg.temperature, top_k=sample_cfg.top_k, top_p=sample_cfg.top_p,
                   prefix_codes=pad(codes), prefix_mask=pad(mask),
                   legacy_pos128_embedding=legacy_pos128_embedding)
    out.append(seq[:n])
  return jnp.concatenate(out)


def complete(gpt, io: CodeIO, images_u8: np.ndarray, labels: np.ndarray, fraction: float,
             variant: str, key, *, sample_cfg, completions: int = 1, batch: int = 64, refine: int = 0,
             fill: str = 'grey',
             legacy_pos128_embedding: bool = False) -> dict:
  """Completions of `images_u8` (N, H, W, 3) keeping the upper `fraction`; returns {'masked',
  'images' (N, completions, H, W, 3), 'codes' (N, completions, S + N_p), 'prefix' codes, 'mask'}.

  `refine` > 0 re-encodes that many times: the kept pixel rows pasted over the last completion
  are encoded and the completion is sampled again from their codes. The encoder's attention is
  bidirectional, so the grey area changes the kept rows' (and the holistic) codes; a whole image
  gives codes like those the AR model was trained on. Only the kept pixels of the original are used.
  """
  if variant not in ('holistic', 'none'):
    raise ValueError(f"in-painting variant {variant!r}: use 'holistic' or 'none'")
  if refine < 0:
    raise ValueError(f'in-painting refine={refine}: use 0 (none) or a positive number of rounds')
  grid = gpt.cfg.grid
  rows = kept_rows(fraction, grid)
  masked = mask_images(images_u8, rows, grid, fill)
  hol, patch = io.encode(masked)
  codes, mask = prefix(hol, patch, rows, grid, variant == 'holistic')
  codes, mask = jnp.repeat(codes, completions, 0), jnp.repeat(mask, completions, 0)
  labs = np.repeat(np.asarray(labels, np.int32), completions)
  draw = lambda c, m, k: _sample(gpt, c, m, labs, k, sample_cfg=sample_cfg, batch=batch,  # noqa: E731
                                 legacy_pos128_embedding=legacy_pos128_embedding)
  seq = draw(codes, mask, key)
  s = gpt.cfg.num_holistic
  imgs = io.decode(seq[:, :s], seq[:, s:])
  kept_px = rows * (images_u8.shape[1] // grid)
  kept = np.repeat(images_u8[:, :kept_px], completions, 0) if refine else None
  for it in range(refine):
    whole = np.array(imgs)
    whole[:, :kept_px] = kept
    hol, patch = io.encode(whole)
    codes, mask = prefix(hol, patch, rows, grid, variant == 'holistic')
    seq = draw(codes, mask, jax.random.fold_in(key, 1_000_003 + it))
    imgs = io.decode(seq[:, :s], seq[:, s:])
  shape = (len(images_u8), completions)
  return {'masked': masked, 'rows': rows, 'grid': grid, 'images': imgs.reshape(*shape, *imgs.shape[1:]),
          'codes': np.asarray(seq).reshape(*shape, -1), 'prefix': np.asarray(codes).reshape(*shape, -1),
          'mask': np.asarray(mask).reshape(*shape, -1)}


# -- the Fig. 7 measures ---------------------------------------------------------------------------


def _psnr(a, b) -> float:
  mse = float(np.mean((np.asarray(a, np.float32) - np.asarray(b, np.float32)) ** 2))
  return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-9)))


def measure(result: dict, originals: np.ndarray, labels: np.ndarray, recon: np.ndarray, *,
            classify=None, features=None, orig_features=None, kept_only_accuracy=None) -> dict:
  """`kept_only_accuracy`: the masked inputs' accuracy when already known (the same masked
  inputs for every variant at one r)."""
  imgs = result['images']
  n, c = imgs.shape[:2]
  flat = imgs.reshape(n * c, *imgs.shape[2:])
  px = result['rows'] * (originals.shape[1] // result['grid'])  # kept pixel rows
  orig_rep = np.repeat(originals, c, 0)
  out = {'kept_token_rows': int(result['rows']), 'images': int(n), 'completions_per_image': int(c),
         'kept_psnr_db': _psnr(flat[:, :px], orig_rep[:, :px]),
         'kept_psnr_reconstruction_db': _psnr(recon[:, :px], originals[:, :px]),
         'completed_psnr_db': _psnr(flat[:, px:], orig_rep[:, px:])}
  if classify is not None:
    want = np.repeat(labels, c)
    out['class_accuracy'] = float(np.mean(classify(flat) == want))
    # the in-painted image a user keeps: the original's kept pixels over the completed rows; beside
    # it, the masked input alone, i.e. how much of that accuracy the kept rows give by themselves
    pasted = np.array(flat)
    pasted[:, :px] = orig_rep[:, :px]
    out['class_accuracy_pasted'] = float(np.mean(classify(pasted) == want))
    out['class_accuracy_kept_only'] = (
        float(np.mean(classify(result['masked']) == labels)) if kept_only_accuracy is None
        else kept_only_accuracy)
  if features is not None:
    f_orig = orig_features if orig_features is not None else features(originals)
    f_comp = features(flat)
    a = f_comp / np.maximum(np.linalg.norm(f_comp, axis=-1, keepdims=True), 1e-12)
    b = np.repeat(f_orig, c, 0)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    out['feature_similarity'] = float(np.mean(np.sum(a * b, -1)))
    try:
      out['fid'] = FIDStatistics.from_activations(f_orig).frechet_distance(
          FIDStatistics.from_activations(f_comp))
    except ValueError as e:  # as ADM's evaluator: a complex sqrtm is refused; keep the other measures
      out['fid'] = None
      out['fid_error'] = (f'{e}: {len(f_orig)} originals and {len(f_comp)} completions for '
                          f'{f_orig.shape[-1]}-d features; FID needs far more images than feature '
                          'dimensions (raise inpaint.num_images)')
  return out


def grid_picture(originals, result, n: int, max_completions: int = 4) -> tuple[np.ndarray, int]:
  """Rows: original | masked | completions, for the first `n` images."""
  n = min(n, len(originals))
  cols = min(max_completions, result['images'].shape[1])
  rows = [np.concatenate([originals[i:i + 1], result['masked'][i:i + 1], result['images'][i, :cols]])
          for i in range(n)]
  return np.concatenate(rows), n


# -- pluggable networks ------------------------------------------------------------------------------


def inception_features(weights: str = ''):
  """images_u8 -> (N, 2048) pool3 features of the FID Inception (weights as `evaluate`)."""
  from hita_jax.metrics.inception_features import InceptionRunner
  runner = InceptionRunner(pretrained.load_inception(weights or None), batch_size=50)
  return lambda images: runner(images)[0]


def load_factory(spec: str, config):
  """'package.module:factory' -> factory(config) (a user's classifier or feature network)."""
  mod, _, fn = spec.partition(':')
  if not fn:
    raise ValueError(f"{spec!r} is not 'package.module:factory'")
  return getattr(importlib.import_module(mod), fn)(config)


def make_networks(config, images_for_classifier=None):
  """(classify, features) as `inpaint.classifier` / `inpaint.features` say; None where not set."""
  ip = config.inpaint
  classify = None
  if ip.classifier == 'shapes':
    from hita_jax.tasks import demo  # the demo's shape classifier, trained on the data section
    x, y = labelled_images(config.data, config.tokenizer.image_size, 3000, seed=config.seed + 1)
    clf = demo.train_classifier(x, y, config.gpt.num_classes, steps=400, seed=config.seed)
    classify = lambda im: demo.classify(clf, im)  # noqa: E731
  elif ip.classifier:
    classify = load_factory(ip.classifier, config)
  if ip.features == 'inception':
    features = inception_features(ip.inception_weights)
  elif ip.features:
    features = load_factory(ip.features, config)
  else:
    features = None
  return classify, features


# -- the protocol --------------------------------------------------------------------------------------


def protocol(tok, gpt, images_u8, labels, *, fractions, variants, sample_cfg, key, completions=1,
             classify=None, features=None, out_dir=None, grid_images=8, scale=1, batch=64,
             refine: int = 0, fill: str = 'grey', io: CodeIO | None = None,
             legacy_pos128_embedding: bool = False) -> dict:
  """Every (fraction, variant): completions, measures and (with `out_dir`) a grid PNG."""
  io = io or CodeIO(tok)
  hol, patch = io.encode(images_u8)
  recon = io.decode(hol, patch)
  f_orig = features(images_u8) if features is not None else None
  report = {}
  for r in fractions:
    kept_only = None
    for v in variants:
      res = complete(gpt, io, images_u8, labels, r, v, jax.random.fold_in(key, int(r * 1000)),
                     sample_cfg=sample_cfg, completions=completions, batch=batch, refine=refine,
                     fill=fill, legacy_pos128_embedding=legacy_pos128_embedding)
      m = measure(res, images_u8, labels, recon, classify=classify, features=features,
                  orig_features=f_orig, kept_only_accuracy=kept_only)
      kept_only = m.get('class_accuracy_kept_only')
      report[f'r{r:g}_{v}'] = {'fraction': float(r), 'variant': v, 'refine': int(refine), 'fill': fill,
                               'cfg_scale': float(sample_cfg.cfg_scale), **m}
      if out_dir:
        pic, rows = grid_picture(images_u8, res, grid_images)
        save_png(os.path.join(out_dir, f'inpaint_r{r:g}_{v}.png'), image_grid(pic, rows=rows, scale=scale))
  return report


def sample_config(config):
  """The sample section with `inpaint.cfg_scale` in place of its CFG when set (> 0): a prefix
  that fixes the layout may want another guidance than samples drawn from nothing."""
  sc = config.sample.copy_and_resolve_references()
  cfg = float(config.inpaint.get('cfg_scale', 0.0))
  if cfg < 0:
    raise UserError(f'inpaint.cfg_scale={cfg}: use 0 (the sample section\'s, '
                    f'{sc.cfg_scale}) or a guidance scale > 0')
  if cfg > 0:
    sc.cfg_scale = cfg
  return sc


def run(config, workdir: str):
  ip = config.inpaint
  tcfg = config_lib.tokenizer_config_from(config.tokenizer)
  tok = pretrained.load_tokenizer(tcfg, config.init.tokenizer, key=config.init.tokenizer_key,
                                  dinov2=config.init.get('dinov2'))
  gcfg = gpt_config_from(config.gpt)
  gpt = pretrained.load_gpt(gcfg, config.init.gpt, key=config.init.get('gpt_key', 'ema'))
  gpt.eval()
  if ip.images:
    images, _ = load_image_set(ip.images, tcfg.image_size, ip.num_images)
    if not ip.labels:
      raise ValueError('--config.inpaint.labels is needed with inpaint.images: one class id, or one '
                       'per image, comma-separated')
    labels = np.array([int(v) for v in str(ip.labels).split(',')], np.int32)
    labels = np.broadcast_to(labels, (len(images),)) if len(labels) == 1 else labels
    if len(labels) != len(images):
      raise ValueError(f'{len(labels)} labels for {len(images)} images (inpaint.labels)')
  else:
    images, labels = labelled_images(config.data, tcfg.image_size, ip.num_images, seed=config.seed)
  classify, features = make_networks(config)
  fractions = [float(f) for f in str(ip.fractions).split(',')]
  variants = [v.strip() for v in ip.variants.split(',') if v.strip()]
  os.makedirs(workdir, exist_ok=True)
  report = protocol(tok, gpt, images, labels, fractions=fractions, variants=variants,
                    sample_cfg=sample_config(config), key=jax.random.key(config.sample.seed),
                    completions=ip.completions, classify=classify, features=features,
                    out_dir=workdir, grid_images=ip.grid_images, scale=ip.png_scale,
                    batch=ip.batch_size, refine=ip.refine, fill=ip.fill, legacy_pos128_embedding=bool(
                        config.sample.legacy_pos128_embedding
                        or (config.init.gpt and pretrained.wants_legacy_sampler(config.init.gpt))))
  with open(os.path.join(workdir, 'inpaint.json'), 'w') as f:
    json.dump(report, f, indent=1)
  for name, m in report.items():
    print(f'inpaint {name}: ' + '  '.join(f'{k} {v:.3f}' for k, v in m.items() if isinstance(v, float)),
          flush=True)
  return report
