"""Per-device memory of AR training at the recipe batch, for a config on a device type, without
allocating anything: parameters, AdamW state and EMA from `jax.eval_shape` and the mesh preset's
shardings, activations (XLA's temporary buffers) from the compiled step's `memory_analysis`. On a
CPU host the step is compiled ahead of time for fake CPU devices, one compile per device count.

    python -m hita_jax.tools.memory --config=configs/hita_2b.py --device=gpu141 [--num_devices=2,4,8]

The mesh is the config's (`--config.mesh=...`) or, with the default 'auto', the size's preset
(config_lib.MESH_PRESETS). `--nocompile` skips the activations (lowering only). A missing or broken
config file, an unknown `--config.<key>` or a config without `train_ar` prints one line
`error: ...` (exit status 2).
"""
from __future__ import annotations

import dataclasses
import math

from absl import app, flags
from ml_collections import config_flags

# Usable memory per device (GB = 1e9 bytes): TPU HBM per chip, GPU memory per card.
DEVICE_GB = {'v5p': 95.0, 'v6e': 32.0, 'v5e': 16.0, 'v4': 32.0, 'gpu80': 80.0, 'gpu141': 141.0}
HEADROOM = 0.92  # XLA_PYTHON_CLIENT_MEM_FRACTION of the launch scripts: what a run may take

_FLAGS = {}


def _define_flags():
  """Only when run as a program: importing this module (tests, other tools) defines no absl flag,
  so it cannot clash with another tool's `--config`."""
  _FLAGS['config'] = config_flags.DEFINE_config_file('config', None, 'config file (path[:arg])',
                                                     lock_config=True)
  _FLAGS['device'] = flags.DEFINE_enum('device', 'gpu141', sorted(DEVICE_GB), 'device type')
  _FLAGS['num_devices'] = flags.DEFINE_list('num_devices', ['1', '2', '4', '8'], 'device counts to plan for')
  _FLAGS['compile'] = flags.DEFINE_bool('compile', True, 'compile the step for the activation memory')


def _per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
  import numpy as np
  total = 0
  for x in __import__('jax').tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return total


def plan(config, num_devices: int, *, compile_step: bool = True) -> dict:
  """{'mesh', 'params', 'opt', 'ema', 'activations', 'total'} (bytes per device) of AR training
  with `config` on the first `num_devices` devices."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P

  from hita_jax import config_lib, sharding
  from hita_jax.models.gpt import GPT, gpt_config_from
  from hita_jax.tasks import train_ar as ar

  tr = config.train_ar
  spec = config_lib.mesh_spec(config, num_devices)
  mesh = sharding.make_mesh(spec, jax.devices()[:num_devices])
  rules = config_lib.axis_rules(config)
  gcfg = dataclasses.replace(gpt_config_from(config.gpt), dtype=tr.compute_dtype,
                             class_dropout_prob=tr.class_dropout_prob, token_dropout=tr.token_dropout)
  gpt_def, abs_params = nnx.split(nnx.eval_shape(lambda: GPT(gcfg, rngs=nnx.Rngs(0))), nnx.Param)
  shards = sharding.state_shardings(abs_params, mesh, rules)
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_params, shards)
  tx = ar.adamw(tr.lr, tr.b1, tr.b2, tr.weight_decay, tr.grad_clip, tr.adam_eps)
  opt = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                     jax.eval_shape(tx.init, params), sharding.optimizer_shardings(tx, params, mesh))
  rep = NamedSharding(mesh, P())
  state = {'step': jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), 'params': params, 'opt': opt,
           'ema': params}
  b = tr.global_batch_size
  shapes = {'label': (b,), 'holistic_codes': (b, gcfg.num_holistic), 'patch_codes': (b, gcfg.num_patches)}
  batch = {k: jax.ShapeDtypeStruct(s, jnp.int32, sharding=sharding.batch_sharding(mesh, rules, len(s)))
           for k, s in shapes.items()}
  parts = ar.Parts(gpt_def, tx, None, gcfg)
  step = ar.jit_train_step(parts, config)  # the program train_ar runs
  lowered = step.lower(state, None, batch, jax.random.key(0))
  out = {'mesh': spec, 'params': _per_device_bytes(params), 'opt': _per_device_bytes(opt),
         'ema': _per_device_bytes(params), 'activations': None}
  if compile_step:
    out['activations'] = int(lowered.compile().memory_analysis().temp_size_in_bytes)
  out['total'] = out['params'] + out['opt'] + out['ema'] + (out['activations'] or 0)
  return out


def table(config, device: str, counts, *, compile_step: bool = True) -> list[str]:
  gb = lambda n: '-' if n is None else f'{n / 1e9:.1f}'
  cap = DEVICE_GB[device] * HEADROOM
  rows = [f'GPT-{config.get("gpt_size", "?")} at global batch {config.train_ar.global_batch_size}, '
          f'{config.train_ar.compute_dtype} compute, on {device} ({DEVICE_GB[device]:.0f} GB, '
          f'{cap:.0f} GB usable); GB per device',
          f'{"devices":>7s}  {"mesh":26s} {"params":>7s} {"adamw":>7s} {"ema":>7s} {"activ.":>7s} '
          f'{"total":>7s}  fits']
  for n in counts:
    p = plan(config, n, compile_step=compile_step)
    fits = 'yes' if p['total'] <= cap * 1e9 else 'no'
    if p['activations'] is None:
      fits += ' (without activations)'
    rows.append(f'{n:7d}  {p["mesh"]:26s} {gb(p["params"]):>7s} {gb(p["opt"]):>7s} {gb(p["ema"]):>7s} '
                f'{gb(p["activations"]):>7s} {gb(p["total"]):>7s}  {fits}')
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  config = _FLAGS['config'].value
  if config is None:
    raise app.UsageError('--config=configs/hita_<size>.py (an AR recipe) is required')
  if 'train_ar' not in config:
    from hita_jax.errors import MissingEntryError
    path = config_flags.get_config_filename(flags.FLAGS['config'])
    raise MissingEntryError(f'--config={path} has no train_ar section (sections: {sorted(config)}); '
                            'fix --config=configs/hita_<size>.py (an AR recipe)')
  counts = [int(n) for n in _FLAGS['num_devices'].value]
  import jax  # fake CPU devices for the ahead-of-time compile: set before the backend starts
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', max(counts))
  print('\n'.join(table(config, _FLAGS['device'].value, counts, compile_step=_FLAGS['compile'].value)))


if __name__ == '__main__':
  from hita_jax import cli
  _define_flags()
  cli.run_absl(main)
