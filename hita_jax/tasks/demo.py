"""The `demo` task: Hita end to end on a CPU in minutes (`configs/demo.py`).

Stages, each in its own sub-directory of the workdir and each resumable (a rerun skips what is done):
  1. `tokenizer/`  train a small Hita tokenizer on the embedded shapes data (train_tokenizer task);
                   its EMA export (`tokenizer/export/ema`) is the style-transfer-ready tokenizer.
  2. `codes/`      extract (holistic, patch, label) codes with it (extract_codes task).
  3. `ar/`         train a small class-conditional AR model on the codes (train_ar task).
  4. outputs       `samples.png` (one row per class, CFG sampling from the EMA model),
                   `reconstructions.png` (real images over their reconstructions),
                   `style_transfer_<variant>.png` (tasks/style_transfer.py: patch codes of one
                   image decoded with holistic codes of another),
                   `inpaint_r<r>_<variant>.png` (tasks/inpaint.py: the lower part completed),
                   `demo_report.json`: class accuracy of the samples under a shape classifier
                   trained on the real data (class dependence measured, not eyeballed), codebook
                   usage, the style-transfer, in-painting (Fig. 7 protocol) and linear-probe
                   (tasks/linear_probe.py) measures, and the seconds of every stage.
"""
from __future__ import annotations

import copy
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from scipy.ndimage import gaussian_filter

from hita_jax import config_lib, pretrained
from hita_jax.data.images import image_grid, save_png
from hita_jax.data.sources import SHAPE_CLASSES, DecodeAugment, ShapesSource, make_source
from hita_jax.models.gpt import gpt_config_from
from hita_jax.models.sampler import generate
from hita_jax.training import classifier_step
from hita_jax.tasks import extract_codes, inpaint, linear_probe, style_transfer, train_ar, train_tokenizer

# -- a small shape classifier (measures class dependence of the samples) ----------------------------


def shape_evidence(images_u8: np.ndarray, inset: int = 3) -> np.ndarray:
  """Colour-invariant input for the classifier: per-pixel distance from the image's background
  colour, thresholded to a binary mask, without the outer `inset` pixels (decoders trained briefly leave a thin
  coloured frame there). The background colour is the median of the remaining image's border.
  (N, H, W, 3) uint8 -> (N, H - 2 inset, W - 2 inset, 1) f32."""
  x = images_u8.astype(np.float32) / 255.0
  i = min(inset, x.shape[1] // 4)
  inner = x[:, i:x.shape[1] - i, i:x.shape[2] - i]
  ring = np.concatenate([inner[:, 0], inner[:, -1], inner[:, :, 0], inner[:, :, -1]], axis=1)
  bg = np.median(ring, axis=1)[:, None, None]
  d = np.abs(inner - bg).sum(-1, keepdims=True)  # the frame is left out
  d = d / np.maximum(d.max(axis=(1, 2, 3), keepdims=True), 1e-3)
  return (d > 0.3).astype(np.float32)  # a binary shape mask: blur-tolerant


class ShapeClassifier(nnx.Module):
  """Three 3x3 conv layers, global average pooling, a linear head."""

  def __init__(self, num_classes: int, width: int = 32, *, rngs: nnx.Rngs):
    self.convs = nnx.List([nnx.Conv(cin, cout, (3, 3), rngs=rngs) for cin, cout in
                           ((1, width), (width, width), (width, 2 * width))])
    self.head = nnx.Linear(2 * width, num_classes, rngs=rngs)

  def features(self, x):
    """The pooled last-layer activations (what the head reads)."""
    for i, conv in enumerate(self.convs):
      x = jax.nn.relu(conv(x))
      if i < len(self.convs) - 1:
        x = nnx.max_pool(x, (2, 2), (2, 2))
    return x.mean(axis=(1, 2))

  def __call__(self, x):
    return self.head(self.features(x))


def train_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int, *, steps: int = 400,
                     batch: int = 64, seed: int = 0) -> ShapeClassifier:
  """Trains on the real images, each blurred by a random Gaussian (sigma 0 to 1.5 px) so that the
  judge accepts the soft edges of a small decoder (the classes differ in shape, not sharpness)."""
  model = ShapeClassifier(num_classes, rngs=nnx.Rngs(seed))
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
  rng = np.random.default_rng(seed)
  sigmas = rng.uniform(0.0, 1.5, len(images))
  blurred = np.stack([gaussian_filter(im.astype(np.float32), (s, s, 0)) for im, s in zip(images, sigmas)])
  feats = np.concatenate([shape_evidence(images), shape_evidence(np.clip(blurred, 0, 255).astype(np.uint8))])
  labels = np.concatenate([labels, labels])

  for _ in range(steps):
    idx = rng.integers(0, len(feats), batch)
    classifier_step(model, opt, jnp.asarray(feats[idx]), jnp.asarray(labels[idx]))
  return model


@nnx.jit
def _predict(model: ShapeClassifier, x):
  return jnp.argmax(model(x), -1)


@nnx.jit
def _features(model: ShapeClassifier, x):
  return model.features(x)


def classify(model: ShapeClassifier, images: np.ndarray, batch: int = 256) -> np.ndarray:
  feats = shape_evidence(images)
  return np.concatenate([np.asarray(_predict(model, jnp.asarray(feats[i:i + batch])))
                         for i in range(0, len(feats), batch)])


def classifier_features(model: ShapeClassifier, images: np.ndarray, batch: int = 256) -> np.ndarray:
  """(N, 64) shape features: the demo's stand-in for the Inception in the in-painting protocol
  (an Inception FID in 2048 dimensions on a few dozen images costs minutes on a CPU)."""
  feats = shape_evidence(images)
  return np.concatenate([np.asarray(_features(model, jnp.asarray(feats[i:i + batch])))
                         for i in range(0, len(feats), batch)]).astype(np.float64)


# -- stages ------------------------------------------------------------------------------------------


def _stage_config(config, task: str, **set_values):
  """A copy of the demo config for one stage's task; `set_values` like {'init.tokenizer': path}."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.task = task
    for dotted, value in set_values.items():
      section, key = dotted.split('.')
      c[section][key] = value
  return c


def _stage(label: str, done_marker: str, fn, times: dict, key: str):
  """Runs `fn` unless `done_marker` exists (a finished earlier run); records its seconds."""
  t = time.time()
  if not os.path.exists(done_marker):
    print(label, flush=True)
    fn()
  times[key] = time.time() - t


def run(config, workdir: str):
  t0 = time.time()
  times = {}
  os.makedirs(workdir, exist_ok=True)

  tok_dir, codes_dir, ar_dir = (os.path.join(workdir, d) for d in ('tokenizer', 'codes', 'ar'))
  tok_export = os.path.join(tok_dir, 'export', 'ema')
  gpt_export = os.path.join(ar_dir, 'export', 'ema')
  _stage('[demo 1/4] training the tokenizer', os.path.join(tok_dir, 'train_summary.json'),
         lambda: train_tokenizer.run(_stage_config(config, 'train_tokenizer'), tok_dir), times, 'tokenizer_s')
  _stage('[demo 2/4] extracting codes', os.path.join(codes_dir, 'manifest.json'),
         lambda: extract_codes.run(_stage_config(config, 'extract_codes', **{
             'init.tokenizer': tok_export, 'extract_codes.output_dir': codes_dir}), codes_dir),
         times, 'extract_s')
  _stage('[demo 3/4] training the AR model', os.path.join(gpt_export, 'config.json'),
         lambda: train_ar.run(_stage_config(config, 'train_ar', **{
             'init.tokenizer': tok_export, 'train_ar.codes_dir': codes_dir}), ar_dir),
         times, 'ar_s')

  # 4. pictures and the class-dependence measurement
  print('[demo 4/4] samples, class check, reconstructions, style transfer, in-painting, linear '
        'probing', flush=True)
  t = time.time()
  report = make_outputs(config, workdir, tok_export, gpt_export, times)
  times['outputs_s'] = time.time() - t
  report['seconds'] = {k: round(v, 1) for k, v in times.items()}
  report['seconds']['total_s'] = round(time.time() - t0, 1)
  with open(os.path.join(workdir, 'demo_report.json'), 'w') as f:
    json.dump(report, f, indent=1)
  ip = report['inpaint']['r0.5_holistic']
  lp = {k: v['test_top1'] for k, v in report['linear_probe'].items()}
  print(f"demo done in {report['seconds']['total_s'] / 60:.1f} min: {workdir}/samples.png "
        f"(class accuracy of samples {report['sample_class_accuracy']:.2f}, of real held-out images "
        f"{report['real_class_accuracy']:.2f}); holistic codebook usage "
        f"{report['holistic_codebook_usage']:.2f}; style transfer colour distance "
        f"{100 * report['style_transfer']['all']['colour_distance_fall']:.0f} % closer to the reference; "
        f"in-painting r=0.5 class accuracy {ip['class_accuracy']:.2f} as decoded, "
        f"{ip['class_accuracy_pasted']:.2f} with the kept pixels pasted back "
        f"({ip['class_accuracy_kept_only']:.2f} from them alone); linear probe top-1 {lp}",
        flush=True)
  return report


def held_out_images(config, image_size: int, n: int):
  """`n` centre-cropped real images and labels. For the procedural shapes these are indices past
  the training records (never seen by the tokenizer or the AR model); for other sources the first
  `n` records."""
  dc = config.data
  if dc.source == 'shapes':
    src = ShapesSource(dc.num_records + n, dc.shapes_size, dc.seed, dc.shapes_style)
    idx = np.arange(dc.num_records, dc.num_records + n)
  else:
    src = make_source(dc)
    idx = np.arange(min(n, len(src)))
  dec = DecodeAugment(src, image_size, train=False)
  items = [dec.random_map((src[int(i)], int(i)), np.random.default_rng(0)) for i in idx]
  return (np.stack([it['image'] for it in items]),
          np.array([int(it['label']) for it in items], np.int32))


def make_outputs(config, workdir: str, tok_export: str, gpt_export: str, times: dict) -> dict:
  """Pictures and measurements; `times` gets the seconds of each part."""
  t = time.time()
  dm, sc = config.demo, config.sample
  tcfg = config_lib.tokenizer_config_from(config.tokenizer)
  tok = pretrained.load_tokenizer(tcfg, tok_export)
  tok.eval()
  gcfg = gpt_config_from(config.gpt)
  gpt = pretrained.load_gpt(gcfg, gpt_export)
  gpt.eval()
  n_cls, per = gcfg.num_classes, dm.samples_per_class
  scale = dm.png_scale

  # Class-conditional samples: one row per class (the first `grid_columns` of each class).
  labels = np.repeat(np.arange(n_cls, dtype=np.int32), per)
  codes = generate(gpt, labels, jax.random.key(sc.seed), cfg_scale=sc.cfg_scale, top_k=sc.top_k,
                   top_p=sc.top_p, temperature=sc.temperature)
  io = style_transfer.CodeIO(tok, batch=100)  # jitted encode / decode, shared by every picture
  samples = io.decode(codes[:, :gcfg.num_holistic], codes[:, gcfg.num_holistic:])
  cols = min(dm.grid_columns, per)
  grid_imgs = samples.reshape(n_cls, per, *samples.shape[1:])[:, :cols].reshape(-1, *samples.shape[1:])
  save_png(os.path.join(workdir, 'samples.png'), image_grid(grid_imgs, rows=n_cls, scale=scale))

  # Real data: a classifier trained on it, held-out images for its own accuracy and the
  # reconstruction / style-transfer pictures (held-out indices, never seen by the classifier).
  real, real_labels = held_out_images(config, tcfg.image_size, dm.classifier_train_images +
                                      dm.classifier_test_images)
  n_train = dm.classifier_train_images
  clf = train_classifier(real[:n_train], real_labels[:n_train], n_cls, steps=dm.classifier_steps,
                         seed=config.seed)
  real_acc = float(np.mean(classify(clf, real[n_train:]) == real_labels[n_train:]))
  pred = classify(clf, samples)
  per_class = [float(np.mean(pred[labels == k] == k)) for k in range(n_cls)]
  sample_acc = float(np.mean(pred == labels))

  times['samples_and_classifier_s'] = time.time() - t

  # Reconstructions: one held-out image per class (top row) over its reconstruction.
  t = time.time()
  test_imgs, test_labels = real[n_train:], real_labels[n_train:]
  pick = np.array([np.flatnonzero(test_labels == k)[0] for k in range(n_cls)
                   if np.any(test_labels == k)])
  shown = test_imgs[pick]
  hol_all, patch_all = io.encode(test_imgs)  # codebook usage over the held-out images
  recon = io.decode(hol_all[pick], patch_all[pick])
  mse = float(np.mean((recon.astype(np.float32) - shown.astype(np.float32)) ** 2))
  psnr = float(10 * np.log10(255.0 ** 2 / max(mse, 1e-9)))
  save_png(os.path.join(workdir, 'reconstructions.png'),
           image_grid(np.concatenate([shown, recon]), rows=2, scale=scale))
  usage = {'holistic_codebook_usage': len(np.unique(np.asarray(hol_all))) / tcfg.codebook_size,
           'patch_codebook_usage': len(np.unique(np.asarray(patch_all))) / tcfg.codebook_size,
           'codebook_usage_images': int(len(test_imgs))}

  # Style transfer (tasks/style_transfer.py): the patch codes of each content image (rows) decoded
  # with the holistic codes of each reference image (columns): all of them, the first / last half,
  # and all references blended (one column).
  k = min(len(shown), dm.style_images)
  content, reference = shown[:k], shown[::-1][:k]
  half = tcfg.num_holistic // 2
  st = style_transfer.transfer(tok, content, reference, f'all,first:{half},last:{half},blend',
                               config.style_transfer.blend_rule, io=io)
  st_report = style_transfer.write_outputs(st, content, reference, workdir, scale=scale)
  times['reconstructions_style_transfer_s'] = time.time() - t

  # In-painting (tasks/inpaint.py), the Fig. 7 protocol on held-out images: the shape classifier
  # judges the completions, its pooled features give the similarity and FID.
  t = time.time()
  m = dm.inpaint_images
  inpaint_report = inpaint.protocol(
      tok, gpt, test_imgs[:m], test_labels[:m], fractions=(0.25, 0.5, 0.75),
      variants=('holistic', 'none'), sample_cfg=inpaint.sample_config(config),
      key=jax.random.key(sc.seed + 1),
      classify=lambda x: classify(clf, x), features=lambda x: classifier_features(clf, x),
      out_dir=workdir, grid_images=dm.grid_columns, scale=scale, batch=m, refine=config.inpaint.refine,
      fill=config.inpaint.fill, io=io)
  times['inpaint_s'] = time.time() - t

  # Linear probing (tasks/linear_probe.py): features of the real images the classifier trained on
  # (probe training) and of the held-out ones (top-1).
  t = time.time()
  pn = dm.probe_train_images
  feats = linear_probe.extract_features(tok, np.concatenate([real[:pn], test_imgs]), batch=250)
  probe = linear_probe.probe_all({f: v[:pn] for f, v in feats.items()}, real_labels[:pn],
                                 {f: v[pn:] for f, v in feats.items()}, test_labels, n_cls,
                                 config.linear_probe, seed=config.seed)
  times['linear_probe_s'] = time.time() - t

  return {'sample_class_accuracy': sample_acc, 'sample_class_accuracy_per_class': per_class,
          'real_class_accuracy': real_acc, 'num_samples': int(len(labels)),
          'cfg_scale': float(sc.cfg_scale), 'reconstruction_psnr_db': psnr,
          'tokenizer': tok_export, 'gpt': gpt_export, **usage,
          'style_transfer': st_report, 'inpaint': inpaint_report, 'linear_probe': probe,
          'classes': list(SHAPE_CLASSES[:n_cls]) if config.data.source == 'shapes' else None}
