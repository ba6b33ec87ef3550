"""The `style_transfer` task (paper Fig. 2a / 8, zero-shot): decode each content image's patch codes
with a reference image's holistic codes.

Inputs: `style_transfer.content` and `style_transfer.reference` (folders, `.npz` batches or
comma-separated files), centre-cropped to `style_transfer.image_size` (any multiple of the
tokenizer's down-sampling; the position tables are resized as the official code does).

Variants (`style_transfer.variants`, comma-separated):
  `all`      every holistic code from the reference;
  `first:m`  the reference's first m holistic codes, the content's own for the rest;
  `last:m`   the reference's last m holistic codes;
  `blend`    one holistic sequence from all references together (one extra column): per position,
             `blend_rule='nearest_mean'` takes the codebook vector nearest (by the quantizer's own
             distance) to the mean of the references' quantised unit vectors, `'majority'` the most
             frequent code among the references (ties: the lowest reference index).

Outputs in the workdir: `style_transfer_<variant>.png` (top row: the references; left column: the
content images; the rest: results; the top-left cell shows the reconstruction column's header, a
white square, and the second column holds each content's own reconstruction), the same grids in
TensorBoard, and `style_transfer.json` with, per variant, the colour-statistics distance to the
reference (L2 over channels of the per-channel mean plus the per-channel std, pixels in [0, 1])
before (the content's own reconstruction) and after, its relative fall, and the edge-map
correlation (Pearson, Sobel magnitude of the luminance) of each result with its content image.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import ndimage

from hita_jax import config_lib, pretrained
from hita_jax.data.images import image_grid, load_image_set, save_png, to_uint8, to_unit

# -- measures ----------------------------------------------------------------------------------------


def colour_stats(images_u8: np.ndarray) -> np.ndarray:
  """(N, H, W, 3) uint8 -> (N, 6): per-channel mean then per-channel std, pixels in [0, 1]."""
  x = np.asarray(images_u8, np.float32) / 255.0
  return np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=-1)


def colour_distance(a_u8: np.ndarray, b_u8: np.ndarray) -> np.ndarray:
  """Per pair: |mean_a - mean_b| + |std_a - std_b| (L2 over the 3 channels each). (N,)"""
  sa, sb = colour_stats(a_u8), colour_stats(b_u8)
  return np.linalg.norm(sa[:, :3] - sb[:, :3], axis=-1) + np.linalg.norm(sa[:, 3:] - sb[:, 3:], axis=-1)


def edge_map(images_u8: np.ndarray) -> np.ndarray:
  """Sobel gradient magnitude of the luminance: (N, H, W)."""
  lum = np.asarray(images_u8, np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255.0
  gx = ndimage.sobel(lum, axis=2, mode='nearest')
  gy = ndimage.sobel(lum, axis=1, mode='nearest')
  return np.hypot(gx, gy)


def edge_correlation(a_u8: np.ndarray, b_u8: np.ndarray) -> np.ndarray:
  """Pearson correlation of the edge maps of each pair (N,); 0 where an image has no edges."""
  ea, eb = edge_map(a_u8).reshape(len(a_u8), -1), edge_map(b_u8).reshape(len(b_u8), -1)
  ea, eb = ea - ea.mean(1, keepdims=True), eb - eb.mean(1, keepdims=True)
  den = np.sqrt((ea ** 2).sum(1) * (eb ** 2).sum(1))
  return np.where(den > 0, (ea * eb).sum(1) / np.maximum(den, 1e-12), 0.0)


# -- the transfer --------------------------------------------------------------------------------------


def parse_variants(spec: str, num_holistic: int) -> list[tuple[str, int]]:
  """'all,first:4,last:4,blend' -> [('all', S), ('first', 4), ('last', 4), ('blend', S)]."""
  out = []
  for item in filter(None, (v.strip() for v in spec.split(','))):
    kind, _, m = item.partition(':')
    if kind not in ('all', 'first', 'last', 'blend'):
      raise ValueError(f'unknown style-transfer variant {item!r}; valid: all, first:m, last:m, blend')
    m = int(m) if m else num_holistic
    if not 1 <= m <= num_holistic:
      raise ValueError(f'variant {item!r}: m must be in 1..{num_holistic} (the holistic tokens)')
    out.append((kind, m))
  if not out:
    raise ValueError('style_transfer.variants is empty; e.g. all,first:4,last:4,blend')
  return out


def blend_codes(tok, ref_hol: jax.Array, rule: str) -> jax.Array:
  """(R, S) holistic codes of several references -> (S,) one blended sequence (module docstring)."""
  if rule == 'nearest_mean':
    mean = tok.holistic_quantizer.lookup(ref_hol).mean(axis=0)  # (S, e): unit vectors averaged
    _, idx, _ = tok.holistic_quantizer(mean)  # the quantizer normalises, then takes the nearest
    return idx
  if rule == 'majority':
    v = tok.cfg.codebook_size
    counts = jax.nn.one_hot(ref_hol, v, dtype=jnp.int32).sum(0)  # (S, V)
    first_seen = jnp.where(jax.nn.one_hot(ref_hol, v, dtype=bool),
                           jnp.arange(ref_hol.shape[0])[:, None, None], ref_hol.shape[0]).min(0)
    # most votes; among equal votes the code of the earliest reference
    return jnp.argmax(counts * (ref_hol.shape[0] + 1) - first_seen, axis=-1).astype(jnp.int32)
  raise ValueError(f"style_transfer.blend_rule={rule!r}: use 'nearest_mean' or 'majority'")


def mix_holistic(content_hol, ref_hol, kind: str, m: int):
  """Content (S,) and reference (S,) holistic codes -> the codes a result is decoded with."""
  s = content_hol.shape[-1]
  pos = jnp.arange(s)
  take_ref = {'all': pos >= 0, 'blend': pos >= 0, 'first': pos < m, 'last': pos >= s - m}[kind]
  return jnp.where(take_ref, ref_hol, content_hol)


class CodeIO:
  """Jitted encode / decode of uint8 images with one tokenizer. Every call runs on chunks padded to
  `batch`, so each image size compiles once for encoding and once for decoding."""

  def __init__(self, tok, batch: int = 32):
    tok.eval()
    self.tok, self.batch = tok, batch
    self.graph, self.state = nnx.split(tok)
    self._encode = jax.jit(lambda st, x: nnx.merge(self.graph, st).encode(to_unit(x)))
    self._decode = jax.jit(lambda st, h, p: to_uint8(nnx.merge(self.graph, st).decode(h, p)))

  def _chunks(self, fn, *arrays):
    n, b = len(arrays[0]), self.batch
    outs = []
    for i in range(0, n, b):
      parts = [jnp.asarray(a[i:i + b]) for a in arrays]
      real = parts[0].shape[0]
      parts = [jnp.pad(p, [(0, b - real)] + [(0, 0)] * (p.ndim - 1)) for p in parts]
      out = fn(self.state, *parts)
      outs.append(jax.tree.map(lambda o, real=real: o[:real], out))
    return jax.tree.map(lambda *o: jnp.concatenate(o), *outs)

  def encode(self, images_u8):
    """(N, H, W, 3) uint8 -> (holistic (N, S), patch (N, h*w)) codes."""
    return self._chunks(self._encode, images_u8)

  def decode(self, hol, patch) -> np.ndarray:
    """Codes -> (N, H, W, 3) uint8 images at the tokenizer's grid size of `patch`."""
    return np.asarray(self._chunks(self._decode, hol, patch))


def transfer(tok, content_u8: np.ndarray, reference_u8: np.ndarray, variants: str = 'all',
             blend_rule: str = 'nearest_mean', io: CodeIO | None = None) -> dict:
  """Every content x reference result for every variant. Returns {'reconstructions': (C, H, W, 3),
  'variants': {name: {'images': (C, R', H, W, 3), 'measures': dict}}}, R' = 1 for `blend`."""
  io = io or CodeIO(tok)
  c = len(content_u8)
  hol_c, patch_c = io.encode(content_u8)
  hol_r, _ = io.encode(reference_u8)
  recon = io.decode(hol_c, patch_c)
  out = {'reconstructions': recon, 'variants': {}}
  for kind, m in parse_variants(variants, tok.cfg.num_holistic):
    name = kind if kind in ('all', 'blend') else f'{kind}:{m}'
    refs = blend_codes(tok, hol_r, blend_rule)[None] if kind == 'blend' else hol_r  # (R', S)
    rr = refs.shape[0]
    hol = mix_holistic(jnp.repeat(hol_c, rr, 0), jnp.tile(refs, (c, 1)), kind, m)
    images = io.decode(hol, jnp.repeat(patch_c, rr, 0)).reshape(c, rr, *content_u8.shape[1:])
    out['variants'][name] = {'images': images,
                             'measures': measures(content_u8, recon, reference_u8, images, kind)}
  return out


def measures(content_u8, recon_u8, reference_u8, results_u8, kind: str) -> dict:
  """Colour distance to the reference before (the content's reconstruction) / after, and the edge
  correlation of each result with its content (for `blend` the references' mean statistics)."""
  c, rr = results_u8.shape[:2]
  flat = results_u8.reshape(c * rr, *results_u8.shape[2:])
  if kind == 'blend':  # distance to the references' mean statistics
    target = colour_stats(reference_u8).mean(0, keepdims=True)
    def dist(x):
      s = colour_stats(x)
      return (np.linalg.norm(s[:, :3] - target[:, :3], axis=-1)
              + np.linalg.norm(s[:, 3:] - target[:, 3:], axis=-1))
    before, after = dist(recon_u8), dist(flat)
  else:
    ref = np.tile(reference_u8, (c, 1, 1, 1))
    before = colour_distance(np.repeat(recon_u8, rr, 0), ref)
    after = colour_distance(flat, ref)
  edges = edge_correlation(flat, np.repeat(content_u8, rr, 0))
  b, a = float(np.mean(before)), float(np.mean(after))
  return {'colour_distance_before': b, 'colour_distance_after': a,
          'colour_distance_fall': float(1.0 - a / max(b, 1e-9)),
          'edge_correlation_with_content': float(np.mean(edges)),
          'edge_correlation_reconstruction': float(np.mean(edge_correlation(recon_u8, content_u8))),
          'pairs': int(c * rr)}


def result_grid(content_u8, reference_u8, recon_u8, images) -> np.ndarray:
  """Top row: [blank, blank, references...]; then per content: [content, reconstruction, results]."""
  blank = np.full_like(content_u8[:1], 255)
  refs = reference_u8 if images.shape[1] == len(reference_u8) else reference_u8[:images.shape[1]]
  rows = [np.concatenate([blank, blank, refs])]
  for i in range(len(content_u8)):
    rows.append(np.concatenate([content_u8[i:i + 1], recon_u8[i:i + 1], images[i]]))
  return np.concatenate(rows), len(rows)


def write_outputs(result: dict, content_u8, reference_u8, out_dir: str, *, scale: int = 1,
                  prefix: str = 'style_transfer', logger=None) -> dict:
  """PNG grids (and TensorBoard images when `logger` is a training.MetricLogger) + the JSON."""
  os.makedirs(out_dir, exist_ok=True)
  report = {}
  for name, v in result['variants'].items():
    tag = f"{prefix}_{name.replace(':', '')}"
    grid, rows = result_grid(content_u8, reference_u8, result['reconstructions'], v['images'])
    save_png(os.path.join(out_dir, f'{tag}.png'), image_grid(grid, rows=rows, scale=scale))
    if logger is not None:
      logger.image(0, tag, grid, rows=rows)
    report[name] = v['measures']
  with open(os.path.join(out_dir, f'{prefix}.json'), 'w') as f:
    json.dump(report, f, indent=1)
  return report


def run(config, workdir: str):
  from hita_jax import training  # CLU / TensorFlow only where event files are written
  st = config.style_transfer
  tcfg = config_lib.tokenizer_config_from(config.tokenizer)
  tok = pretrained.load_tokenizer(tcfg, config.init.tokenizer, key=config.init.tokenizer_key,
                                  dinov2=config.init.get('dinov2'))
  size = st.image_size or tcfg.image_size
  if size % tcfg.downsample:
    raise ValueError(f'style_transfer.image_size={size} is not a multiple of the tokenizer\'s '
                     f'down-sampling {tcfg.downsample}')
  if not st.content or not st.reference:
    raise ValueError('set --config.style_transfer.content and --config.style_transfer.reference '
                     '(folders, .npz files or comma-separated image files)')
  content, _ = load_image_set(st.content, size, st.max_images)
  reference, _ = load_image_set(st.reference, size, st.max_images)
  result = transfer(tok, content, reference, st.variants, st.blend_rule)
  logger = training.MetricLogger(workdir, total_steps=1, start_step=0, every=1, images_per_step=1,
                                 line_keys=())
  report = write_outputs(result, content, reference, workdir, scale=st.png_scale, logger=logger)
  logger.close()
  for name, m in report.items():
    print(f"style transfer {name}: colour distance to the reference {m['colour_distance_before']:.3f} "
          f"-> {m['colour_distance_after']:.3f} ({100 * m['colour_distance_fall']:.0f} % less), edge "
          f"correlation with the content {m['edge_correlation_with_content']:.2f}", flush=True)
  return report
