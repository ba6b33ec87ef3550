"""Random full-size exports and a generated reference batch, for timing `configs/fid.py` (or any
task that loads weights) where no trained weights can be had, e.g. on a GPU lease:

    python -m hita_jax.tools.random_exports --out /tmp/rand --size B --variant V --ref-images 10000
    python -m hita_jax.main --config=configs/fid.py:size=B --workdir=/tmp/fid \
        --config.init.gpt=/tmp/rand/gpt --config.init.tokenizer=/tmp/rand/tokenizer \
        --config.evaluate.ref_npz=/tmp/rand/ref.npz --config.evaluate.inception_weights=random

The GPT's head is drawn N(0, 0.02) (the official init zeroes it: every code would be equally
likely, which times the same but hides nothing); the reference batch is uniform noise. Metrics
computed from these mean nothing; the stage times are real. Existing outputs are kept (reruns are
cheap), so a resumed lease can call this again.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np
from flax import nnx

from hita_jax import cli, config_lib, pretrained
from hita_jax.errors import UserError
from hita_jax.sharding import create_jitted
from hita_jax.models.gpt import GPT, GPT_SIZES, gpt_config_from
from hita_jax.models.tokenizer import Tokenizer


def write(out: str, size: str = 'B', variant: str = 'V', ref_images: int = 10_000,
          ref_size: int = 256, tiny: bool = False) -> dict:
  os.makedirs(out, exist_ok=True)
  config = config_lib.hita_recipe(size, ','.join([f'variant={variant}'] + (['tiny'] if tiny else [])))
  paths = {'gpt': os.path.join(out, 'gpt'), 'tokenizer': os.path.join(out, 'tokenizer'),
           'ref_npz': os.path.join(out, 'ref.npz')}
  seconds = {}
  t = time.time()
  if not os.path.exists(os.path.join(paths['gpt'], 'params')):
    gpt = create_jitted(lambda: GPT(gpt_config_from(config.gpt), rngs=nnx.Rngs(0)))
    gpt.head[...] = jax.random.normal(jax.random.key(1), gpt.head.shape) * 0.02
    pretrained.save_gpt(paths['gpt'], gpt, legacy_pos128_embedding=False,
                        metadata={'random_weights': True})
  seconds['gpt_s'] = time.time() - t
  t = time.time()
  if not os.path.exists(os.path.join(paths['tokenizer'], 'params')):
    tcfg = config_lib.tokenizer_config_from(config.tokenizer)
    tok = create_jitted(lambda: Tokenizer(tcfg, rngs=nnx.Rngs(2)))
    pretrained.save_tokenizer(paths['tokenizer'], tok, metadata={'random_weights': True})
  seconds['tokenizer_s'] = time.time() - t
  t = time.time()
  if not os.path.exists(paths['ref_npz']):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (ref_images, ref_size, ref_size, 3), dtype=np.uint8)
    tmp = paths['ref_npz'] + '.tmp.npz'
    np.savez(tmp, arr_0=imgs)
    os.replace(tmp, paths['ref_npz'])
  seconds['ref_s'] = time.time() - t
  return {**paths, **seconds}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=cli.VERBOSITY_HELP)
  p.add_argument('--out', required=True, help='directory for gpt/, tokenizer/ and ref.npz')
  p.add_argument('--size', default='B', choices=sorted(GPT_SIZES))
  p.add_argument('--variant', default='V', choices=['V', 'U'])
  p.add_argument('--ref-images', type=int, default=10_000, help='images in the generated reference batch')
  p.add_argument('--ref-size', type=int, default=256)
  p.add_argument('--tiny', action='store_true', help="the configs' tiny models (tests)")
  a = p.parse_args(argv)
  if a.ref_images < 2:
    raise UserError('--ref-images must be at least 2 (FID statistics need two images)')
  print(write(a.out, a.size, a.variant, a.ref_images, a.ref_size, a.tiny), flush=True)


if __name__ == '__main__':
  cli.run(main)
