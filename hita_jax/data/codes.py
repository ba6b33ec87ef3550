"""Pre-extracted codes: the record format `extract_codes` writes (ArrayRecord shards + manifest),
random access over them, one view drawn per read, and synthetic codes for throughput runs."""
from __future__ import annotations

import glob
import json
import os

import grain
import numpy as np
from hita_jax.errors import MissingPathError, UserError

from hita_jax.data.sources import process_slice


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


def check_code_batch(batch: dict, num_classes: int, vocab_size: int) -> None:
  """Labels and codes of a host batch within the GPT's tables (out of range they would be clipped
  silently inside jit): one line naming the array, the value and the fix otherwise."""
  for key, hi, fix in (('label', num_classes, '--config.gpt.num_classes'),
                       ('holistic_codes', vocab_size, 'the tokenizer config (codebook_size)'),
                       ('patch_codes', vocab_size, 'the tokenizer config (codebook_size)')):
    a = batch.get(key)
    if a is None or not np.size(a):
      continue
    lo, hi_seen = int(np.min(a)), int(np.max(a))
    if lo < 0 or hi_seen >= hi:
      raise UserError(f'{key} out of range: found {hi_seen if hi_seen >= hi else lo}, the GPT takes '
                      f'0..{hi - 1}; the codes do not fit this model: check {fix}')


def shard_name(process_index: int, shard: int) -> str:
  return f'codes-{process_index:05d}-{shard:05d}.array_record'


class CodesSource:
  """Random access over an extraction directory's ArrayRecord shards."""

  def __init__(self, directory: str):
    files = sorted(glob.glob(os.path.join(directory, 'codes-*.array_record')))
    if not files:
      raise MissingPathError(f'no code shards in {directory}; run the extract_codes task first')
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


def make_codes_dataset(directory: str, *, local_batch: int, seed: int, process_index: int = 0,
                       process_count: int = 1):
  """A checkpointable iterator of per-process code batches: shuffled, repeated, one view per read
  (LlamaGen's per-sample augmentation), this process's rows of each global batch."""
  ds = grain.MapDataset.source(CodesSource(directory)).shuffle(seed=seed).repeat()
  ds = ds.seed(seed).random_map(pick_view)
  ds = process_slice(ds, local_batch, process_index, process_count)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))


class SyntheticCodes(grain.DatasetIterator):
  """Uniformly random codes and labels (throughput runs: `train_ar.codes_dir='synthetic'`). Batch
  `n` is drawn from (seed, n) as a whole global batch of which this process keeps its rows, so the
  data is the same for any number of processes; the position is one counter, and as a grain
  DatasetIterator it is saved by grain's checkpoint handler beside the train state."""

  def __init__(self, cfg, global_batch: int, seed: int, process_index: int = 0, process_count: int = 1):
    super().__init__()
    if global_batch % process_count:
      raise ValueError(f'global batch {global_batch} is not divisible by {process_count} processes')
    self.cfg, self.batch, self.seed = cfg, global_batch, seed
    local = global_batch // process_count
    self.rows = slice(process_index * local, (process_index + 1) * local)
    self.step = 0

  def __next__(self):
    c, b = self.cfg, self.batch
    rng = np.random.default_rng((self.seed, self.step))
    self.step += 1
    out = {'label': rng.integers(0, c.num_classes, b).astype(np.int32),
           'holistic_codes': rng.integers(0, c.vocab_size, (b, c.num_holistic)).astype(np.int32),
           'patch_codes': rng.integers(0, c.vocab_size, (b, c.num_patches)).astype(np.int32)}
    return {k: v[self.rows] for k, v in out.items()}

  def get_state(self) -> dict:
    return {'seed': self.seed, 'step': self.step}

  def set_state(self, state: dict):
    if int(state.get('seed', self.seed)) != self.seed:
      raise ValueError(f"synthetic codes were checkpointed with seed {state['seed']}, this run uses "
                       f'{self.seed}: resume with the same --config.seed')
    self.step = int(state['step'])
