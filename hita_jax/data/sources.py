"""Labelled image sources and the grain input pipeline of the tokenizer trainer, code extraction and
on-the-fly AR training.

Sources (all random access, decoded in `map` so grain workers do the work):
* `ShapesSource`: the embedded default, generated procedurally (no download): 10 shape classes with
  random colours, a random texture, position and scale on a random background. Holistic tokens get
  something global to capture (colour/texture), patch tokens something local (the shape).
  `style='flat'` (the CPU demo) draws larger untextured shapes in one of 6 colours on a dark or a
  light background, which a minutes-long CPU run can learn to tokenize and generate.
* `ImageFolderSource`: `root/<class>/*.{jpg,png,...}`, sorted; classes are sub-folder names.
* `TfdsSource`: a tfds dataset prepared as ArrayRecord (`tfds.data_source`, e.g. `imagenet2012`
  built from the manual download), images kept as encoded bytes.

Corrupt or unreadable images never stop training: the element is replaced by the next readable one
and carries `skipped` (how many files were passed over), which the trainer sums and reports.
Augmentation is the official one: ADM `random_crop_arr` (shorter side to a random size in
[S, 1.25 S], BOX halving then BICUBIC, random S crop) and a horizontal flip with p = 0.5; evaluation
uses the ADM centre crop. The index space is sharded per process; iterators are checkpointable.
"""
from __future__ import annotations

import io
import os
from typing import Any

import grain
import numpy as np
from PIL import Image

from hita_jax.data.images import center_crop_arr, list_images, random_crop_arr, read_rgb, to_rgb
from hita_jax.errors import UserError, MissingPathError

SHAPE_CLASSES = ('circle', 'square', 'triangle', 'cross', 'ring', 'diamond', 'hbars', 'vbars',
                 'checker', 'star')


# -- sources --------------------------------------------------------------------------------------

class ShapesSource:
  """Procedural labelled images: deterministic per index, `num_records` of them."""

  def __init__(self, num_records: int = 10000, size: int = 64, seed: int = 0,
               style: str = 'textured'):
    if style not in SHAPE_STYLES:
      raise UserError(f'shapes style {style!r} is not one of {SHAPE_STYLES}')
    self.num_records, self.size, self.seed, self.style = num_records, size, seed, style

  def __len__(self):
    return self.num_records

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index) % self.num_records
    label = index % len(SHAPE_CLASSES)
    rng = np.random.default_rng((self.seed, index))
    return {'image': render_shape(label, rng, self.size, self.style), 'label': np.int32(label)}


SHAPE_STYLES = ('textured', 'flat')
FLAT_BACKGROUNDS = np.array([[0.08, 0.08, 0.1], [0.95, 0.95, 0.92]])
FLAT_COLOURS = np.array([[0.9, 0.1, 0.1], [0.1, 0.7, 0.2], [0.15, 0.3, 0.95], [0.95, 0.8, 0.1],
                         [0.6, 0.2, 0.8], [0.1, 0.75, 0.85]])


def render_shape(label: int, rng: np.random.Generator, size: int, style: str = 'textured') -> np.ndarray:
  s = size
  yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
  if style == 'flat':
    bg = FLAT_BACKGROUNDS[rng.integers(len(FLAT_BACKGROUNDS))]
    fg = FLAT_COLOURS[rng.integers(len(FLAT_COLOURS))]
    r = rng.uniform(0.28, 0.38)
  else:
    bg = rng.uniform(0, 1, 3)
    fg = rng.uniform(0, 1, 3)
    while np.abs(fg - bg).sum() < 0.6:  # keep the shape visible
      fg = rng.uniform(0, 1, 3)
    r = None
  tex = rng.integers(0, 3) if style == 'textured' else 0
  freq = rng.uniform(6, 14)
  if tex == 1:    # stripes
    texture = 0.85 + 0.15 * np.sign(np.sin(2 * np.pi * freq * (xx + yy)))
  elif tex == 2:  # noise
    texture = 0.8 + 0.2 * rng.uniform(0, 1, (s, s))
  else:
    texture = np.ones((s, s), np.float32)
  r = rng.uniform(0.18, 0.32) if r is None else r
  cy, cx = rng.uniform(r + 0.05, 1 - r - 0.05, 2)
  dy, dx = yy - cy, xx - cx
  name = SHAPE_CLASSES[label]
  if name == 'circle':
    m = dy ** 2 + dx ** 2 < r ** 2
  elif name == 'square':
    m = (np.abs(dy) < r * 0.85) & (np.abs(dx) < r * 0.85)
  elif name == 'triangle':
    m = (dy < r * 0.8) & (dy > -r) & (np.abs(dx) < (dy + r) * 0.6)
  elif name == 'cross':
    w = r * 0.35
    m = ((np.abs(dy) < w) & (np.abs(dx) < r)) | ((np.abs(dx) < w) & (np.abs(dy) < r))
  elif name == 'ring':
    d2 = dy ** 2 + dx ** 2
    m = (d2 < r ** 2) & (d2 > (0.55 * r) ** 2)
  elif name == 'diamond':
    m = np.abs(dy) + np.abs(dx) < r
  elif name == 'hbars':
    m = (np.abs(dy) < r) & (np.abs(dx) < r) & (np.sin(np.pi * 3 * dy / r) > 0)
  elif name == 'vbars':
    m = (np.abs(dy) < r) & (np.abs(dx) < r) & (np.sin(np.pi * 3 * dx / r) > 0)
  elif name == 'checker':
    m = (np.abs(dy) < r) & (np.abs(dx) < r) & ((np.floor(3 * dy / r) + np.floor(3 * dx / r)) % 2 == 0)
  else:  # star
    ang = np.arctan2(dy, dx)
    rad = r * (0.55 + 0.45 * np.cos(5 * ang))
    m = dy ** 2 + dx ** 2 < rad ** 2
  img = np.where(m[..., None], fg[None, None] * texture[..., None], bg[None, None])
  img = img + rng.normal(0, 0.02 if style == 'textured' else 0.01, img.shape)
  return (np.clip(img, 0, 1) * 255).astype(np.uint8)


class ImageFolderSource:
  """`root/<class>/<image>`: records are (path, label); the image is read in `decode`."""

  def __init__(self, root: str):
    if not os.path.isdir(root):
      raise MissingPathError(f'image folder not found: {root} (expected root/<class>/<images>)')
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
      raise UserError(f'{root} has no class sub-folders (expected root/<class>/<images>)')
    self.classes = classes
    self.records = sorted((f, label) for label, c in enumerate(classes)
                          for f in list_images(os.path.join(root, c)))
    if not self.records:
      raise UserError(f'{root} holds no image files in its class sub-folders')

  def __len__(self):
    return len(self.records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    path, label = self.records[int(index)]
    return {'path': path, 'label': np.int32(label)}


class TfdsSource:
  """A tfds ArrayRecord dataset (`tfds build NAME --file_format=array_record`), encoded images."""

  def __init__(self, name: str, split: str, data_dir: str | None = None):
    import tensorflow_datasets as tfds  # imports TensorFlow: only for the tfds source
    try:
      self.src = tfds.data_source(name, split=split, data_dir=data_dir,
                                  decoders={'image': tfds.decode.SkipDecoding()})
    except Exception as e:
      raise UserError(f'tfds dataset {name}:{split} is not available as ArrayRecord under '
                         f'{data_dir or "$TFDS_DATA_DIR"} ({e}); prepare it with `tfds build {name} '
                         '--file_format=array_record` (ImageNet needs the manual download)') from e

  def __len__(self):
    return len(self.src)

  def __getitem__(self, index: int) -> dict[str, Any]:
    r = self.src[int(index)]
    return {'bytes': r['image'], 'label': np.int32(r.get('label', 0))}


# -- decoding and augmentation ----------------------------------------------------------------------

def _open(record) -> Image.Image:
  if 'image' in record:
    a = np.asarray(record['image'])
    return to_rgb(Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a))  # (H, W, 1) gray
  return read_rgb(record['path'] if 'path' in record else io.BytesIO(record['bytes']))


def open_readable(source, index: int, record=None, max_tries: int = 64):
  """(PIL image, label, skipped) of record `index`, or of the next readable record when it is
  corrupt or unreadable (`skipped` counts the records passed over)."""
  record = source[index] if record is None else record
  for attempt in range(max_tries):
    try:
      return _open(record), int(record['label']), attempt
    except Exception:  # corrupt / unreadable: never fatal
      record = source[(index + attempt + 1) % len(source)]
  raise UserError(f'{max_tries} consecutive unreadable images near index {index}')


class DecodeAugment(grain.transforms.RandomMap):
  """record -> {'image': uint8 (S, S, 3), 'label', 'skipped'}; unreadable files are replaced by the
  next readable record of the source."""

  def __init__(self, source, image_size: int, train: bool, max_tries: int = 64):
    self.source, self.size, self.train, self.max_tries = source, image_size, train, max_tries

  def random_map(self, element, rng: np.random.Generator):
    record, index = element
    img, label, skipped = open_readable(self.source, index, record, self.max_tries)
    if self.train:
      arr = random_crop_arr(img, self.size, rng)
      if rng.random() < 0.5:
        arr = arr[:, ::-1]
    else:
      arr = center_crop_arr(img, self.size)
    return {'image': np.ascontiguousarray(arr, np.uint8), 'label': np.int32(label),
            'skipped': np.int32(skipped)}


def make_source(cfg) -> Any:
  kind = cfg.source
  if kind == 'shapes':
    return ShapesSource(cfg.num_records, cfg.shapes_size, cfg.seed, cfg.shapes_style)
  if kind == 'folder':
    return ImageFolderSource(cfg.path)
  if kind == 'tfds':
    return TfdsSource(cfg.name, cfg.split, cfg.data_dir or None)
  raise UserError(f"data.source must be 'shapes', 'folder' or 'tfds', got {kind!r}")


def process_slice(ds, local_batch: int, process_index: int, process_count: int):
  """Batches of `local_batch` where process p reads rows [p L, (p + 1) L) of every global batch of
  P x L, so the global batch (and each element's random draws, seeded by its index in the whole
  stream) is the same whatever the number of processes. Lazy: a process decodes only its rows."""
  return ds.batch(local_batch, drop_remainder=True)[process_index::process_count]


def make_image_dataset(cfg, *, image_size: int, global_batch: int, seed: int, train: bool = True,
                       process_index: int = 0, process_count: int = 1):
  """A checkpointable iterator of per-process batches {'image': uint8 (b, S, S, 3), 'label',
  'skipped'} with b = global_batch / process_count."""
  if global_batch % process_count:
    raise UserError(f'global batch {global_batch} is not divisible by {process_count} processes')
  source = make_source(cfg)
  ds = grain.MapDataset.source(source)
  ds = ds.map_with_index(lambda i, r: (r, i))
  if train:
    ds = ds.shuffle(seed=seed).repeat()
  ds = ds.seed(seed).random_map(DecodeAugment(source, image_size, train))
  ds = process_slice(ds, global_batch // process_count, process_index, process_count)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads,
                                               prefetch_buffer_size=cfg.prefetch))
  workers = cfg.num_workers
  if workers:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return iter(it_ds), source


def labelled_images(cfg, image_size: int, n: int, *, skip: int = 0, seed: int = 0):
  """`n` centre-cropped (uint8 images, int32 labels) of the data section `cfg`, in a fixed random
  order of its records (seed), after the first `skip` of that order; for evaluation-style tasks
  (linear probing, in-painting) that need a labelled set, not a training stream."""
  source = make_source(cfg)
  if skip + n > len(source):
    raise ValueError(f'{skip + n} images asked of a source with {len(source)} records; lower the '
                     'image counts or use a larger data source')
  order = np.random.default_rng(seed).permutation(len(source))[skip:skip + n]
  dec = DecodeAugment(source, image_size, train=False)
  items = [dec.random_map((source[int(i)], int(i)), np.random.default_rng(0)) for i in order]
  return (np.stack([it['image'] for it in items]),
          np.array([int(it['label']) for it in items], np.int32))
