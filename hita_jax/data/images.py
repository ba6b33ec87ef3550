"""Pixels in and out, one implementation each: uint8 <-> [-1, 1], the ADM crops, the views stored by
code extraction, reading image files and folders, decoded codes as uint8 images, PNG grids."""
from __future__ import annotations

import functools
import math
import os
import zipfile
from typing import Iterator

import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from hita_jax.models.resize import torch_bicubic_resize
from hita_jax.models.sampler import split_codes
from hita_jax.errors import MissingEntryError, UserError, MissingPathError

IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.gif', '.tif', '.tiff')


# -- uint8 <-> model range ----------------------------------------------------------------------------

def to_unit(images_u8):
  """uint8 [0, 255] -> float32 [-1, 1], the tokenizer's input range (official `x / 127.5 - 1`)."""
  return jnp.asarray(images_u8).astype(jnp.float32) / 127.5 - 1.0


def to_uint8(x):
  """[-1, 1] -> uint8 as the official sample and evaluation code: `clamp(127.5 x + 128, 0, 255)`,
  truncated (not rounded) by the cast."""
  return jnp.clip(127.5 * jnp.asarray(x).astype(jnp.float32) + 128.0, 0.0, 255.0).astype(jnp.uint8)


@functools.partial(nnx.jit, static_argnames=('eval_size',))
def codes_to_images(tokenizer, seq, *, eval_size: int | None = 256):
  """Official sample post-processing: decode [holistic | patch] codes at the tokenizer's size, resize
  with PyTorch's bicubic (a=-0.75, no antialias) to `eval_size`, then `to_uint8`. Jitted as one
  program: op by op, the sample task decoded at 86 img/s on an H200, slower than its sampler."""
  hol, patch = split_codes(seq, tokenizer.cfg.num_holistic)
  img = tokenizer.decode(hol, patch)
  if eval_size and img.shape[1] != eval_size:
    img = torch_bicubic_resize(img, (eval_size, eval_size))
  return to_uint8(img)


# -- ADM crops and extraction views ----------------------------------------------------------------

def _adm_resize_short_side(pil_image: Image.Image, short: int) -> np.ndarray:
  """BOX-halve while the short side >= 2x `short`, then BICUBIC-scale the short side to `short`."""
  while min(*pil_image.size) >= 2 * short:
    pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
  scale = short / min(*pil_image.size)
  pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
  return np.array(pil_image)


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
  """ADM `center_crop_arr` (evaluation, extraction)."""
  arr = _adm_resize_short_side(pil_image, image_size)
  y, x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
  return arr[y:y + image_size, x:x + image_size]


def random_crop_arr(pil_image: Image.Image, image_size: int, rng: np.random.Generator,
                    min_crop_frac: float = 0.8, max_crop_frac: float = 1.0) -> np.ndarray:
  """ADM `random_crop_arr` (the official training augmentation): short side to a random size in
  [S / max_crop_frac, S / min_crop_frac], then a random S x S crop."""
  lo = math.ceil(image_size / max_crop_frac)
  hi = math.ceil(image_size / min_crop_frac)
  arr = _adm_resize_short_side(pil_image, int(rng.integers(lo, hi + 1)))
  y = int(rng.integers(0, arr.shape[0] - image_size + 1))
  x = int(rng.integers(0, arr.shape[1] - image_size + 1))
  return arr[y:y + image_size, x:x + image_size]


# Views per image that `extract_codes` can store (one is drawn per read when training).
VIEWS = ('random_crops', 'center', 'flip', 'ten_crop')


def num_views(views: str, random_crops: int = 5) -> int:
  if views not in VIEWS:
    raise UserError(f'views={views!r} is not valid; choose one of {list(VIEWS)}')
  return {'center': 1, 'flip': 2, 'ten_crop': 10, 'random_crops': 2 * random_crops}[views]


def five_crop(img: np.ndarray, size: int) -> list[np.ndarray]:
  """torchvision `five_crop`: top-left, top-right, bottom-left, bottom-right, centre."""
  h, w = img.shape[:2]
  if size > h or size > w:
    raise UserError(f'crop {size} is larger than the image {h}x{w}')
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return [img[:size, :size], img[:size, w - size:], img[h - size:, :size], img[h - size:, w - size:],
          img[top:top + size, left:left + size]]


def image_views(pil: Image.Image, size: int, views: str, crop_range: float = 1.1, *,
                random_crops: int = 5, rng: np.random.Generator | None = None) -> np.ndarray:
  """(V, size, size, 3) uint8 views of one image:
  * `random_crops`: K = `random_crops` draws of the official training augmentation (ADM
    `random_crop_arr` from `rng`), each followed by its mirror image: a fixed sample of what
    train_c2i.py draws afresh every epoch (random crop, flip with p = 0.5);
  * `center` (the ADM centre crop), `flip` (it and its mirror image);
  * `ten_crop` (LlamaGen: centre crop at `crop_range` x size, then TenCrop)."""
  num_views(views, random_crops)  # validates the name
  if views == 'random_crops':
    if rng is None:
      raise UserError('random_crops views need the per-image rng')
    crops = [random_crop_arr(pil, size, rng) for _ in range(random_crops)]
    return np.stack([v for c in crops for v in (c, c[:, ::-1])])
  if views == 'ten_crop':
    big = center_crop_arr(pil, int(size * crop_range))
    crops = five_crop(big, size) + five_crop(np.ascontiguousarray(big[:, ::-1]), size)
    return np.stack(crops)
  arr = center_crop_arr(pil, size)
  return np.stack([arr, arr[:, ::-1]] if views == 'flip' else [arr])


# -- files -----------------------------------------------------------------------------------------

def list_images(root: str) -> list[str]:
  """Image files under `root`, recursively, sorted (extensions compared case-insensitively)."""
  return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                if f.lower().endswith(IMAGE_EXTS))


def read_rgb(path_or_file) -> Image.Image:
  """An image file (path or file object) decoded to RGB; raises on corrupt files."""
  with Image.open(path_or_file) as img:
    img.load()
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
  """Any PIL mode -> RGB as the official loader (`convert('RGB')`: grayscale, CMYK, palette; RGBA
  drops alpha), except 16/32-bit and float images, which PIL would clip to 0/255: they are scaled to
  8 bits first."""
  if img.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I', 'F'):
    a = np.asarray(img, np.float64)
    top = 65535.0 if img.mode.startswith('I;16') or a.max() > 255 else 255.0
    img = Image.fromarray(np.clip(np.round(a * (255.0 / top)), 0, 255).astype(np.uint8))
  return img.convert('RGB')


def iter_center_crops(path: str, size: int) -> Iterator[np.ndarray]:
  """Centre-cropped uint8 images from an ADM `.npz` (`arr_0`) or a folder (recursively, sorted);
  unreadable files are skipped and counted."""
  if path.endswith('.npz'):
    for img in read_images_npz(path):
      yield center_crop_arr(Image.fromarray(img), size)
    return
  if not os.path.isdir(path):
    raise MissingPathError(f'image source not found: {path} (an .npz with arr_0 or a folder)')
  files = list_images(path)
  skipped = 0
  for f in files:
    try:
      img = read_rgb(f)
    except Exception as e:  # corrupt or unreadable: skip, never fatal
      skipped += 1
      print(f'  skipped unreadable image {f}: {e}')
      continue
    yield center_crop_arr(img, size)
  if skipped:
    print(f'  {skipped} of {len(files)} files were skipped')


def load_image_set(spec, size: int, limit: int = 0) -> tuple[np.ndarray, list[str]]:
  """Centre-cropped uint8 images (N, size, size, 3) and their names from a folder (recursively,
  sorted), an ADM `.npz`, a comma-separated list of files, or a list of paths; `limit` > 0 keeps
  the first `limit`. Used by the zero-shot tasks (style transfer, in-painting)."""
  if isinstance(spec, str) and (os.path.isdir(spec) or spec.endswith('.npz')):
    names = list_images(spec) if os.path.isdir(spec) else []
    imgs = []
    for img in iter_center_crops(spec, size):
      imgs.append(img)
      if limit and len(imgs) >= limit:
        break
    names = [os.path.basename(n) for n in names[:len(imgs)]] or [f'{spec}[{i}]' for i in range(len(imgs))]
  else:
    files = [f.strip() for f in (spec.split(',') if isinstance(spec, str) else spec) if f.strip()]
    files = files[:limit] if limit else files
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
      raise FileNotFoundError(f'image files not found: {missing[:3]} (give a folder, an .npz or '
                              'comma-separated image files)')
    imgs = [center_crop_arr(read_rgb(f), size) for f in files]
    names = [os.path.basename(f) for f in files]
  if not imgs:
    raise ValueError(f'no images found in {spec!r} (give a folder, an .npz or comma-separated files)')
  return np.stack(imgs), names


def read_images_npz(path: str, key: str = 'arr_0') -> np.ndarray:
  """Images (uint8 N x H x W x 3) from an ADM-style npz (memory-mapped where possible)."""
  if not os.path.exists(path):
    raise MissingPathError(f'batch file not found: {path}')
  try:
    with np.load(path, allow_pickle=False) as z:
      if key not in z.files:
        raise MissingEntryError(f'{path} has no {key!r} array (keys: {z.files})')
      arr = z[key]
  except MissingEntryError:
    raise
  except (zipfile.BadZipFile, ValueError, OSError) as e:
    raise UserError(f'{path}: not a readable .npz batch ({e})') from e
  if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
    raise UserError(f'{path}:{key} must be uint8 (N, H, W, 3), got {arr.dtype} {arr.shape}')
  return arr


# -- pictures --------------------------------------------------------------------------------------

def image_grid(images: np.ndarray, rows: int | None = None, scale: int = 1) -> np.ndarray:
  """(N, H, W, 3) uint8 -> one (rows*H, cols*W, 3) grid, each pixel repeated `scale` times."""
  images = np.asarray(images, np.uint8)
  n, h, w, c = images.shape
  rows = rows or int(np.ceil(np.sqrt(n)))
  cols = int(np.ceil(n / rows))
  grid = np.zeros((rows * h, cols * w, c), np.uint8)
  for i, img in enumerate(images):
    r, q = divmod(i, cols)
    grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
  if scale > 1:
    grid = np.repeat(np.repeat(grid, scale, 0), scale, 1)
  return grid


def save_png(path: str, image: np.ndarray):
  Image.fromarray(np.asarray(image, np.uint8)).save(path)
