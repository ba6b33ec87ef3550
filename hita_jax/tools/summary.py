"""Parameter summary of every model a config describes, without allocating anything.

    python -m hita_jax.tools.summary --config=configs/tokenizer_v.py[:arg]

Prints a per-module table built with `nnx.eval_shape`, then one line per model:
`tokenizer.trainable_params: N` (what the official checkpoint saves: no DINOv2, no usage buffers),
`dinov2.params: N` and, for configs with a generator, `gpt.params: N`. A missing or broken config
file or an unknown `--config.<key>` prints one line `error: ...` (exit status 2).
"""
from __future__ import annotations

import collections
import math

import jax
from absl import app
from flax import nnx
from ml_collections import config_flags

from hita_jax import cli, config_lib
from hita_jax.models.gpt import GPT, gpt_config_from
from hita_jax.models.tokenizer import Tokenizer, trainable_filter

_CONFIG = config_flags.DEFINE_config_file('config', None, 'config file (path[:arg])', lock_config=True)


def module_table(module: nnx.Module, filt=nnx.Param, depth: int = 2) -> list[tuple[str, int, int]]:
  """[(module path, number of arrays, number of parameters)] grouped `depth` levels deep."""
  groups: dict[str, list[int]] = collections.OrderedDict()
  for path, var in nnx.to_flat_state(nnx.state(module, filt)):
    key = '.'.join(str(p) for p in path[:depth])
    g = groups.setdefault(key, [0, 0])
    g[0] += 1
    g[1] += math.prod(var.shape)
  return [(k, v[0], v[1]) for k, v in groups.items()]


def print_table(title: str, rows):
  width = max([len(r[0]) for r in rows] + [len(title)])
  print(f'\n{title}')
  print(f'  {"module":{width}s} {"arrays":>7s} {"params":>15s}')
  for name, n, p in rows:
    print(f'  {name:{width}s} {n:7d} {p:15,d}')
  print(f'  {"total":{width}s} {sum(r[1] for r in rows):7d} {sum(r[2] for r in rows):15,d}')


def count(module: nnx.Module, filt) -> int:
  return sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(module, filt)))


def summarize(config) -> dict[str, int]:
  out = {}
  if 'tokenizer' in config:
    cfg = config_lib.tokenizer_config_from(config.tokenizer)
    tok = nnx.eval_shape(lambda: Tokenizer(cfg, rngs=nnx.Rngs(0)))
    print_table('tokenizer (trainable; DINOv2 excluded)', module_table(tok, trainable_filter()))
    print_table('dinov2 (frozen)', module_table(tok.dinov2, nnx.Param, depth=1))
    out['tokenizer.trainable_params'] = count(tok, trainable_filter())
    out['dinov2.params'] = count(tok.dinov2, nnx.Param)
  if 'gpt' in config:
    gcfg = gpt_config_from(config.gpt)
    gpt = nnx.eval_shape(lambda: GPT(gcfg, rngs=nnx.Rngs(0)))
    print_table('gpt', module_table(gpt, nnx.Param, depth=1))
    out['gpt.params'] = count(gpt, nnx.Param)
  print()
  for k, v in out.items():
    print(f'{k}: {v}')
  return out


def main(argv):
  del argv
  if _CONFIG.value is None:
    raise app.UsageError('--config=configs/<file>.py[:arg] is required')
  with jax.default_device(jax.devices('cpu')[0]):
    summarize(_CONFIG.value)


if __name__ == '__main__':
  cli.run_absl(main)
