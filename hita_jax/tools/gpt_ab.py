"""A/B of GPT switches in one process: each arm's AR training step, timed alternately.

    python -m hita_jax.tools.gpt_ab --size B --batch 64 --arm base: --arm threefry:dropout_rng=threefry

Each arm is the `bench gpt_train` step (full size, bf16 compute, random codes, AdamW at the
official settings; `KEY=VALUE` sets a `GPTConfig` field) on the same parameters and optimizer
state, donated from step to step and arm to arm. The arms run `--steps` steps each in turn for
`--rounds` rounds, so drift hits them alike; the minimum over rounds is the figure. Switches that
change the parameters' shapes are refused (use `bench gpt_train` per process for those).

With `--trainer` each arm is instead `train_ar`'s own jitted step, the one `python -m
hita_jax.main` runs (AdamW, EMA, dropout, class drop, the config's XLA options; synthetic codes),
built from the shipped config of `--size` with `KEY=VALUE` config overrides
(`gpt.dropout_rng=threefry`, `train_ar.gpu_compiler_options=...`). Each arm keeps its own train
state (built from the same seed); the first step of every arm runs on the same state, batch and
key and its loss and gradient norm are reported beside the first arm's. An arm after the first
whose step does not compile (an XLA option this backend rejects) is reported as `failed` and left
out of the timing.

Prints one JSON line per arm and a summary; with $OUT set also appends them to $OUT/gpt_ab.jsonl.
"""
from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import time

import jax
import jax.numpy as jnp
from flax import nnx

from hita_jax import cli, config_lib, sharding, training
from hita_jax.errors import UserError
from hita_jax.metrics import flops
from hita_jax.models.gpt import GPT, GPT_SIZES, GPTConfig
from hita_jax.tasks import train_ar as ar
from hita_jax.tools.ab import apply_overrides, check_names, emit_jsonl, layout, parse_arm, summarize
from hita_jax.tools.bench import full_size_config, gpt_train_optimizer, gpt_train_step, random_codes


def arm_config(base: GPTConfig, items: list[str]) -> tuple[GPTConfig, dict]:
  """`base` with 'field=value' items (values as Python literals, else strings)."""
  fields = {f.name for f in dataclasses.fields(GPTConfig)}
  done = {}
  for item in items:
    key, sep, text = item.partition('=')
    if not sep or key not in fields:
      raise UserError(f'--arm item {item!r}: write FIELD=VALUE with a GPTConfig field '
                      f'(e.g. dropout_rng=hash); fields: {sorted(fields)}')
    try:
      done[key] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      done[key] = text
  try:
    return dataclasses.replace(base, **done), done
  except ValueError as e:
    raise UserError(f'--arm {items}: {e}') from None


def run_ab(arms, size: str, batch: int, steps: int = 10, rounds: int = 3, base: GPTConfig | None = None):
  check_names(arms)
  if base is None:
    base = full_size_config(size, dtype='bfloat16')
  cfgs = [(name, *arm_config(base, items)) for name, items in arms]
  model = GPT(cfgs[0][1], rngs=nnx.Rngs(0))
  _, params = nnx.split(model, nnx.Param)
  del model
  tx = gpt_train_optimizer()
  opt_state = tx.init(params)
  codes = random_codes(cfgs[0][1], batch)

  graphdefs = []  # every arm checked before the first compile
  for name, cfg, done in cfgs:
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    if layout(abstract) != layout(params):
      raise UserError(f'--arm {name}: {done} changes the parameters; time it with bench gpt_train')
    graphdefs.append(graphdef)

  records, steps_by_arm = [], {}
  for (name, cfg, done), graphdef in zip(cfgs, graphdefs):
    step = gpt_train_step(graphdef, tx, codes)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, jax.random.key(0)).compile()
    steps_by_arm[name] = compiled
    records.append({'arm': name, 'set': done, 'size': size, 'batch': batch,
                    'compile_s': time.perf_counter() - t0, 'device': jax.devices()[0].device_kind})

  key = jax.random.key(0)
  times = {name: [] for name in steps_by_arm}
  losses = {}
  for rnd in range(rounds):  # alternate, so drift hits every arm
    for name, compiled in steps_by_arm.items():
      params, opt_state, loss = compiled(params, opt_state, jax.random.fold_in(key, 1000 * rnd))  # warm
      float(loss)
      t0 = time.perf_counter()
      for i in range(steps):
        params, opt_state, loss = compiled(params, opt_state, jax.random.fold_in(key, 1000 * rnd + i + 1))
      losses[name] = float(loss)
      times[name].append((time.perf_counter() - t0) / steps)
  summary = summarize(records, times, 'gpt_ab', size=size, batch=batch, steps=steps, rounds=rounds)
  peak = flops.device_peak_flops() or 989e12
  for rec, (name, cfg, _) in zip(records, cfgs):
    tok_s = batch * cfg.seq_len / rec['step_s']
    rec.update(mfu=flops.mfu(tok_s, flops.gpt_train_flops_per_token(cfg, cfg.seq_len), peak),
               last_loss=losses[name])
  return records + [summary]


# GPT fields that train_ar.build takes from the train_ar section instead of the gpt one
TRAINER_SETS = {'gpt.dtype': 'train_ar.compute_dtype', 'gpt.token_dropout': 'train_ar.token_dropout',
                'gpt.class_dropout_prob': 'train_ar.class_dropout_prob'}


def run_trainer_ab(arms, size: str, batch: int, steps: int = 10, rounds: int = 3, config=None):
  """Times `train_ar`'s jitted step for each arm's config overrides (see the module docstring).
  `config`: the base config (default: the shipped recipe of `size`)."""
  check_names(arms)
  config = copy.deepcopy(config) if config is not None else config_lib.hita_recipe(size, None)
  config.train_ar.codes_dir = 'synthetic'
  config.train_ar.global_batch_size = batch
  configs = []  # every arm's overrides checked before the first build
  for name, items in arms:
    c = copy.deepcopy(config)
    done = apply_overrides(c, items, '--arm')
    for key in set(done) & set(TRAINER_SETS):  # train_ar.build sets these from train_ar
      raise UserError(f'--arm {name}: {key} is set by train_ar in the trainer; use '
                      f'{TRAINER_SETS[key]}=... instead')
    configs.append((c, done))
  built, records, failed, batches, key = [], [], [], None, jax.random.key(0)
  for (name, _), (c, done) in zip(arms, configs):
    mesh = sharding.make_mesh(config_lib.mesh_spec(c, jax.device_count()))  # as train_ar.run
    t0 = time.perf_counter()
    parts, state, _ = ar.build(c, mesh)
    rec = {'arm': name, 'set': done, 'size': size, 'batch': batch, 'trainer': True,
           'build_s': time.perf_counter() - t0, 'device': jax.devices()[0].device_kind}
    if batches is None:  # the same batches for every arm, sharded as train_ar.run shards them
      rules = config_lib.axis_rules(c)
      ndim = {'label': 1, 'holistic_codes': 2, 'patch_codes': 2}
      shardings = {k: sharding.batch_sharding(mesh, rules, n) for k, n in ndim.items()}
      it = ar.make_data(c, parts)
      batches = [training.global_batch({k: v for k, v in next(it).items() if k in shardings}, shardings)
                 for _ in range(2)]
    t0 = time.perf_counter()
    try:
      compiled = ar.jit_train_step(parts, c).lower(state, None, batches[0], key).compile()
    except Exception as e:  # an XLA option this backend rejects: the other arms still run
      if not built:
        raise
      failed.append({**rec, 'failed': f'{type(e).__name__}: {str(e)[:400]}'})
      continue
    rec['compile_s'] = time.perf_counter() - t0
    first = jax.tree.map(jnp.copy, state)
    _, m = compiled(first, None, batches[0], key)
    rec['first_step'] = {k: float(m[k]) for k in ('loss', 'grad_norm')}
    built.append({'name': name, 'step': compiled, 'state': state, 'cfg': parts.cfg})
    records.append(rec)
  ref = records[0]['first_step']
  for rec in records[1:]:  # (the zero-initialised head makes the first loss log(vocab) for all)
    rec['first_step_abs_diff_vs_first'] = {k: abs(v - ref[k]) for k, v in rec['first_step'].items()}
  if len(built) < 2:
    raise UserError(f'only one arm compiled; the others failed: {failed}')
  times = {b['name']: [] for b in built}
  for _ in range(rounds):  # alternate, so drift hits every arm
    for b in built:
      b['state'], m = b['step'](b['state'], None, batches[0], key)  # warm, untimed
      float(m['loss'])
      t0 = time.perf_counter()
      for i in range(steps):
        b['state'], m = b['step'](b['state'], None, batches[i % 2], jax.random.fold_in(key, i))
      b['last_loss'] = float(m['loss'])
      times[b['name']].append((time.perf_counter() - t0) / steps)
  summary = summarize(records, times, 'gpt_ab', size=size, batch=batch, steps=steps, rounds=rounds,
                      trainer=True)
  peak = flops.device_peak_flops() or 989e12
  for rec, b in zip(records, built):
    cfg = b['cfg']
    tok_s = batch * cfg.seq_len / rec['step_s'] / jax.device_count()  # per device, as train_ar.run
    rec.update(mfu=flops.mfu(tok_s, flops.gpt_train_flops_per_token(cfg, cfg.seq_len), peak),
               last_loss=b['last_loss'])
  return records + failed + [summary]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--arm', action='append', required=True, metavar='NAME:FIELD=VALUE[,...]')
  p.add_argument('--size', default='B', choices=sorted(GPT_SIZES))
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--steps', type=int, default=10, help='timed steps per arm and round')
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--trainer', action='store_true',
                 help="time train_ar's own step; arms are config overrides such as gpt.dropout_rng=threefry")
  a = p.parse_args(argv)
  arms = [parse_arm(t) for t in a.arm]
  if len(arms) < 2:
    p.error('give at least two --arm')
  run = run_trainer_ab if a.trainer else run_ab
  for rec in run(arms, a.size, a.batch, steps=a.steps, rounds=a.rounds):
    emit_jsonl(rec, 'gpt_ab.jsonl')


if __name__ == '__main__':
  cli.run(main)
