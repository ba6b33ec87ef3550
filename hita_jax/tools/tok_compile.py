"""Where the tokenizer trainer's first-step time goes: build, trace, lower, XLA compile, per XLA
option set, and each compiled program's steady step time (issue: compile <= 60 s).

    python -m hita_jax.tools.tok_compile --batch 16 --variant V \
        --options autotune0:xla_gpu_autotune_level=0 no_triton_gemm:xla_gpu_enable_triton_gemm=false

Builds `train_tokenizer`'s models and jitted G + D step once (random weights, full size), traces
it twice (without and with `sharding.cheap_tracer_probes`), lowers once, then compiles the same
lowered program once per option set (`jax.stages.Lowered.compile(compiler_options=...)`) and times
`--steps` steps of each. XLA keeps autotuning results in memory within a process, so only the first
compile that autotunes is a cold figure: list the option sets in the order you want them measured.
Prints one JSON line per stage; with $OUT set also appends them to $OUT/tok_compile.jsonl.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from hita_jax import cli, config_lib, sharding


def _emit(rec: dict):
  line = json.dumps(rec)
  print(line, flush=True)
  if os.environ.get('OUT'):
    with open(os.path.join(os.environ['OUT'], 'tok_compile.jsonl'), 'a') as f:
      f.write(line + '\n')


def _parse_option(text: str):
  """'name:key=value,key=value' -> (name, {key: value}) with bools and ints parsed."""
  name, _, rest = text.partition(':')
  opts = {}
  for item in filter(None, rest.split(',')):
    k, _, v = item.partition('=')
    if not k or not _:
      raise ValueError(f'--options {text!r}: write NAME:xla_option=value[,...]')
    opts[k.strip()] = {'true': True, 'false': False}.get(v.lower(), int(v) if v.lstrip('-').isdigit() else v)
  return name, opts


def hlo_stats(text: str) -> dict:
  """Counts in an optimized HLO module's text: instructions, fusions (kernels XLA generates),
  custom calls (cuBLAS / cuDNN / Triton), while loops."""
  return {'instructions': len(re.findall(r'^\s+(?:ROOT )?%?[\w.-]+ = ', text, re.M)),
          'fusions': len(re.findall(r' fusion\(', text)),
          'custom_calls': len(re.findall(r' custom-call\(', text)),
          'whiles': len(re.findall(r' while\(', text))}


def run(batch: int, variant: str, options: list[str], steps: int, config_path: str | None = None,
        profile_dir: str | None = None, save_hlo: bool = False):
  from hita_jax.tasks import train_tokenizer as tt
  jax.config.update('jax_enable_compilation_cache', False)  # cold compiles only
  config = config_lib.load_config(config_path or os.path.join(
      os.path.dirname(__file__), '..', '..', 'configs', f'tokenizer_{variant.lower()}.py'))
  config.train_tokenizer.global_batch_size = batch
  config.init.allow_random_dinov2 = True
  config.init.allow_random_dino_disc = True
  config.tokenizer_loss.lpips_weights = 'random'
  mesh = sharding.make_mesh([('data', -1)])
  info = {'variant': variant, 'batch': batch, 'jax': jax.__version__,
          'device': jax.devices()[0].device_kind}
  t0 = time.perf_counter()
  parts, state, lp_state, _ = tt.build(config, mesh)
  jax.block_until_ready(state)
  _emit({**info, 'stage': 'build', 's': time.perf_counter() - t0})
  size = config.tokenizer.image_size
  r = np.random.RandomState(0)
  batches = [{'image': jnp.asarray(r.randint(0, 256, (batch, size, size, 3)).astype(np.uint8))}
             for _ in range(2)]
  key = jax.random.key(0)
  step = jax.jit(lambda s, lp, b, k: tt.train_step(parts, config, s, lp, b, k), donate_argnums=(0,))
  t0 = time.perf_counter()
  step.trace(state, lp_state, batches[0], key)
  _emit({**info, 'stage': 'trace', 's': time.perf_counter() - t0})
  t0 = time.perf_counter()
  # a fresh jit: the first one's trace is cached
  step = jax.jit(lambda s, lp, b, k: tt.train_step(parts, config, s, lp, b, k), donate_argnums=(0,))
  with sharding.cheap_tracer_probes():
    traced = step.trace(state, lp_state, batches[0], key)
  _emit({**info, 'stage': 'trace_cheap_probes', 's': time.perf_counter() - t0})
  t0 = time.perf_counter()
  lowered = traced.lower()
  _emit({**info, 'stage': 'lower', 's': time.perf_counter() - t0,
         'hlo_lines': lowered.as_text().count('\n')})
  compiled = None
  for text in options or ['default:']:
    name, opts = _parse_option(text)
    # marks where this compile's XLA log lines (TF_CPP_VMODULE timers, on stderr) begin
    print(f'=== tok_compile: compile {name}', file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
      compiled = lowered.compile(compiler_options=opts or None)
    except Exception as e:  # e.g. an option this XLA does not know: report it, go on with the next
      _emit({**info, 'stage': 'compile', 'options': name, 'xla': opts, 'error': str(e).splitlines()[0]})
      continue
    compile_s = time.perf_counter() - t0
    state, m = compiled(state, lp_state, batches[0], key)
    float(m['g_loss'])
    t0 = time.perf_counter()
    for i in range(steps):
      state, m = compiled(state, lp_state, batches[i % 2], key)
    float(m['g_loss'])
    dt = (time.perf_counter() - t0) / steps
    text = compiled.as_text() or ''
    _emit({**info, 'stage': 'compile', 'options': name, 'xla': opts, 's': compile_s,
           'step_s': dt, 'images_s': batch / dt, 'g_loss': float(m['g_loss']), 'hlo': hlo_stats(text)})
    if save_hlo and os.environ.get('OUT'):
      with gzip.open(os.path.join(os.environ['OUT'], f'tok_step_{name}.hlo.txt.gz'), 'wt') as f:
        f.write(text)
  if profile_dir and compiled is not None:  # the last compiled program, kernels grouped by kind
    from hita_jax.tools import profile_summary

    def once():
      nonlocal state
      for i in range(2):
        state, m = compiled(state, lp_state, batches[i], key)
      float(m['g_loss'])
    rows = profile_summary.profile(once, profile_dir, repeats=1, top=0)
    kinds = profile_summary.group_by_kind(rows)
    print(profile_summary.format_table(rows[:40]), flush=True)
    print(profile_summary.format_table(kinds), flush=True)
    _emit({**info, 'stage': 'profile', 'options': name, 'kinds': kinds, 'top': rows[:40]})


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=cli.VERBOSITY_HELP)
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--variant', default='V', choices=['V', 'U'])
  p.add_argument('--config', default=None, help='another config file (default configs/tokenizer_<variant>.py)')
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--options', nargs='*', default=[], help='NAME:xla_option=value[,...] per compile')
  p.add_argument('--profile', default=None, help='trace directory: profile 2 steps of the last program')
  p.add_argument('--save-hlo', action='store_true',
                 help='write each optimized program to $OUT/tok_step_<name>.hlo.txt.gz')
  a = p.parse_args(argv)
  run(a.batch, a.variant, a.options, a.steps, a.config, a.profile, a.save_hlo)


if __name__ == '__main__':
  cli.run(main)
