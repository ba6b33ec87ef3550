"""The `extract_codes` task: tokenize a dataset once with a frozen (EMA-exported) tokenizer into
sharded ArrayRecord files of (label, holistic codes, patch codes), LlamaGen-style pre-extraction.

Views per image (`extract.views`):
* `center`: the ADM centre crop (what evaluation sees);
* `flip`: the centre crop and its horizontal flip;
* `ten_crop`: LlamaGen's `--ten-crop`: centre crop at `crop_range` x size (1.1), then torchvision's
  TenCrop (four corners + centre, of the image and of its mirror image).
One record holds all views of one image; `train_ar` draws one view at random each time it reads
the record (LlamaGen's choice of augmentation per sample), so an epoch is still one pass over images.

Each process encodes its slice of the dataset (`index % process_count`) on its local devices (the
batch is split over them) and writes its own shards (`codes-<process>-<shard>.array_record`, written
under a temporary name and renamed when complete), so a rerun skips finished shards.
`manifest.json` records the tokenizer checkpoint and config the codes came from.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from hita_jax import config_lib, data, sharding

VIEWS = {'center': 1, 'flip': 2, 'ten_crop': 10}


def pack(label: int, holistic: np.ndarray, patch: np.ndarray) -> bytes:
  """One image: `holistic` (V, H) and `patch` (V, P) codes of its V views."""
  holistic, patch = np.atleast_2d(holistic), np.atleast_2d(patch)
  return np.concatenate([[label, len(holistic)], holistic.ravel(), patch.ravel()]).astype(np.int32).tobytes()


def unpack(record: bytes, num_holistic: int) -> dict[str, np.ndarray]:
  a = np.frombuffer(record, np.int32)
  label, v = a[0], int(a[1])
  body = a[2:]
  hol = body[:v * num_holistic].reshape(v, num_holistic)
  patch = body[v * num_holistic:].reshape(v, -1)
  return {'label': label, 'holistic_codes': hol, 'patch_codes': patch}


def five_crop(img: np.ndarray, size: int) -> list[np.ndarray]:
  """torchvision `five_crop`: top-left, top-right, bottom-left, bottom-right, centre."""
  h, w = img.shape[:2]
  if size > h or size > w:
    raise ValueError(f'crop {size} is larger than the image {h}x{w}')
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return [img[:size, :size], img[:size, w - size:], img[h - size:, :size], img[h - size:, w - size:],
          img[top:top + size, left:left + size]]


def image_views(pil: Image.Image, size: int, views: str, crop_range: float = 1.1) -> np.ndarray:
  """(V, size, size, 3) uint8 views of one image (see the module docstring)."""
  if views == 'ten_crop':
    big = data.center_crop_arr(pil, int(size * crop_range))
    crops = five_crop(big, size) + five_crop(np.ascontiguousarray(big[:, ::-1]), size)
    return np.stack(crops)
  arr = data.center_crop_arr(pil, size)
  return np.stack([arr, arr[:, ::-1]] if views == 'flip' else [arr])


def encode_fn(tokenizer, mesh=None, rules=None):
  """uint8 (B, S, S, 3) -> (holistic, patch) codes; with a mesh the batch is split over it."""
  from flax import nnx
  tokenizer.eval()
  if mesh is not None:
    sharding.shard_module(tokenizer, mesh, rules)
  graphdef, state = nnx.split(tokenizer)
  in_sh = sharding.batch_sharding(mesh, rules, 4) if mesh is not None else None

  @jax.jit
  def encode(state, images_u8):
    tok = nnx.merge(graphdef, state, copy=True)
    return tok.encode(images_u8.astype(jnp.float32) / 127.5 - 1.0)
  if in_sh is None:
    return lambda images: encode(state, images)
  return lambda images: encode(state, jax.device_put(images, in_sh))


def _views_of(ex) -> str:
  views = ex.get('views', 'center')
  if ex.get('flip', False) and views == 'center':
    views = 'flip'  # the older boolean spelling
  if views not in VIEWS:
    raise ValueError(f"config.extract.views={views!r} is not valid; choose one of {sorted(VIEWS)}")
  return views


def run(config, workdir: str):
  from array_record.python.array_record_module import ArrayRecordWriter
  from hita_jax.convert.tokenizer import build_tokenizer
  ex = config.extract
  if not config.init.tokenizer:
    raise ValueError('extract_codes needs --config.init.tokenizer=<tokenizer export or official file>')
  views = _views_of(ex)
  n_views = VIEWS[views]
  tcfg = config_lib.tokenizer_config_from(config.tokenizer)
  tok = build_tokenizer(tcfg, tokenizer_ckpt=config.init.tokenizer, key=config.init.tokenizer_key,
                        dinov2=config.init.dinov2)
  # This process's devices only: processes work independently on their own slices.
  local = jax.local_devices()
  mesh = sharding.make_mesh([('data', len(local))], local)
  encode = encode_fn(tok, mesh, [('batch', 'data')])
  batch = -(-ex.batch_size // len(local)) * len(local)  # a multiple of the local device count
  out = ex.output_dir or os.path.join(workdir, 'codes')
  os.makedirs(out, exist_ok=True)
  source = data.make_source(config.data)
  pid, pcount = jax.process_index(), jax.process_count()
  indices = np.arange(len(source))[pid::pcount]
  if ex.max_examples:
    indices = indices[:ex.max_examples]
  per_shard = ex.examples_per_shard
  n_shards = -(-len(indices) // per_shard)
  written = 0
  for s in range(n_shards):
    path = os.path.join(out, f'codes-{pid:05d}-{s:05d}.array_record')
    if os.path.exists(path):
      continue
    idx = indices[s * per_shard:(s + 1) * per_shard]
    labels, images = [], []
    for i in idx:
      pil, label, _ = data.open_readable(source, int(i))
      labels.append(label)
      images.append(image_views(pil, tcfg.image_size, views, ex.get('crop_range', 1.1)))
    flat = np.concatenate(images)  # (n * V, S, S, 3), the views of an image adjacent
    hol, patch = [], []
    for b in range(0, len(flat), batch):
      chunk = flat[b:b + batch]
      real = len(chunk)
      if real < batch:  # one compiled shape
        chunk = np.concatenate([chunk, np.zeros((batch - real,) + chunk.shape[1:], np.uint8)])
      h, p = jax.device_get(encode(np.ascontiguousarray(chunk)))
      hol.append(h[:real])
      patch.append(p[:real])
    hol = np.concatenate(hol).reshape(len(idx), n_views, -1)
    patch = np.concatenate(patch).reshape(len(idx), n_views, -1)
    writer = ArrayRecordWriter(path + '.tmp', 'group_size:1')
    for j in range(len(idx)):
      writer.write(pack(labels[j], hol[j], patch[j]))
      written += 1
    writer.close()
    os.replace(path + '.tmp', path)
    print(f'  shard {s + 1}/{n_shards} written ({path})', flush=True)
  manifest = {'tokenizer_checkpoint': os.path.abspath(config.init.tokenizer),
              'tokenizer_config': dataclasses.asdict(tcfg), 'views': views, 'num_views': n_views,
              'crop_range': float(ex.get('crop_range', 1.1)),
              'num_holistic': tcfg.num_holistic, 'num_patches': tcfg.grid() ** 2,
              'data': config.data.to_dict(), 'process_count': pcount}
  if pid == 0:
    with open(os.path.join(out, 'manifest.json'), 'w') as f:
      json.dump(manifest, f, indent=1, default=str)
  print(f'extracted {written} images x {n_views} views into {out}')
  return out


class CodesSource:
  """Random access over an extraction directory's ArrayRecord shards."""

  def __init__(self, directory: str):
    import glob
    import grain
    files = sorted(glob.glob(os.path.join(directory, 'codes-*.array_record')))
    if not files:
      raise FileNotFoundError(f'no code shards in {directory}; run the extract_codes task first')
    with open(os.path.join(directory, 'manifest.json')) as f:
      self.manifest = json.load(f)
    self.src = grain.sources.ArrayRecordDataSource(files)
    self.num_holistic = self.manifest['num_holistic']

  def __len__(self):
    return len(self.src)

  def __getitem__(self, i):
    return unpack(self.src[int(i)], self.num_holistic)


def pick_view(record: dict, rng: np.random.Generator) -> dict:
  """One of the record's views, at random (a grain RandomMap on CodesSource records)."""
  v = int(rng.integers(0, record['holistic_codes'].shape[0]))
  return {'label': np.int32(record['label']), 'holistic_codes': record['holistic_codes'][v],
          'patch_codes': record['patch_codes'][v]}
