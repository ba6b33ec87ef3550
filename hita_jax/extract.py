"""The `extract_codes` task: tokenize a dataset once with a frozen (EMA-exported) tokenizer into
sharded ArrayRecord files of (label, holistic codes, patch codes), LlamaGen-style pre-extraction.

Each process writes its own shards (`codes-<process>-<shard>.array_record`, each written to a
temporary name and renamed when complete), so a rerun skips finished shards. Images are centre
cropped (`flip` also stores the horizontally flipped image). `manifest.json` records the tokenizer
checkpoint and config the codes came from. `train_ar` reads the directory with grain.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from hita_jax import config_lib, data


def pack(label: int, holistic: np.ndarray, patch: np.ndarray) -> bytes:
  return np.concatenate([[label], holistic, patch]).astype(np.int32).tobytes()


def unpack(record: bytes, num_holistic: int) -> dict[str, np.ndarray]:
  a = np.frombuffer(record, np.int32)
  return {'label': a[0], 'holistic_codes': a[1:1 + num_holistic], 'patch_codes': a[1 + num_holistic:]}


def encode_fn(tokenizer):
  from flax import nnx
  tokenizer.eval()
  graphdef, state = nnx.split(tokenizer)

  @jax.jit
  def encode(state, images_u8):
    tok = nnx.merge(graphdef, state, copy=True)
    return tok.encode(images_u8.astype(jnp.float32) / 127.5 - 1.0)
  return lambda images: encode(state, images)


def run(config, workdir: str):
  from array_record.python.array_record_module import ArrayRecordWriter
  from hita_jax.convert.tokenizer import build_tokenizer
  ex = config.extract
  if not config.init.tokenizer:
    raise ValueError('extract_codes needs --config.init.tokenizer=<tokenizer export or official file>')
  tcfg = config_lib.tokenizer_config_from(config.tokenizer)
  tok = build_tokenizer(tcfg, tokenizer_ckpt=config.init.tokenizer, key=config.init.tokenizer_key,
                        dinov2=config.init.dinov2)
  encode = encode_fn(tok)
  out = ex.output_dir or os.path.join(workdir, 'codes')
  os.makedirs(out, exist_ok=True)
  source = data.make_source(config.data)
  pid, pcount = jax.process_index(), jax.process_count()
  indices = np.arange(len(source))[pid::pcount]
  if ex.max_examples:
    indices = indices[:ex.max_examples]
  per_shard = ex.examples_per_shard
  n_shards = -(-len(indices) // per_shard)
  decode = data.DecodeAugment(source, tcfg.image_size, train=False)
  written = 0
  for s in range(n_shards):
    path = os.path.join(out, f'codes-{pid:05d}-{s:05d}.array_record')
    if os.path.exists(path):
      continue
    idx = indices[s * per_shard:(s + 1) * per_shard]
    items = [decode.random_map((source[int(i)], int(i)), np.random.default_rng(0)) for i in idx]
    images = np.stack([it['image'] for it in items])
    labels = [int(it['label']) for it in items]
    variants = [images] + ([images[:, :, ::-1]] if ex.flip else [])
    writer = ArrayRecordWriter(path + '.tmp', 'group_size:1')
    for imgs in variants:
      for b in range(0, len(imgs), ex.batch_size):
        chunk = imgs[b:b + ex.batch_size]
        real = len(chunk)
        if real < ex.batch_size:
          chunk = np.concatenate([chunk, np.zeros((ex.batch_size - real,) + chunk.shape[1:], np.uint8)])
        hol, patch = jax.device_get(encode(jnp.asarray(np.ascontiguousarray(chunk))))
        for j in range(real):
          writer.write(pack(labels[b + j], hol[j], patch[j]))
          written += 1
    writer.close()
    os.replace(path + '.tmp', path)
    print(f'  shard {s + 1}/{n_shards} written ({path})', flush=True)
  manifest = {'tokenizer_checkpoint': os.path.abspath(config.init.tokenizer),
              'tokenizer_config': dataclasses.asdict(tcfg), 'flip': bool(ex.flip),
              'num_holistic': tcfg.num_holistic, 'num_patches': tcfg.grid() ** 2,
              'data': config.data.to_dict(), 'process_count': pcount}
  if pid == 0:
    with open(os.path.join(out, 'manifest.json'), 'w') as f:
      json.dump(manifest, f, indent=1, default=str)
  print(f'extracted {written} sequences into {out}')
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
