"""Where an XLA GPU compile spends its time, from XLA's own logs (no device needed to read them).

    python -m hita_jax.tools.xla_logs passes ERR[.gz] [--after '=== tok_compile: compile ship']
    python -m hita_jax.tools.xla_logs autotune AUTOTUNE_LOG.txt

`passes` reads the stderr of a compile run with
`TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=gpu_compiler=1,hlo_pass_pipeline=1` (e.g. `tok_compile`,
whose '=== tok_compile: compile NAME' lines mark where each compile begins; `--after` starts there)
and sums each HLO pass's time over the log, with `GpuCompiler::RunHloPasses` / `RunBackend` per
module. Pass times are summed by name over every module the log holds: the autotuner compiles and
times candidate modules (`cudnn-conv.N`, ...) in the middle of the main module's `config-assigner`,
so the log line of a pass does not say which module it ran on.

`autotune` reads the file `--xla_gpu_dump_autotune_logs_to=FILE` writes: per backend, the
instructions autotuned, the candidate configs tried and timed, and the sum of the best times.

Each prints a short table and one JSON line.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import re

from hita_jax import cli
from hita_jax.errors import MissingPathError, UserError

_UNITS = {'us': 1e-6, 'ms': 1e-3, 's': 1.0, 'min': 60.0}
_PASS = re.compile(r'HLO pass: (\S+) time: ([\d.]+) (us|ms|s|min)\b')
_STAGE = re.compile(r'GpuCompiler::(RunHloPasses|RunBackend) for (\S+) time: ([\d.]+) (us|ms|s|min)\b')


def _lines(path: str, what: str = 'the stderr of a compile run'):
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rt', errors='replace') as f:
      yield from f
  except FileNotFoundError as e:
    raise MissingPathError(f'{path} not found (fix the log argument: {what})') from e
  except (OSError, EOFError) as e:  # e.g. a truncated or non-gzip .gz
    raise UserError(f'{path} could not be read ({e}); fix the log argument') from e


def pass_times(lines, after: str | None = None) -> dict:
  """{'passes': {name: [seconds, calls]}, 'stages': {(stage, module): seconds}} from XLA's pass
  timer lines; with `after`, only the lines after the first one containing it."""
  passes = collections.defaultdict(lambda: [0.0, 0])
  stages = collections.defaultdict(float)
  started = after is None
  for line in lines:
    if not started:
      started = after in line
      continue
    m = _PASS.search(line)
    if m:
      p = passes[m.group(1)]
      p[0] += float(m.group(2)) * _UNITS[m.group(3)]
      p[1] += 1
      continue
    m = _STAGE.search(line)
    if m:
      stages[(m.group(1), m.group(2))] += float(m.group(3)) * _UNITS[m.group(4)]
  if not started:
    raise UserError(f'no line of the log contains {after!r} (fix --after, or leave it out)')
  return {'passes': dict(passes), 'stages': dict(stages)}


def autotune_summary(text: str) -> dict:
  """Per backend: instructions autotuned, configs tried, configs timed, the sum of each
  instruction's best time (s), from an autotune log's textproto. An instruction counts under the
  backend of its first config."""
  blocks = text.split('instruction_profiles {')[1:]
  if not blocks:
    raise UserError('no instruction_profiles in the autotune log (fix the argument: the file '
                    '--xla_gpu_dump_autotune_logs_to wrote)')
  out = {}
  for block in blocks:
    backends = re.findall(r'backend: (\w+)', block)
    nanos = [int(x) for x in re.findall(r'nanos: (\d+)', block)]
    row = out.setdefault(backends[0] if backends else '?',
                         {'instructions': 0, 'configs': 0, 'timed': 0, 'best_s': 0.0, 'max_configs': 0})
    row['instructions'] += 1
    row['configs'] += len(backends)
    row['timed'] += len(nanos)
    row['best_s'] += min(nanos, default=0) * 1e-9
    row['max_configs'] = max(row['max_configs'], len(backends))
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=cli.VERBOSITY_HELP)
  sub = p.add_subparsers(dest='cmd', required=True)
  a1 = sub.add_parser('passes')
  a1.add_argument('log')
  a1.add_argument('--after', default=None, help='start after the first line containing this text')
  a1.add_argument('--top', type=int, default=12)
  a2 = sub.add_parser('autotune')
  a2.add_argument('log')
  a = p.parse_args(argv)
  if a.cmd == 'passes':
    res = pass_times(_lines(a.log), a.after)
    for (stage, module), s in sorted(res['stages'].items(), key=lambda kv: -kv[1])[:6]:
      print(f'{s:9.2f} s  {stage} {module}')
    ranked = sorted(res['passes'].items(), key=lambda kv: -kv[1][0])
    for name, (s, calls) in ranked[:a.top]:
      print(f'{s:9.2f} s  {calls:6d} calls  {name}')
    print(json.dumps({'stages': {f'{k[0]} {k[1]}': round(v, 3) for k, v in res['stages'].items()},
                      'passes': {k: round(v[0], 3) for k, v in ranked[:a.top]},
                      'passes_total_s': round(sum(v[0] for v in res['passes'].values()), 3)}))
  else:
    res = autotune_summary(''.join(_lines(a.log, 'the file --xla_gpu_dump_autotune_logs_to wrote')))
    for backend, r in res.items():
      print(f"{backend:10s} {r['instructions']:5d} instructions  {r['configs']:6d} configs "
            f"({r['timed']} timed, at most {r['max_configs']} for one)  best times sum {r['best_s']:.3f} s")
    print(json.dumps(res))


if __name__ == '__main__':
  cli.run(main)
