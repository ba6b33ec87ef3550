"""Where the tokenizer trainer's first-step time goes: build, trace, lower, XLA compile, per XLA
option set, and each compiled program's steady step time (issue: compile <= 60 s).

    python -m hita_jax.tools.tok_compile --batch 16 --variant V \
        --options autotune0:xla_gpu_autotune_level=0 no_triton_gemm:xla_gpu_enable_triton_gemm=false

Builds `train_tokenizer`'s models and jitted G + D step once (random weights, full size), traces
it twice (without and with `sharding.cheap_tracer_probes`), lowers once, then compiles the same
lowered program once per option set (`jax.stages.Lowered.compile(compiler_options=...)`) and times
`--steps` steps of each. XLA keeps autotuning results in memory within a process, so only the first
compile that autotunes is a cold figure: list the option sets in the order you want them measured.
Option sets are first tried on a one-op program; ones this XLA rejects are reported and skipped.
The step is jitted as the trainer jits it, so each option set merges over the config's
`train_tokenizer.gpu_compiler_options` (on GPU; printed as `config_xla`): `NAME:` alone is the
shipped configuration. An exported program (`--from-export`) compiles with XLA's own defaults plus
the set: that is the way to compare against XLA's defaults.

Cold figures for several option sets without a build each (the build is ~70 s at full size):

    python -m hita_jax.tools.tok_compile --batch 16 --export /tmp/step.exp     # once
    python -m hita_jax.tools.tok_compile --from-export /tmp/step.exp --options NAME:...   # per set

`--set KEY=VALUE` changes the config before the build (e.g. `--set tokenizer.dinov2_scan=True`),
or a models/layers switch read at trace time (`--set layers.CONV_1X1=gemm`), for an A/B of a model
or trainer switch run in two processes; the records carry it as `set`.

The `lower` record counts the lowered program's StableHLO ops by the source line that made them
(`op_census`): what XLA's fusion passes have to chew through.

Prints one JSON line per stage; with $OUT set also appends them to $OUT/tok_compile.jsonl.
With TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=gpu_compiler=1,hlo_pass_pipeline=1 XLA logs each HLO
pass's time on stderr; a '=== tok_compile: compile NAME' line marks where each compile begins.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from hita_jax import cli, config_lib, sharding
from hita_jax.tools.ab import (apply_overrides, emit_jsonl, parse_xla_option_set, set_layer_switches,
                               split_layer_switches, xla_rejects)


def _emit(rec: dict):
  emit_jsonl(rec, 'tok_compile.jsonl')


def custom_call_targets(stablehlo_text: str) -> list[str]:
  """The custom-call targets of a lowered program, sorted (`stablehlo.custom_call @target`)."""
  return sorted(set(re.findall(r'stablehlo\.custom_call @([\w$.-]+)', stablehlo_text)))


def hlo_stats(text: str) -> dict:
  """Counts in an optimized HLO module's text: instructions, fusions (kernels XLA generates),
  custom calls (cuBLAS / cuDNN / Triton), while loops, and the distinct cuDNN convolutions by
  kind (`cudnn_convs`, what XLA's GPU autotuner times one by one)."""
  stats = {'instructions': len(re.findall(r'^\s+(?:ROOT )?%?[\w.-]+ = ', text, re.M)),
           'fusions': len(re.findall(r' fusion\(', text)),
           'custom_calls': len(re.findall(r' custom-call\(', text)),
           'whiles': len(re.findall(r' while\(', text))}
  convs = cudnn_convs(text)
  if convs:
    stats['cudnn_convs'] = {kind: len(keys) for kind, keys in sorted(convs.items())}
  return stats


_DEF = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (\(?[a-z0-9]+\[[0-9,]*\])', re.M)
_CUDNN_CONV = re.compile(r'^\s*(?:ROOT )?%?[\w.\-]+ = \(?([a-z0-9]+\[[0-9,]*\]).*? custom-call\(([^)]*)\)'
                         r'(.*custom_call_target="__cudnn\$(conv\w*)".*)$', re.M)


def cudnn_convs(text: str) -> dict:
  """{cuDNN call kind ('convForward', 'convBiasActivationForward', 'convBackwardInput', ...): the
  set of distinct calls} in an optimized GPU HLO module. Two calls are the same when their result
  and operand shapes, window, dimension labels, groups and fused epilogue (activation, scales)
  agree: the autotuner tunes each such call once, over all of cuDNN's engine configurations."""
  shapes = dict(_DEF.findall(text))
  out: dict = {}
  for result, operands, rest, kind in _CUDNN_CONV.findall(text):
    ops = tuple(shapes.get(o.strip().lstrip('%'), o.strip()) for o in operands.split(',') if o.strip())
    attrs = tuple(re.findall(r'(window=\{[^}]*\}|dim_labels=[\w>-]+|feature_group_count=\d+|'
                             r'"activation_mode":"\w+"|"conv_result_scale":[^,}]+|'
                             r'"side_input_scale":[^,}]+|"leakyrelu_alpha":[^,}]+)', rest))
    out.setdefault(kind, set()).add((result, ops, attrs))
  return out


_LOC_DEF = re.compile(r'^(#loc\d+) = loc\((.*)\)$', re.M)
_OP_LOC = re.compile(r'^\s*(?:%[^=]+= )?"?(?:stablehlo|chlo|mhlo)\.[\w.]+.*\bloc\((#loc\d+)\)\s*$', re.M)
# in a location's text: a reference to another location, or a frame in one of our files
_LOC_PART = re.compile(r'(#loc\d+)|"[^"]*?(hita_jax/[^"]+\.py)":(\d+)')


def op_census(text: str, top: int = 15) -> dict:
  """Where a lowered program's StableHLO ops come from (`Lowered.as_text(debug_info=True)`): each
  op is charged to the innermost `hita_jax/...py:line` of its call stack (a custom VJP's backward
  to the line that calls the op), or to '?' where no frame of ours is recorded. The op count is
  what XLA's fusion passes start from, so this is where to look for a shorter compile."""
  locs = dict(_LOC_DEF.findall(text))
  memo: dict[str, str | None] = {}

  def frame(ref: str, depth: int = 0) -> str | None:
    if ref in memo or depth > 64:
      return memo.get(ref)
    found = None
    # `callsite(callee at caller)` lists the innermost frame first, so the first frame found wins
    for m in _LOC_PART.finditer(locs.get(ref, '')):
      found = frame(m.group(1), depth + 1) if m.group(1) else f'{m.group(2)}:{m.group(3)}'
      if found:
        break
    memo[ref] = found
    return found

  lines = collections.Counter(frame(ref) or '?' for ref in _OP_LOC.findall(text))
  files = collections.Counter()
  for key, n in lines.items():
    files[key.rsplit(':', 1)[0]] += n
  return {'stablehlo_ops': sum(lines.values()), 'ops_by_file': dict(files.most_common()),
          'ops_top_lines': [[n, k] for k, n in lines.most_common(top)]}


def check_options(options: list[str]) -> list[tuple[str, dict]]:
  """Parsed option sets that this XLA accepts (each tried on a one-op program first:
  `ab.xla_rejects`); rejected ones are reported."""
  good = []
  for text in options or ['default:']:
    name, opts = parse_xla_option_set(text)
    error = xla_rejects(opts)
    if error:
      _emit({'stage': 'check_options', 'options': name, 'xla': opts, 'error': error})
      continue
    good.append((name, opts))
  return good


def _compile_each(lowered, option_sets, run_step, info, steps, save_hlo):
  """Compiles `lowered` once per option set and times `steps` calls of run_step(compiled, i) (which
  blocks and returns the generator loss, or None); returns the last program that compiled and
  its option set's name."""
  compiled = compiled_name = None
  for name, opts in option_sets:
    # marks where this compile's XLA log lines (TF_CPP_VMODULE timers, on stderr) begin
    print(f'=== tok_compile: compile {name}', file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
      compiled = lowered.compile(compiler_options=opts or None)
    except Exception as e:  # report it, go on with the next option set
      _emit({**info, 'stage': 'compile', 'options': name, 'xla': opts, 'error': str(e).splitlines()[0]})
      continue
    compile_s = time.perf_counter() - t0
    compiled_name = name
    loss = run_step(compiled, 0)
    t0 = time.perf_counter()
    for i in range(steps):
      loss = run_step(compiled, i)
    dt = (time.perf_counter() - t0) / steps
    text = compiled.as_text() or ''
    _emit({**info, 'stage': 'compile', 'options': name, 'xla': opts, 's': compile_s,
           'step_s': dt, 'images_s': info['batch'] / dt, 'g_loss': loss, 'hlo': hlo_stats(text)})
    if save_hlo and os.environ.get('OUT'):
      with gzip.open(os.path.join(os.environ['OUT'], f'tok_step_{name}.hlo.txt.gz'), 'wt') as f:
        f.write(text)
  return compiled, compiled_name


def _step_for_export(parts, config, treedef):
  """The G + D step as a function of flat leaves (NNX variables in the state pytree cannot be
  serialized by jax.export) and raw key data."""
  from hita_jax.tasks import train_tokenizer as tt

  def fn(leaves, key_data):
    s, lp, b = jax.tree.unflatten(treedef, leaves)
    return jax.tree.leaves(tt.train_step(parts, config, s, lp, b, jax.random.wrap_key_data(key_data)))
  return fn


def run_exported(path: str, options: list[str], steps: int, save_hlo: bool = False,
                 profile_dir: str | None = None):
  """Cold compiles of a step written by `--export`, without building any model: each process that
  runs this measures the first compile of its option set (inputs are zeros of the saved shapes).
  The exported program donates nothing, so state and new state are both resident (a few GB for
  Hita-V); its step time is close to, not the same as, the trainer's donated step."""
  jax.config.update('jax_enable_compilation_cache', False)
  option_sets = check_options(options)
  with open(path, 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  # zeros of the saved shapes, placed as the step was exported (its device count must be present)
  mesh = sharding.make_mesh([('data', exported.nr_devices)])
  placed = [jax.device_put(jnp.zeros(a.shape, a.dtype), sh)
            for a, sh in zip(exported.in_avals, exported.in_shardings_jax(mesh))]
  (leaves, key_data), _ = jax.tree.unflatten(exported.in_tree, placed)
  images = [a for a in exported.in_avals if a.dtype == jnp.uint8 and a.ndim == 4]  # the batch
  info = {'from_export': os.path.basename(path), 'batch': images[0].shape[0] if images else None,
          'jax': jax.__version__, 'device': jax.devices()[0].device_kind}
  t0 = time.perf_counter()
  lowered = jax.jit(exported.call).trace(leaves, key_data).lower()
  _emit({**info, 'stage': 'lower', 's': time.perf_counter() - t0})

  def run_step(compiled, i):
    del i
    jax.block_until_ready(compiled(leaves, key_data))
    return None
  compiled, compiled_name = _compile_each(lowered, option_sets, run_step, info, steps, save_hlo)
  _profile(compiled, compiled_name, run_step, info, profile_dir)


def _profile(compiled, compiled_name, run_step, info, profile_dir):
  """Two steps of the last compiled program profiled, kernels grouped by kind."""
  if not profile_dir or compiled is None:
    return
  from hita_jax.tools import profile_summary
  rows, kinds = profile_summary.profile_by_kind(
      lambda: [run_step(compiled, i) for i in range(2)], profile_dir, repeats=1, show=40)
  sources = profile_summary.by_source_line(rows, compiled.as_text(), top=40)
  print(profile_summary.format_sources(sources), flush=True)
  _emit({**info, 'stage': 'profile', 'options': compiled_name, 'kinds': kinds, 'top': rows[:40],
         'sources': sources})


def bench_config(batch: int, variant: str, config_path: str | None, overrides) -> tuple:
  """The tokenizer config a compile measurement builds (random frozen towers, `batch` images),
  with `overrides` applied: config items and trace switches (set here, before any trace) ->
  (config, {what changed})."""
  config = config_lib.load_config(config_path or os.path.join(
      os.path.dirname(__file__), '..', '..', 'configs', f'tokenizer_{variant.lower()}.py'))
  config.train_tokenizer.global_batch_size = batch
  config.init.allow_random_dinov2 = True
  config.init.allow_random_dino_disc = True
  config.tokenizer_loss.lpips_weights = 'random'
  items, switches = split_layer_switches(list(overrides))
  changed = apply_overrides(config, items)
  set_layer_switches(switches)
  changed.update(switches)
  return config, changed


def run(batch: int, variant: str, options: list[str], steps: int, config_path: str | None = None,
        profile_dir: str | None = None, save_hlo: bool = False, export_path: str | None = None,
        overrides: list[str] = ()):
  from hita_jax.tasks import train_tokenizer as tt
  jax.config.update('jax_enable_compilation_cache', False)  # cold compiles only
  option_sets = check_options(options)
  config, changed = bench_config(batch, variant, config_path, overrides)
  mesh = sharding.make_mesh([('data', -1)])
  # the step is jitted as the trainer jits it: each option set merges over these
  info = {'variant': variant, 'batch': batch, 'jax': jax.__version__, **({'set': changed} if changed else {}),
          'device': jax.devices()[0].device_kind,
          'config_xla': config_lib.gpu_compiler_options(
              config.train_tokenizer.get('gpu_compiler_options')) or {}}
  t0 = time.perf_counter()
  parts, state, lp_state, _ = tt.build(config, mesh)
  jax.block_until_ready(state)
  _emit({**info, 'stage': 'build', 's': time.perf_counter() - t0})
  size = config.tokenizer.image_size
  r = np.random.RandomState(0)
  batches = [{'image': jnp.asarray(r.randint(0, 256, (batch, size, size, 3)).astype(np.uint8))}
             for _ in range(2)]
  key = jax.random.key(0)
  step = tt.jit_train_step(parts, config)  # as train_tokenizer compiles it
  t0 = time.perf_counter()
  step.trace(state, lp_state, batches[0], key)
  _emit({**info, 'stage': 'trace', 's': time.perf_counter() - t0})
  t0 = time.perf_counter()
  # a fresh jit: the first one's trace is cached
  step = tt.jit_train_step(parts, config)
  with sharding.cheap_tracer_probes():
    traced = step.trace(state, lp_state, batches[0], key)
  _emit({**info, 'stage': 'trace_cheap_probes', 's': time.perf_counter() - t0})
  t0 = time.perf_counter()
  lowered = traced.lower()
  lower_s = time.perf_counter() - t0
  text = lowered.as_text()
  _emit({**info, 'stage': 'lower', 's': lower_s, 'hlo_lines': text.count('\n'),
         **op_census(lowered.as_text(debug_info=True))})
  if export_path:  # after the timed trace, which its own trace would have warmed
    leaves, treedef = jax.tree.flatten((state, lp_state, batches[0]))
    t0 = time.perf_counter()
    # jax.export refuses custom calls it does not know to be stable (cuDNN attention, Pallas); the
    # file is read back by this tool on the same stack, so each target the step holds is allowed.
    checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in custom_call_targets(text)]
    try:
      exported = jax.export.export(jax.jit(_step_for_export(parts, config, treedef)),
                                   disabled_checks=checks)(leaves, jax.random.key_data(key))
      with open(export_path, 'wb') as f:
        f.write(exported.serialize())
      _emit({**info, 'stage': 'export', 's': time.perf_counter() - t0, 'path': export_path})
    except Exception as e:  # the compile below is still worth its time
      _emit({**info, 'stage': 'export', 'path': export_path, 'error': str(e).splitlines()[0][:300]})

  def run_step(compiled, i):
    nonlocal state
    state, m = compiled(state, lp_state, batches[i % 2], key)
    return float(m['g_loss'])
  compiled, compiled_name = _compile_each(lowered, option_sets, run_step, info, steps, save_hlo)
  _profile(compiled, compiled_name, run_step, info, profile_dir)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=cli.VERBOSITY_HELP)
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--variant', default='V', choices=['V', 'U'])
  p.add_argument('--config', default=None, help='another config file (default configs/tokenizer_<variant>.py)')
  p.add_argument('--steps', type=int, default=10, help='timed steps per compiled program (>= 1)')
  p.add_argument('--options', nargs='*', default=[], help='NAME:xla_option=value[,...] per compile')
  p.add_argument('--profile', default=None, help='trace directory: profile 2 steps of the last program')
  p.add_argument('--save-hlo', action='store_true',
                 help='write each optimized program to $OUT/tok_step_<name>.hlo.txt.gz')
  p.add_argument('--export', default=None, metavar='FILE',
                 help='also write the step (jax.export, serialized) for --from-export runs')
  p.add_argument('--from-export', default=None, metavar='FILE',
                 help='no build: compile a step written by --export (one cold compile per process)')
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='config change before the build, e.g. tokenizer.dinov2_scan=True, or a '
                      'models/layers switch, e.g. layers.CONV_1X1=gemm (repeatable)')
  a = p.parse_args(argv)
  if a.set and a.from_export:
    p.error('--set changes the build; an exported step (--from-export) has none')
  if a.steps < 1:
    p.error('--steps must be at least 1')
  if a.from_export:
    run_exported(a.from_export, a.options, a.steps, a.save_hlo, a.profile)
  else:
    run(a.batch, a.variant, a.options, a.steps, a.config, a.profile, a.save_hlo, a.export, a.set)


if __name__ == '__main__':
  cli.run(main)
