"""The tokenizer step's GPU compile on a machine without a GPU: XLA's GPU compiler run against a
target description, to see what a program change does to the compile's CPU-side passes (priority
fusion, the backend) without device time.

    # here, on the CPU: the step built and lowered for CUDA (the GPU code paths: cuDNN attention,
    # the GPU GroupNorm sums), written with jax.export
    python -m hita_jax.tools.gpu_compile_offline export --out /tmp/step.exp [--set lpips.TAP_NORM=fused]
    # XLA's GPU pipeline on that program for an H100, with its pass timers
    python -m hita_jax.tools.gpu_compile_offline compile /tmp/step.exp --timers [--fusion-log]

`compile` needs the CUDA PJRT plugin's packages of the installed jaxlib's version (`pip install
jax-cuda12-plugin==<jaxlib version> jax-cuda12-pjrt==<same>`, no CUDA libraries, driver or GPU)
and a GpuTargetConfigProto in text form (`--target`; by default XLA's H100 SXM description,
`gpu_targets/h100_sxm.txtpb` beside this file). Fields this jaxlib's XLA does not know (a newer
spec file) are dropped, each named in the record.

What it measures and what not: with no device there is no autotuning (XLA's config assigner takes
each op's first configuration), so the autotuner's share of a real compile is missing and the
program's kernels are not the ones a GPU compile picks; the HLO passes before and around it (priority
fusion: about 40 % of the Hita-V/16 step's compile on an H100) run as on the GPU host, on this
machine's cores. Pass timers (`--timers`) come from XLA's log, read by `xla_logs`. Compare
variants on one machine, several runs each: a shared 2-core host varies by tens of percent.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from hita_jax import cli, config_lib, sharding
from hita_jax.errors import UserError
from hita_jax.tools.tok_compile import bench_config, custom_call_targets, hlo_stats

DEFAULT_TARGET = os.path.join(os.path.dirname(__file__), 'gpu_targets', 'h100_sxm.txtpb')
CUDNN_VERSION = 91900  # the device image's cuDNN (9.19), what the cuDNN attention lowering checks


@contextlib.contextmanager
def gpu_code_paths(cudnn_version: int = CUDNN_VERSION, capability: tuple = (9, 0)):
  """Traces as on a GPU host from a CPU one: the models' platform choices (`jax.default_backend()`)
  see 'gpu', and JAX's cuDNN attention lowering sees a cuDNN and a device of `capability` (it
  asks the local GPU otherwise). Private JAX functions, patched for the trace only."""
  from jax._src.cudnn import fused_attention_stablehlo as fas
  saved = (jax.default_backend, fas.check_cudnn_version, fas.check_compute_capability,
           fas.is_cuda_compute_capability_equal)
  jax.default_backend = lambda: 'gpu'
  fas.check_cudnn_version = lambda: cudnn_version
  fas.check_compute_capability = lambda c: tuple(int(x) for x in c.split('.')) <= capability
  fas.is_cuda_compute_capability_equal = lambda c: tuple(int(x) for x in c.split('.')) == capability
  try:
    yield
  finally:
    (jax.default_backend, fas.check_cudnn_version, fas.check_compute_capability,
     fas.is_cuda_compute_capability_equal) = saved


def export_step(out: str, batch: int, variant: str, config_path: str | None, overrides: list[str]):
  """Builds the tokenizer trainer's G + D step on this host (random weights) and writes it
  lowered for CUDA; returns the record."""
  from hita_jax.tasks import train_tokenizer as tt
  from hita_jax.tools.tok_compile import _step_for_export
  config, changed = bench_config(batch, variant, config_path, overrides)
  t0 = time.perf_counter()
  # one device: the step is compiled for one GPU (and a host with fake CPU devices would hold a
  # copy of the state per device)
  parts, state, lp_state, _ = tt.build(config, sharding.make_mesh([('data', 1)], jax.devices()[:1]))
  size = config.tokenizer.image_size
  leaves, treedef = jax.tree.flatten((state, lp_state, {'image': jnp.zeros((batch, size, size, 3), jnp.uint8)}))
  build_s = time.perf_counter() - t0
  fn = jax.jit(_step_for_export(parts, config, treedef))
  key_data = jax.random.key_data(jax.random.key(0))
  t0 = time.perf_counter()
  with gpu_code_paths():
    text = fn.trace(leaves, key_data).lower(lowering_platforms=('cuda',)).as_text()
    targets = sorted(set(custom_call_targets(text)))
    exported = jax.export.export(
        fn, platforms=('cuda',),
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(t) for t in targets])(leaves, key_data)
  with open(out, 'wb') as f:
    f.write(exported.serialize())
  return {'stage': 'export', 'path': out, 'batch': batch, 'variant': variant, 'jax': jax.__version__,
          **({'set': changed} if changed else {}), 'build_s': build_s,
          'export_s': time.perf_counter() - t0, 'custom_calls': targets,
          'gpu_compiler_options': _options(config)}


def _options(config) -> dict:
  """The config's GPU compiler options as a dict (config_lib.gpu_compiler_options gives None off a GPU)."""
  options = config.train_tokenizer.get('gpu_compiler_options') or {}
  return dict(options.to_dict() if hasattr(options, 'to_dict') else options)


_UNKNOWN_FIELD = re.compile(r'has no field named "(\w+)"')


def drop_field(text: str, name: str) -> str:
  """The textproto without field `name` (a scalar line or a whole { } block, at any depth)."""
  out, depth = [], 0
  for line in text.split('\n'):
    if depth:
      depth += line.count('{') - line.count('}')
      continue
    if re.match(rf'\s*{name}\s*[:{{]', line):
      depth = max(line.count('{') - line.count('}'), 0)
      continue
    out.append(line)
  return '\n'.join(out)


def _topology_error(text: str) -> str:
  """stderr of creating a CUDA topology from `text` in a fresh process ('' when it works): XLA
  names an unknown field only in its log."""
  with tempfile.NamedTemporaryFile('w', suffix='.txtpb', delete=False) as f:
    f.write(text)
  try:
    r = subprocess.run([sys.executable, '-c', (
        'import sys; from jax.experimental import topologies\n'
        'topologies.get_topology_desc("offline", "cuda", target_config=open(sys.argv[1]).read(), '
        'topology="1x1x1")'), f.name], capture_output=True, text=True, env=_plugin_env())
  finally:
    os.unlink(f.name)
  return '' if r.returncode == 0 else r.stderr


def _plugin_env() -> dict:
  # the plugin checks for CUDA libraries when it registers; none are needed to compile
  return {**os.environ, 'JAX_SKIP_CUDA_CONSTRAINTS_CHECK': '1'}


def fit_target(text: str, error=_topology_error, tries: int = 30) -> tuple[str, list[str]]:
  """`text` with the fields this jaxlib does not know dropped, one per try -> (text, dropped)."""
  dropped = []
  for _ in range(tries):
    err = error(text)
    if not err:
      return text, dropped
    m = _UNKNOWN_FIELD.search(err)
    if not m:
      raise UserError('this jaxlib cannot make a CUDA target from the --target file: '
                      + (err.strip().splitlines() or ['no message'])[-1][:300]
                      + ' (is jax-cuda12-plugin / jax-cuda12-pjrt of the installed jaxlib version installed?)')
    dropped.append(m.group(1))
    text = drop_field(text, m.group(1))
  raise UserError(f'--target: still unreadable after dropping {dropped}')


def compile_export(path: str, target_text: str, options: dict) -> dict:
  """Compiles an exported step for the target's GPU here; the record (seconds, HLO counts)."""
  from jax.experimental import topologies
  with open(path, 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  if exported.platforms != ('cuda',):
    raise UserError(f'{path} was exported for {exported.platforms}, not CUDA (write it with '
                    '`gpu_compile_offline export`)')
  topo = topologies.get_topology_desc('offline', 'cuda', target_config=target_text, topology='1x1x1')
  mesh = jax.sharding.Mesh(np.asarray(topo.devices[:1]), ('data',))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  args, _ = jax.tree.unflatten(exported.in_tree, [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep)
                                                  for a in exported.in_avals])
  lowered = jax.jit(exported.call).trace(*args).lower()
  print('=== gpu_compile_offline: compile', file=sys.stderr, flush=True)  # the timers' start
  t0 = time.perf_counter()
  compiled = lowered.compile(compiler_options=options or None)
  return {'stage': 'compile', 'path': path, 'xla': options, 's': time.perf_counter() - t0,
          'device': topo.devices[0].device_kind, 'hlo': hlo_stats(compiled.as_text() or '')}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=cli.VERBOSITY_HELP)
  sub = p.add_subparsers(dest='cmd', required=True)
  e = sub.add_parser('export', help='build the step here and write it lowered for CUDA')
  e.add_argument('--out', required=True)
  e.add_argument('--batch', type=int, default=16)
  e.add_argument('--variant', default='V', choices=['V', 'U'])
  e.add_argument('--config', default=None, help='another config file (default configs/tokenizer_<variant>.py)')
  e.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='config change or trace switch (as tok_compile --set), repeatable')
  c = sub.add_parser('compile', help="compile an export for the --target GPU on this machine")
  c.add_argument('export')
  c.add_argument('--target', default=DEFAULT_TARGET,
                 help='GpuTargetConfigProto text (default: the H100 SXM description shipped here)')
  c.add_argument('--options', default='shipped:', help="NAME:xla_option=value,... ('shipped:' = the "
                 "tokenizer config's GPU options, the name of an empty set = XLA's defaults)")
  c.add_argument('--timers', action='store_true', help="XLA's pass timers (a child process logs them)")
  c.add_argument('--fusion-log', action='store_true', help="also priority fusion's time by producer")
  a = p.parse_args(argv)
  if a.cmd == 'export':
    print(json.dumps(export_step(a.out, a.batch, a.variant, a.config, a.set)))
    return
  from hita_jax.tools import ab, xla_logs
  name, options = ab.parse_xla_option_set(a.options)
  if name == 'shipped' and not options:
    options = _options(config_lib.load_config(
        os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'tokenizer_v.py')))
  with open(a.target) as f:
    target = f.read()
  # a child reads the target its parent fitted: nothing left to drop, no probe process to spawn
  target, dropped = (target, []) if os.environ.get('_HITA_OFFLINE_CHILD') else fit_target(target)
  if not (a.timers or a.fusion_log) or os.environ.get('_HITA_OFFLINE_CHILD'):
    os.environ.update(_plugin_env())
    print(json.dumps({**compile_export(a.export, target, options), 'options': name,
                      'target': os.path.basename(a.target), 'dropped_target_fields': dropped}), flush=True)
    return
  vmodule = 'gpu_compiler=1,hlo_pass_pipeline=1' + (',priority_fusion=2' if a.fusion_log else '')
  with tempfile.TemporaryDirectory() as d:
    err, fitted = os.path.join(d, 'xla.log'), os.path.join(d, 'target.txtpb')
    with open(fitted, 'w') as f:  # the child reads the fitted target: nothing left to drop
      f.write(target)
    with open(err, 'w') as f:
      r = subprocess.run([sys.executable, '-m', 'hita_jax.tools.gpu_compile_offline', 'compile', a.export,
                          '--target', fitted, '--options', a.options],
                         stdout=subprocess.PIPE, stderr=f, text=True,
                         env={**_plugin_env(), '_HITA_OFFLINE_CHILD': '1', 'TF_CPP_MIN_LOG_LEVEL': '0',
                              'TF_CPP_VMODULE': vmodule})
    if r.returncode:
      tail = open(err).read().strip().splitlines()[-3:]
      raise UserError(f'the compile failed (exit {r.returncode}): {" | ".join(tail)[:500]}')
    rec = {**json.loads(r.stdout.strip().splitlines()[-1]), 'target': os.path.basename(a.target),
           'dropped_target_fields': dropped}
    lines = list(xla_logs._lines(err))
    timers = xla_logs.pass_times(lines, after='=== gpu_compile_offline: compile')
    rec['stages'] = {f'{k[0]} {k[1]}': round(v, 2) for k, v in timers['stages'].items()}
    rec['passes'] = {k: round(v[0], 2) for k, v in sorted(timers['passes'].items(), key=lambda kv: -kv[1][0])[:8]}
    if a.fusion_log:
      fus = xla_logs.fusion_times(lines, after='=== gpu_compile_offline: compile')
      rec['fusion_by_source'] = {k: [round(v[0], 2), v[1]] for k, v in
                                 sorted(fus['by_source'].items(), key=lambda kv: -kv[1][0])[:15]}
  print(json.dumps(rec))


if __name__ == '__main__':
  cli.run(main)
