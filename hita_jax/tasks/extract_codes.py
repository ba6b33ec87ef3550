"""The `extract_codes` task: tokenize a dataset once with a frozen (EMA-exported) tokenizer into
sharded ArrayRecord files of (label, holistic codes, patch codes), LlamaGen-style pre-extraction.

Views per image (`extract_codes.views`):
* `random_crops` (default): K (`extract_codes.random_crops`, 5) draws of the official training
  augmentation (ADM random crop), each with its mirror image: 2K views, so the fast path samples
  from the same distribution as train_c2i.py's on-the-fly codes (which draw a fresh crop and flip
  every epoch) at the cost of encoding 2K views per image once (10 with K = 5: as much tokenizer
  work as 10 epochs on the fly, against the 50-300 epochs of the recipes);
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
import numpy as np
from flax import nnx

from hita_jax import config_lib, pretrained, sharding
from hita_jax.data.codes import pack, shard_name
from hita_jax.data.images import VIEWS, image_views, num_views, to_unit
from hita_jax.data.sources import make_source, open_readable
from hita_jax.errors import UserError


def encode_fn(tokenizer, mesh, rules):
  """uint8 (B, S, S, 3) -> (holistic, patch) codes, the batch split over `mesh`."""
  tokenizer.eval()
  sharding.shard_module(tokenizer, mesh, rules)
  graphdef, state = nnx.split(tokenizer)
  in_sh = sharding.batch_sharding(mesh, rules, 4)

  @jax.jit
  def encode(state, images_u8):
    tok = nnx.merge(graphdef, state, copy=True)
    return tok.encode(to_unit(images_u8))
  return lambda images: encode(state, jax.device_put(images, in_sh))


def run(config, workdir: str):
  from array_record.python.array_record_module import ArrayRecordWriter  # a grain dependency
  ex = config.extract_codes
  config_lib.check_paths(config)
  if not config.init.tokenizer:
    raise UserError('extract_codes needs --config.init.tokenizer=<tokenizer export or official file>')
  pretrained.require_dinov2(config.init.tokenizer, config.init.dinov2, key=config.init.tokenizer_key,
                            allow_random=config.init.allow_random_dinov2)
  views = ex.views
  if views not in VIEWS:
    raise UserError(f'config.extract_codes.views={views!r} is not valid; choose one of {list(VIEWS)}')
  n_views = num_views(views, ex.random_crops)
  tcfg = config_lib.tokenizer_config_from(config.tokenizer)
  tok = pretrained.load_tokenizer(tcfg, config.init.tokenizer, key=config.init.tokenizer_key,
                                  dinov2=config.init.dinov2,
                                  allow_random_dinov2=config.init.allow_random_dinov2)
  # This process's devices only: processes work independently on their own slices.
  local = jax.local_devices()
  mesh = sharding.make_mesh([('data', len(local))], local)
  encode = encode_fn(tok, mesh, [('batch', 'data')])
  batch = -(-ex.batch_size // len(local)) * len(local)  # a multiple of the local device count
  out = ex.output_dir or os.path.join(workdir, 'codes')
  os.makedirs(out, exist_ok=True)
  source = make_source(config.data)
  pid, pcount = jax.process_index(), jax.process_count()
  indices = np.arange(len(source))[pid::pcount]
  if ex.max_examples:
    indices = indices[:ex.max_examples]
  per_shard = ex.examples_per_shard
  n_shards = -(-len(indices) // per_shard)
  written = 0
  for s in range(n_shards):
    path = os.path.join(out, shard_name(pid, s))
    if os.path.exists(path):
      continue
    idx = indices[s * per_shard:(s + 1) * per_shard]
    labels, images = [], []
    for i in idx:
      pil, label, _ = open_readable(source, int(i))
      labels.append(label)
      # one generator per image: the same crops whatever the sharding or a resumed run
      images.append(image_views(pil, tcfg.image_size, views, ex.crop_range,
                                random_crops=ex.random_crops,
                                rng=np.random.default_rng((config.seed, int(i)))))
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
              'crop_range': float(ex.crop_range), 'random_crops': int(ex.random_crops),
              'num_holistic': tcfg.num_holistic, 'num_patches': tcfg.grid() ** 2,
              'data': config.data.to_dict(), 'process_count': pcount}
  sharding.sync('extract_codes:shards_written')  # the manifest marks a complete directory
  if pid == 0:
    with open(os.path.join(out, 'manifest.json'), 'w') as f:
      json.dump(manifest, f, indent=1, default=str)
  print(f'extracted {written} images x {n_views} views into {out}')
  return out
