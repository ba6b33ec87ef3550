"""The `sample` task: N class-conditional images with the jitted KV-cache sampler, written as PNGs
and as an ADM-compatible `.npz` (`arr_0` uint8 N x 256 x 256 x 3, `arr_1` the labels, as the
guided-diffusion sample scripts save them), resumable.

Images are produced in chunks of one global batch; chunk i uses the key `fold_in(seed, i)` and the
labels of its global indices, so a rerun after an interruption skips the chunks already on disk
(each is written atomically) and produces exactly the images an uninterrupted run would.
Classes are balanced (`i % num_classes`, in a seeded order) or drawn at random as `test_net.py`.
"""
from __future__ import annotations

import glob
import json
import os
import time

import jax
import numpy as np

from hita_jax import config_lib, pretrained, sharding
from hita_jax.data.images import codes_to_images, save_png
from hita_jax.models.gpt import gpt_config_from
from hita_jax.models.sampler import for_sampling, generate
from hita_jax.errors import UserError


def labels_for(num_images: int, num_classes: int, mode: str, seed: int) -> np.ndarray:
  if mode == 'balanced':
    labels = np.arange(num_images) % num_classes
    return np.random.default_rng(seed).permutation(labels).astype(np.int32)
  if mode == 'random':
    return np.random.default_rng(seed).integers(0, num_classes, num_images).astype(np.int32)
  raise UserError(f"sample.classes must be 'balanced' or 'random', got {mode!r}")


def _atomic_savez(path: str, **arrays):
  tmp = path + '.tmp.npz'
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def run(config, workdir: str):
  sc = config.sample
  init = config.init
  config_lib.check_paths(config)
  if not init.gpt or not init.tokenizer:
    raise UserError('the sample task needs --config.init.gpt=<GPT export or official .pt> and '
                     '--config.init.tokenizer=<tokenizer export or official .pt>')
  mesh = sharding.make_mesh(config_lib.mesh_spec(config, jax.device_count()))
  rules = config_lib.axis_rules(config)
  gcfg = gpt_config_from(config.gpt)
  gpt = pretrained.load_gpt(gcfg, init.gpt, key=init.gpt_key)
  gpt.eval()
  gpt, _ = for_sampling(gpt, sc.dtype)  # test_net.py: bf16 weights and KV cache
  legacy = sc.legacy_pos128_embedding or pretrained.wants_legacy_sampler(init.gpt)
  tcfg = config_lib.tokenizer_config_from(config.tokenizer)
  tok = pretrained.load_tokenizer(tcfg, init.tokenizer, key=init.tokenizer_key)
  tok.eval()
  sharding.shard_module(gpt, mesh, rules)
  sharding.shard_module(tok, mesh, rules)  # decoding runs on the mesh too (and across processes)
  n_dev = mesh.devices.size
  batch = sc.per_device_batch * n_dev
  labels = labels_for(sc.num_images, gcfg.num_classes, sc.classes, sc.seed)
  out_dir = os.path.join(workdir, 'samples')
  chunk_dir = os.path.join(out_dir, 'chunks')
  os.makedirs(chunk_dir, exist_ok=True)
  if sc.save_png:
    os.makedirs(os.path.join(out_dir, 'png'), exist_ok=True)
  n_chunks = -(-sc.num_images // batch)
  lab_sh = sharding.batch_sharding(mesh, rules, 1)
  key = jax.random.key(sc.seed)
  t0, done_now = time.time(), 0
  stages = {'generate_s': 0.0, 'decode_s': 0.0, 'write_s': 0.0}  # this run's chunks only
  timing_file = os.path.join(workdir, 'sample_timings.json')
  base = _read_timings(timing_file) if sharding.is_main_process() else {}
  print(f'sampling {sc.num_images} images in {n_chunks} chunks of {batch} '
        f'(cfg {sc.cfg_scale}, legacy_pos128_embedding={bool(legacy)})', flush=True)
  # Process 0's disk decides which chunks are done, so that every process runs the same chunks.
  done = sharding.broadcast_from_main(np.array(
      [os.path.exists(os.path.join(chunk_dir, f'chunk_{c:06d}.npz')) for c in range(n_chunks)]))
  for c in range(n_chunks):
    path = os.path.join(chunk_dir, f'chunk_{c:06d}.npz')
    if done[c]:
      continue
    lab = labels[c * batch:(c + 1) * batch]
    real = len(lab)
    lab = np.concatenate([lab, np.zeros(batch - real, np.int32)])  # fixed compiled shape
    t = time.time()
    with jax.set_mesh(mesh):  # the decode-attention kernel splits itself over the batch under it
      codes = generate(gpt, sharding.put(lab, lab_sh), jax.random.fold_in(key, c),
                       cfg_scale=sc.cfg_scale, cfg_interval=sc.cfg_interval,
                       temperature=sc.temperature, top_k=sc.top_k, top_p=sc.top_p,
                       legacy_pos128_embedding=bool(legacy), kv_segments=sc.kv_segments)
    codes.block_until_ready()
    stages['generate_s'] += time.time() - t
    t = time.time()
    images = sharding.to_host(codes_to_images(tok, codes, eval_size=sc.eval_size or None))[:real]
    stages['decode_s'] += time.time() - t
    t = time.time()
    if sharding.is_main_process():
      if sc.save_png:
        for i, img in enumerate(images):
          save_png(os.path.join(out_dir, 'png', f'{c * batch + i:06d}.png'), img)
      _atomic_savez(path, images=images, labels=lab[:real])
    stages['write_s'] += time.time() - t
    if not done_now:  # this run's first chunk holds the sampler's and the decoder's compiles
      stages['first_chunk_generate_s'] = stages['generate_s']
      stages['first_chunk_decode_s'] = stages['decode_s']
    done_now += real
    if sharding.is_main_process():
      _write_timings(timing_file, base, stages, done_now)
    el = time.time() - t0
    left = sc.num_images - min((c + 1) * batch, sc.num_images)
    print(f'  chunk {c + 1}/{n_chunks}: {done_now / el:.2f} img/s, ETA {left / max(done_now / el, 1e-9):.0f}s',
          flush=True)
  final = os.path.join(workdir, 'samples.npz')
  sharding.sync('sample:chunks_written')
  if sharding.is_main_process():  # process 0 assembles the .npz from its chunks
    t = time.time()
    _assemble(chunk_dir, n_chunks, sc.num_images, labels, final)
    stages['write_s'] += time.time() - t
    _write_timings(timing_file, base, stages, done_now)
  sharding.sync('sample:npz_written')  # every process may read it next (the fid task does)
  return final


def _read_timings(path: str) -> dict:
  """The sums of earlier runs in this workdir (zeros for a fresh one or a torn file)."""
  base = {'generate_s': 0.0, 'decode_s': 0.0, 'write_s': 0.0, 'images': 0, 'runs': 0}
  if os.path.exists(path):
    try:
      with open(path) as f:
        prev = json.load(f)
      base.update({k: prev[k] for k in base if k in prev})
    except (OSError, ValueError):
      pass  # a torn file: start the sums again rather than fail the samples
  return base


def _write_timings(path: str, base: dict, this_run: dict, images: int):
  """sample_timings.json after every chunk: stage seconds and images summed over every run of this
  workdir (a run killed mid-way and then resumed adds to the first), and `this_run`'s own."""
  total = dict(base)
  for k in ('generate_s', 'decode_s', 'write_s'):
    total[k] += this_run[k]
  total['images'] += images
  total['runs'] += 1
  total['this_run'] = dict(this_run, images=images)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(total, f, indent=1)
  os.replace(tmp, path)


def _assemble(chunk_dir: str, n_chunks: int, num_images: int, labels, final: str):
  chunks = sorted(glob.glob(os.path.join(chunk_dir, 'chunk_*.npz')))
  if len(chunks) != n_chunks:
    raise UserError(f'expected {n_chunks} chunks in {chunk_dir}, found {len(chunks)}')
  imgs, labs = [], []
  for p in chunks:
    with np.load(p) as z:
      imgs.append(z['images'])
      labs.append(z['labels'])
  arr, lab = np.concatenate(imgs), np.concatenate(labs)
  if len(arr) != num_images or not np.array_equal(lab, labels):
    raise UserError(f'{chunk_dir} holds chunks of another run (count or labels differ); '
                       'use a fresh workdir')
  _atomic_savez(final, arr_0=arr, arr_1=lab)
  print(f'wrote {final}: {arr.shape} uint8, labels in arr_1', flush=True)
