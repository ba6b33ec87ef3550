"""A/B of GPT switches in one process: each arm's AR training step, timed alternately.

    python -m hita_jax.tools.gpt_ab --size B --batch 64 --arm base: --arm hash:dropout_rng=hash

Each arm is the `bench gpt_train` step (full size, bf16 compute, random codes, AdamW at the
official settings; `KEY=VALUE` sets a `GPTConfig` field) on the same parameters and optimizer
state, donated from step to step and arm to arm. The arms run `--steps` steps each in turn for
`--rounds` rounds, so drift hits them alike; the minimum over rounds is the figure. Switches that
change the parameters' shapes are refused (use `bench gpt_train` per process for those).

Prints one JSON line per arm and a summary; with $OUT set also appends them to $OUT/gpt_ab.jsonl.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from hita_jax import cli
from hita_jax.errors import UserError
from hita_jax.metrics import flops
from hita_jax.models.gpt import GPT, GPT_SIZES, GPTConfig
from hita_jax.tasks import train_ar as ar
from hita_jax.tools.tok_ab import parse_arm


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
  if len({name for name, _ in arms}) != len(arms):
    raise UserError(f'--arm names must differ: {[name for name, _ in arms]}')
  if base is None:
    from hita_jax.tools.bench import full_size_config
    base = full_size_config(size, dtype='bfloat16')
  cfgs = [(name, *arm_config(base, items)) for name, items in arms]
  model = GPT(cfgs[0][1], rngs=nnx.Rngs(0))
  _, params = nnx.split(model, nnx.Param)
  del model
  tx = ar.adamw(1e-4, 0.9, 0.95, 0.05, 1.0)  # the train_ar optimizer at the official settings
  opt_state = tx.init(params)
  r = np.random.RandomState(0)
  c0 = cfgs[0][1]
  labels = jnp.asarray(r.randint(0, c0.num_classes, batch))
  q = jnp.asarray(r.randint(0, c0.vocab_size, (batch, c0.num_holistic)))
  z = jnp.asarray(r.randint(0, c0.vocab_size, (batch, c0.num_patches)))
  shapes = lambda t: (jax.tree.structure(t), [(x.shape, x.dtype) for x in jax.tree.leaves(t)])

  graphdefs = []  # every arm checked before the first compile
  for name, cfg, done in cfgs:
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    if shapes(abstract) != shapes(params):
      raise UserError(f'--arm {name}: {done} changes the parameters; time it with bench gpt_train')
    graphdefs.append(graphdef)

  records, steps_by_arm = [], {}
  for (name, cfg, done), graphdef in zip(cfgs, graphdefs):
    def step(params, opt_state, key, graphdef=graphdef):
      def loss_fn(p):
        lh, lp = nnx.merge(graphdef, p, copy=True).loss(labels, q, z, rng=key)
        return lh + lp
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

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
  first = min(times[cfgs[0][0]])
  peak = flops.device_peak_flops() or 989e12
  for rec, (name, cfg, _) in zip(records, cfgs):
    dt = min(times[name])
    tok_s = batch * cfg.seq_len / dt
    rec.update(step_s=dt, step_s_rounds=times[name], images_s=batch / dt, speedup_vs_first=first / dt,
               mfu=flops.mfu(tok_s, flops.gpt_train_flops_per_token(cfg, cfg.seq_len), peak),
               last_loss=losses[name])
  summary = {'gpt_ab': 'summary', 'size': size, 'batch': batch, 'steps': steps, 'rounds': rounds,
             'images_s': {r['arm']: r['images_s'] for r in records},
             'speedup_vs_first': {r['arm']: r['speedup_vs_first'] for r in records},
             'jax': jax.__version__, 'device': jax.devices()[0].device_kind}
  return records + [summary]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--arm', action='append', required=True, metavar='NAME:FIELD=VALUE[,...]')
  p.add_argument('--size', default='B', choices=sorted(GPT_SIZES))
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--steps', type=int, default=10, help='timed steps per arm and round')
  p.add_argument('--rounds', type=int, default=3)
  a = p.parse_args(argv)
  arms = [parse_arm(t) for t in a.arm]
  if len(arms) < 2:
    p.error('give at least two --arm')
  for rec in run_ab(arms, a.size, a.batch, steps=a.steps, rounds=a.rounds):
    line = json.dumps(rec)
    print(line, flush=True)
    if os.environ.get('OUT'):
      with open(os.path.join(os.environ['OUT'], 'gpt_ab.jsonl'), 'a') as f:
        f.write(line + '\n')


if __name__ == '__main__':
  cli.run(main)
