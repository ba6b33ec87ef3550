"""Helpers of the fault-injection tests: a tiny codes directory written directly (no tokenizer),
the tiny configs they train, and a poisoned batch that makes a step non-finite."""
import json
import os

import numpy as np

from hita_jax import config_lib
from hita_jax.data.codes import pack, shard_name
from tests.conftest import ROOT


def write_codes_dir(directory, config, n=32, seed=0):
  """`n` records of random codes shaped for `config` (labels < num_classes), as extract_codes
  writes them."""
  from array_record.python.array_record_module import ArrayRecordWriter
  os.makedirs(directory, exist_ok=True)
  g, rng = config.gpt, np.random.default_rng(seed)
  num_patches = g.grid ** 2
  w = ArrayRecordWriter(os.path.join(directory, shard_name(0, 0)), 'group_size:1')
  for i in range(n):
    w.write(pack(i % g.num_classes, rng.integers(0, g.vocab_size, (1, g.num_holistic)),
                 rng.integers(0, g.vocab_size, (1, num_patches))))
  w.close()
  with open(os.path.join(directory, 'manifest.json'), 'w') as f:
    json.dump({'num_holistic': g.num_holistic, 'num_patches': num_patches, 'num_views': 1}, f)
  return str(directory)


def ar_config(codes_dir, steps=8, **train_ar):
  """hita_b tiny on pre-extracted codes: 1 layer, batch 8, a checkpoint every 4 steps."""
  config = config_lib.load_config(f'{ROOT}/configs/hita_b.py:tiny')
  config.gpt.n_layer = 1
  config.train_ar.update(codes_dir=codes_dir, num_steps=steps, global_batch_size=8, log_every=1,
                         ckpt_every=4, **train_ar)
  return config


def tokenizer_config(steps=6, **train_tokenizer):
  """The demo's 32 px tokenizer on the flat shapes, MSE + VQ only (no LPIPS/GAN), batch 8."""
  config = config_lib.load_config(f'{ROOT}/configs/demo.py:fast')
  config.task = 'train_tokenizer'
  config.train_tokenizer.update(num_steps=steps, global_batch_size=8, log_every=1, ckpt_every=4,
                                image_every=1000, warmup_steps=1, **train_tokenizer)
  return config
