"""A/B of tokenizer-trainer switches in one process: each arm's jitted G + D step, timed alternately.

    python -m hita_jax.tools.tok_ab --batch 16 --variant V \
        --arm base:tokenizer.attn_impl=xla,tokenizer.dinov2_scan=False \
        --arm new:tokenizer.attn_impl=auto,tokenizer.dinov2_scan=True

Why: across processes on one GPU the same step has measured 0.154-0.168 s (2026-12-05e), a spread
larger than the switches being decided. Here every arm is built (`train_tokenizer.build`, random
weights, full size; an arm that differs from the first only in `tokenizer.*` switches that keep
the parameters gets just its generator's graph, from an abstract build) and compiled in one process, then the arms run `--steps` steps each in turn for
`--rounds` rounds, so drift (clocks, heat, a neighbour) hits every arm alike; the minimum over
rounds is the figure. Arms whose train state has the same structure, shapes and shardings share one
state (it is donated from step to step, arm to arm), which keeps the memory of one.

Before timing, every arm takes one step from a copy of the same state on the same batch and key,
and its losses are reported beside the first arm's: a switch that changes the numbers beyond
rounding shows there. `NAME:` alone is the shipped config. An arm may also set a switch read at
trace time (`layers.CONV_1X1=gemm`, `training.FLAT_CONCAT_GROUP=23`; held for that arm's trace only); each arm's
record counts its optimized program's convolutions. Compile times: XLA keeps autotuning
results within a process, so only the first arm's compile is cold (`compile_cold`); compare
compiles with `tok_compile --set`, one process each.

Prints one JSON line per arm and one summary line; with $OUT set also appends them to
$OUT/tok_ab.jsonl.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx

from hita_jax import cli, config_lib, sharding
from hita_jax.tools.ab import (apply_overrides, check_names, emit_jsonl, layout, parse_arm, set_layer_switches,
                               split_layer_switches, summarize, trace_switch_values)

LOSS_KEYS = ('g_loss', 'rec_loss', 'vq_loss', 'd_loss')


def _flat(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


# keys that change how the step is compiled, not what it is built from
STEP_ONLY_KEYS = ('train_tokenizer.step_stages',)


def tokenizer_only_parts(parts, state, config0, config):
  """The step's parts for `config` from `parts` and `state` (built for `config0`) when the two
  configs differ only in `tokenizer.*` switches that keep the parameters (attn_impl, dinov2_scan,
  cnn_norm_impl) or in `STEP_ONLY_KEYS`: the generator's graph definition from an abstract build (`nnx.eval_shape`: no
  weights made, nothing compiled), everything else shared. None when the configs differ elsewhere
  or the parameters differ; such an arm is built in full."""
  from hita_jax.models.tokenizer import Tokenizer, trainable_filter
  from hita_jax.tasks.train_tokenizer import generator_config
  a, b = _flat(config0.to_dict()), _flat(config.to_dict())
  if set(a) != set(b) or any(a[k] != b[k] for k in a
                             if not k.startswith('tokenizer.') and k not in STEP_ONLY_KEYS):
    return None
  tcfg = generator_config(config)  # as train_tokenizer.build makes it, in training mode
  tok = nnx.eval_shape(lambda: Tokenizer(tcfg, rngs=nnx.Rngs(params=0, dropout=1)))
  tok.train()
  g_def, g_params, g_rest = nnx.split(tok, trainable_filter(), ...)
  if (layout(g_params), layout(g_rest)) != (layout(state['g_params']), layout(state['g_rest'])):
    return None
  return dataclasses.replace(parts, g_def=g_def, cfg=tcfg)


def convolution_count(hlo_text: str) -> int:
  """Convolutions in an optimized program: XLA's own ops (CPU) and cuDNN custom calls (GPU)."""
  return hlo_text.count(' convolution(') + hlo_text.count('custom_call_target="__cudnn$conv')


def run_ab(arms: list[tuple[str, list[str]]], batch: int, config_spec: str, steps: int = 10,
           rounds: int = 3, progress=None) -> list[dict]:
  """Builds and compiles every arm, checks their first-step losses, then times them alternately.
  Returns the records (one per arm, then the summary); `progress(record)` gets each arm's build
  and compile times as they come (a run cut short by a time limit still leaves those)."""
  from hita_jax.tasks import train_tokenizer as tt
  check_names(arms)
  configs = []  # every arm's overrides checked before the first (minutes-long) build
  for name, items in arms:
    config = config_lib.load_config(config_spec)
    config.train_tokenizer.global_batch_size = batch
    config.init.allow_random_dinov2 = True
    config.init.allow_random_dino_disc = True
    config.tokenizer_loss.lpips_weights = 'random'
    items, switches = split_layer_switches(items, '--arm')  # layers / training switches: at trace time
    done = apply_overrides(config, items, '--arm')
    done.update(switches)
    configs.append((config, done, switches))
  mesh = sharding.make_mesh([('data', -1)])
  built, records, batches_by_size = [], [], {}
  key = jax.random.key(0)
  for i, ((name, _), (config, done, switches)) in enumerate(zip(arms, configs)):
    rec = {'arm': name, 'set': done, 'batch': batch, 'config': config_spec,
           'device': jax.devices()[0].device_kind}
    t0 = time.perf_counter()
    parts = tokenizer_only_parts(built[0]['parts'], built[0]['state'], configs[0][0], config) if i else None
    abstract = parts is not None
    if abstract:  # shares the first arm's weights, frozen towers and state
      state, frozen = built[0]['state'], built[0]['frozen']
    else:
      parts, state, frozen, _ = tt.build(config, mesh)
    rec.update(build_s=time.perf_counter() - t0, abstract_build=abstract)
    size = config.tokenizer.image_size
    if size not in batches_by_size:  # the same two batches for every arm of this image size
      r = np.random.RandomState(0)
      batches_by_size[size] = [{'image': jnp.asarray(r.randint(0, 256, (batch, size, size, 3)).astype(np.uint8))}
                               for _ in range(2)]
    batches = batches_by_size[size]
    # A later arm with the first arm's layout steps the first arm's state; its own is dropped.
    share = 0 if i and layout(state, True) == layout(built[0]['state'], True) else None
    t0 = time.perf_counter()
    shipped = trace_switch_values(switches)
    set_layer_switches(switches)  # this arm's trace only; the next arm traces with the shipped ones
    try:
      compiled = tt.compile_train_step(tt.make_train_step(parts, config), state, frozen, batches[0], key)
    finally:
      set_layer_switches(shipped)
    rec.update(compile_s=time.perf_counter() - t0, compile_cold=i == 0, shares_state_of=(
        arms[share][0] if share is not None else None), convolutions=sum(
            convolution_count(p.as_text()) for p in getattr(compiled, 'programs', None) or [compiled]))
    if isinstance(compiled, tt.StagedTrainStep):  # its programs' compiles overlap: wall and each
      rec.update(compile_each_s=compiled.timing['compile_each_s'])
    if progress:
      progress({'stage': 'compiled', **rec})
    built.append({'name': name, 'step': compiled, 'frozen': frozen, 'parts': parts, 'batches': batches,
                  'state': None if share is not None else state, 'owner': share if share is not None else i})
    records.append(rec)

  # Same state, batch and key for every arm: the first step's losses must agree to rounding.
  for b, rec in zip(built, records):
    start = jax.tree.map(jnp.copy, built[b['owner']]['state'])
    _, m = b['step'](start, b['frozen'], b['batches'][0], key)
    rec['first_step'] = {k: float(m[k]) for k in LOSS_KEYS if k in m}
  ref = records[0]['first_step']
  for rec in records[1:]:
    rec['loss_abs_diff_vs_first'] = {k: abs(v - ref[k]) for k, v in rec['first_step'].items() if k in ref}

  times = {b['name']: [] for b in built}
  for _ in range(rounds):  # alternate, so drift hits every arm
    for b in built:
      owner = built[b['owner']]
      owner['state'], m = b['step'](owner['state'], b['frozen'], b['batches'][0], key)  # warm, untimed
      float(m['g_loss'])
      t0 = time.perf_counter()
      for s in range(steps):
        owner['state'], m = b['step'](owner['state'], b['frozen'], b['batches'][s % 2], key)
      float(m['g_loss'])
      times[b['name']].append((time.perf_counter() - t0) / steps)
  summary = summarize(records, times, 'tok_ab', batch=batch, steps=steps, rounds=rounds)
  return records + [summary]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--arm', action='append', required=True, metavar='NAME:KEY=VALUE[,...]',
                 help='one arm (give two or more); NAME: alone is the shipped config')
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--variant', default='V', choices=['V', 'U'])
  p.add_argument('--config', default=None,
                 help='config spec instead of configs/tokenizer_<variant>.py (e.g. ...:tiny for CPU)')
  p.add_argument('--steps', type=int, default=10, help='timed steps per arm and round')
  p.add_argument('--rounds', type=int, default=3)
  a = p.parse_args(argv)
  arms = [parse_arm(t) for t in a.arm]
  if len(arms) < 2:
    p.error('give at least two --arm')
  spec = a.config or os.path.join(os.path.dirname(__file__), '..', '..', 'configs',
                                  f'tokenizer_{a.variant.lower()}.py')
  emit = lambda rec: emit_jsonl(rec, 'tok_ab.jsonl')
  for rec in run_ab(arms, a.batch, spec, steps=a.steps, rounds=a.rounds, progress=emit):
    emit(rec)


if __name__ == '__main__':
  cli.run(main)
