"""Where an XLA GPU compile spends its time, from XLA's own logs (no device needed to read them).

    python -m hita_jax.tools.xla_logs passes ERR[.gz] [--after '=== tok_compile: compile ship']
    python -m hita_jax.tools.xla_logs autotune AUTOTUNE_LOG.txt
    python -m hita_jax.tools.xla_logs fusion ERR[.gz] [--after ...]
    python -m hita_jax.tools.xla_logs timeline ERR[.gz] [--after ...]
    python -m hita_jax.tools.xla_logs errata AUTOTUNE_LOG.txt --out errata.json [--within 1.5]

`passes` reads the stderr of a compile run with
`TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=gpu_compiler=1,hlo_pass_pipeline=1` (e.g. `tok_compile`,
whose '=== tok_compile: compile NAME' lines mark where each compile begins; `--after` starts there)
and sums each HLO pass's time over the log, with `GpuCompiler::RunHloPasses` / `RunBackend` per
module. Pass times are summed by name over every module the log holds: the autotuner compiles and
times candidate modules (`cudnn-conv.N`, ...) in the middle of the main module's `config-assigner`,
so the log line of a pass does not say which module it ran on.

`autotune` reads the file `--xla_gpu_dump_autotune_logs_to=FILE` writes: per backend, the
instructions autotuned, the candidate configs tried and timed, and the sum of the best times.

`fusion` reads the stderr of a compile run with `TF_CPP_VMODULE=priority_fusion=2` (and
`TF_CPP_MIN_LOG_LEVEL=0`): XLA's priority fusion logs 'Running full HLO cost analysis for C' when it
starts a computation and 'Fusing PRODUCER into CONSUMER' for each fusion, with glog's microsecond
timestamps. The pass re-prices the fused producer's neighbours after the last consumer of a
producer is fused, so the time from one 'Fusing' line to the next is that fusion plus the
re-pricing it caused; it is charged to the producer's source (its metadata's source_file:line when
the log prints it, e.g. with the compile option `xla_hlo_print_inline_stack_frames=true`, else its
op_name with the numbers dropped). Per computation: the time before the first fusion (the initial
pricing of every instruction) and after it; then the top producers and sources.

`timeline` reads the stderr of a compile run with
`TF_CPP_VMODULE=config_assigner=1,autotuner=2,config_runner=2`: the GPU autotuner's phases from
glog's timestamps. The compiling thread asks cuDNN / cuBLAS for each distinct instruction's
candidate configurations in turn ('Getting tuned config', one line an instruction: the gaps are
that enumeration, plan building included); each instruction's candidates then compile on XLA's
thread pool ('Using runner' when they are done) and are timed one instruction at a time under one
lock ('Validating outputs' when an instruction's timing starts after its input buffers are made;
its per-configuration lines when it ends). Reported: the span of each phase, the enumeration gaps'
sum, the sum of the serial timing windows, and per configuration: how many were timed, rejected as
wrong results or failed, the sum of their logged run times, those of 50 ms or more, and the window
time per configuration beyond its logged run (XLA's GpuProfiler runs each configuration once
untimed first, with redzone checks, then once timed, and compares its output with the others': at
autotune level 4 these checks are on; below 4 there is no 'Validating' line and no window).

`errata` reads an autotune log too and writes a cuDNN errata file (the JSON cudnn-frontend reads
from `$CUDNN_ERRATA_JSON_FILE`; XLA applies it to each plan it builds, before the autotuner sees
the configuration) that excludes, for the plain convolution kinds (forward, backward data,
backward filter), every cuDNN engine none of whose configurations came within `--within` times
the best time of any instruction of that kind in the log; with `--knobs`, also each knob setting
of a kept engine that never did (a rule lists the setting's knobs, which cudnn-frontend matches
as substrings of the plan tag 'ConvFwd_eng62_k2=3_k13=1...'; a rule that would also match a
kept setting is left out). Each timed configuration costs the
autotuner ~5 ms beyond its run (docs/PERFORMANCE.md session 35), so engines that never win are
compile time only. The rules match an engine id whatever the cuDNN version (their ids name the
log's), so regenerate the file for another cuDNN or GPU; they apply to every convolution of the
process (the fused bias + activation calls are left alone: their
operation graphs' tags are not the plain ones). An experiment: time it cold against the shipped
step on one host (`launch/tok_compile_gpu.sh errata`).

Each prints a short table and one JSON line.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json
import re

from hita_jax import cli
from hita_jax.errors import MissingPathError, UserError
from hita_jax.tools.profile_summary import _OP_NAME, _SOURCE, _short_source

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


def _after(lines, after: str | None):
  """The lines after the first one containing `after` (every line when it is None)."""
  started = after is None
  for line in lines:
    if started:
      yield line
    else:
      started = after in line
  if not started:
    raise UserError(f'no line of the log contains {after!r} (fix --after, or leave it out)')


def _timed(lines):
  """(seconds, line) for each glog line, the clock carried on past midnight."""
  day, last = 0.0, None
  for line in lines:
    t = _glog_seconds(line)
    if t is None:
      continue
    if last is not None and t + day < last - 43200:  # the log crossed midnight
      day += 86400.0
    last = t + day
    yield last, line


def pass_times(lines, after: str | None = None) -> dict:
  """{'passes': {name: [seconds, calls]}, 'stages': {(stage, module): seconds}} from XLA's pass
  timer lines; with `after`, only the lines after the first one containing it."""
  passes = collections.defaultdict(lambda: [0.0, 0])
  stages = collections.defaultdict(float)
  for line in _after(lines, after):
    m = _PASS.search(line)
    if m:
      p = passes[m.group(1)]
      p[0] += float(m.group(2)) * _UNITS[m.group(3)]
      p[1] += 1
      continue
    m = _STAGE.search(line)
    if m:
      stages[(m.group(1), m.group(2))] += float(m.group(3)) * _UNITS[m.group(4)]
  return {'passes': dict(passes), 'stages': dict(stages)}


_GLOG_TIME = re.compile(r'^[IWEF]\d{4} (\d\d):(\d\d):(\d\d\.\d+)\s')
_START = re.compile(r'Running full HLO cost analysis for (\S+)')
_FUSING = re.compile(r'\] Fusing %?([\w.\-]+) = (.*)$')
_OPCODE = re.compile(r'^(?:\([^=]*?\)|\S+) ([a-z][\w\-]*)\(')


def _glog_seconds(line: str) -> float | None:
  m = _GLOG_TIME.match(line)
  return None if m is None else int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))


def _producer_source(rest: str) -> tuple[str, str]:
  """(opcode, source) of the producer half of a 'Fusing P into C' line."""
  producer = rest.split(' into %', 1)[0]
  m = _OPCODE.match(producer)
  opcode = m.group(1) if m else '?'
  src = _SOURCE.search(producer)
  if src:
    return opcode, _short_source(*src.groups())
  name = _OP_NAME.search(producer)
  if name:  # the op path without its numbers: 'jit(train_step)/jvp(...)/conv_general_dilated'
    return opcode, re.sub(r'\d+', '#', name.group(1))[-160:]
  return opcode, f'({opcode}, no metadata)'


def fusion_times(lines, after: str | None = None) -> dict:
  """Priority fusion's time per computation and per fused producer's source, from the
  timestamps of its VLOG(2) lines (see the module docstring)."""
  comps = []  # [name, start, first_fusion_time, last_time, fusions]
  by_source = collections.defaultdict(lambda: [0.0, 0])
  by_opcode = collections.defaultdict(lambda: [0.0, 0])
  top = []  # (seconds, producer name, source)
  prev = None  # (time, opcode, source, name) of the last 'Fusing' line of the current computation
  for t, line in _timed(_after(lines, after)):
    m = _START.search(line)
    if m:
      comps.append([m.group(1), t, None, t, 0])
      prev = None
      continue
    m = _FUSING.search(line)
    if not m or not comps:
      continue
    comp = comps[-1]
    if prev is not None:
      gap = t - prev[0]
      by_source[prev[2]][0] += gap
      by_opcode[prev[1]][0] += gap
      top.append((gap, prev[3], prev[2]))
    else:
      comp[2] = t
    opcode, source = _producer_source(m.group(2))
    by_source[source][1] += 1
    by_opcode[opcode][1] += 1
    comp[3] = t
    comp[4] += 1
    prev = (t, opcode, source, m.group(1))
  if not comps:
    raise UserError('no priority-fusion lines in the log (run the compile with '
                    'TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=priority_fusion=2)')
  top.sort(key=lambda r: -r[0])
  return {
      'computations': [{'name': c[0], 'initial_s': (c[2] if c[2] is not None else c[3]) - c[1],
                        'fusing_s': c[3] - (c[2] if c[2] is not None else c[3]), 'fusions': c[4]}
                       for c in comps],
      'by_source': dict(by_source), 'by_opcode': dict(by_opcode), 'top': top[:50]}


# a run time is a Duration: seconds and / or nanos inside run_time { }
_RUN_TIME = re.compile(r'run_time \{\s*(?:seconds: (\d+)\s*)?(?:nanos: (\d+)\s*)?\}')


def _run_ns(m: re.Match) -> int:
  return int(m.group(1) or 0) * 10**9 + int(m.group(2) or 0)


def _instruction_blocks(text: str) -> list[str]:
  """An autotune log's textproto, one string per instruction_profiles entry."""
  blocks = text.split('instruction_profiles {')[1:]
  if not blocks:
    raise UserError('no instruction_profiles in the autotune log (fix the argument: the file '
                    '--xla_gpu_dump_autotune_logs_to wrote)')
  return blocks


def autotune_summary(text: str) -> dict:
  """Per backend: instructions autotuned, configs tried, configs timed, the sum of each
  instruction's best time (s) and of every timed config's run (`timed_s`: the GPU time the timed
  runs alone took; XLA also runs each config once untimed before), from an autotune log's
  textproto. An instruction counts under the backend of its first config."""
  out = {}
  for block in _instruction_blocks(text):
    backends = re.findall(r'backend: (\w+)', block)
    runs = [_run_ns(m) for m in _RUN_TIME.finditer(block)]
    row = out.setdefault(backends[0] if backends else '?',
                         {'instructions': 0, 'configs': 0, 'timed': 0, 'best_s': 0.0, 'max_configs': 0,
                          'timed_s': 0.0})
    row['instructions'] += 1
    row['configs'] += len(backends)
    row['timed'] += len(runs)
    row['best_s'] += min(runs, default=0) * 1e-9
    row['timed_s'] += sum(runs) * 1e-9
    row['max_configs'] = max(row['max_configs'], len(backends))
  return out


_DURATION = re.compile(r'duration: ([\d.]+)(ns|us|ms|s)\b')


def autotune_timeline(lines, after: str | None = None) -> dict:
  """The GPU autotuner's phases from its VLOG lines' timestamps (see the module docstring)."""
  gets, done, starts, profiled = [], [], [], []
  runs, wrong, failed = [], 0, 0
  t0 = None
  for t, line in _timed(_after(lines, after)):
    if '] ' not in line:
      continue
    where, msg = line.split('] ', 1)
    if 'config_assigner.cc' in where and msg.startswith(('Finding configs for', 'Getting tuned config')):
      t0 = t if t0 is None else t0
      if msg.startswith('Getting tuned config'):
        gets.append(t)
    elif 'autotuner.cc' in where and msg.startswith('Using runner'):
      done.append(t)
    elif 'config_runner.cc' in where and msg.startswith('Validating outputs'):
      starts.append(t)
    elif 'autotuner.cc' in where and not msg.startswith(('Using ', 'Autotun', 'Found only')):
      profiled.append(t)  # a configuration's profile, logged when its instruction's timing ends
      d = _DURATION.search(msg)
      if d:
        runs.append(float(d.group(1)) * {'ns': 1e-9, **_UNITS}[d.group(2)])
      elif 'WRONG RESULTS' in msg:
        wrong += 1
      else:
        failed += 1
  if t0 is None:
    return {'instructions': 0}
  # each timing window: from its start to the first profile line after it (the windows are serial)
  windows = []
  for i, s in enumerate(starts):
    nxt = starts[i + 1] if i + 1 < len(starts) else float('inf')
    j = bisect.bisect_left(profiled, s)  # profiled is in log (time) order
    windows.append((profiled[j] if j < len(profiled) and profiled[j] < nxt else s) - s)
  gaps = [b - a for a, b in zip(gets, gets[1:])]
  last = max([t0] + gets + done + starts + profiled)
  rel = lambda xs: [round(xs[0] - t0, 3), round(xs[-1] - t0, 3)] if xs else None
  n_configs = len(runs) + wrong + failed
  slow = [r for r in runs if r >= 0.05]
  return {'instructions': len(gets), 'span_s': round(last - t0, 3),
          'enumerate': {'first_last_s': rel(gets), 'gaps_sum_s': round(sum(gaps), 3),
                        'max_gap_s': round(max(gaps, default=0.0), 3)},
          'compiled': {'count': len(done), 'first_last_s': rel(done)},
          'timed': {'count': len(starts), 'first_last_s': rel(starts),
                    'windows_sum_s': round(sum(windows), 3),
                    'max_window_s': round(max(windows, default=0.0), 3)},
          'configs': {'timed': len(runs), 'wrong_results': wrong, 'failed': failed,
                      'runs_s': round(sum(runs), 3), 'slow_50ms': [len(slow), round(sum(slow), 3)],
                      # the windows' time beyond each timed run: the untimed run, the checks, the
                      # plan / executable set-up (and the unlogged runs of rejected configurations)
                      'beyond_run_ms': (round(1e3 * (sum(windows) - sum(runs)) / n_configs, 3)
                                        if n_configs and starts else None)}}


# XLA's custom-call target -> cudnn-frontend's operation tag (the prefix of its plan tags)
_CUDNN_OPS = {'convForward': 'ConvFwd', 'convBackwardInput': 'ConvBwdData',
              'convBackwardFilter': 'ConvBwdFilter'}


def _knob_parts(knobs) -> list[str]:
  """A configuration's knobs as cudnn-frontend writes them into a plan tag ('_k<type>=<value>')."""
  return [f'_k{k}={v}' for k, v in knobs]


def cudnn_errata(text: str, within: float = 1.5, knobs: bool = False) -> dict:
  """The errata file (see the module docstring) and what it removes, from an autotune log. With
  `knobs`, also each knob setting of a kept engine that never came within `within` x of the best,
  unless its rule would also match a kept configuration's tag."""
  blocks = _instruction_blocks(text)
  if not within >= 1.0:
    raise UserError(f'--within must be >= 1 (a multiple of the best time), got {within}')
  version = re.search(r'key: "CUDNN"\s*value: "(\d+)\.(\d+)\.(\d+)"', text)
  if not version:
    raise UserError('the autotune log names no cuDNN version (per_backend_versions "CUDNN"): '
                    'pass a log from --xla_gpu_dump_autotune_logs_to of a cuDNN build')
  cudnn = int(version.group(1)) * 10000 + int(version.group(2)) * 100 + int(version.group(3))
  stats = {}  # (operation, engine, knobs) -> [configurations, competitive, run seconds]
  for block in blocks:
    target = re.search(r'custom_call_target=\\?"__cudnn\$(\w+)', block)
    if 'backend: CUDNN' not in block or not target or target.group(1) not in _CUDNN_OPS:
      continue
    rows = []
    for cp in block.split('config_profiles {')[1:]:
      algo = re.search(r'algo_id: (\d+)', cp)
      run = _RUN_TIME.search(cp)
      if run:
        setting = tuple((int(k), int(v)) for k, v in re.findall(
            r'tuning_knobs \{\s*key: (-?\d+)\s*value: (-?\d+)', cp))
        rows.append(((_CUDNN_OPS[target.group(1)], int(algo.group(1)) if algo else 0, setting),
                     _run_ns(run) * 1e-9))
    best = min((t for _, t in rows), default=0.0)
    for key, t in rows:
      e = stats.setdefault(key, [0, 0, 0.0])
      e[0] += 1
      e[1] += t <= within * best
      e[2] += t
  engines = {}
  for (op, eng, _), e in stats.items():
    agg = engines.setdefault((op, eng), [0, 0, 0.0])
    agg[:] = [agg[0] + e[0], agg[1] + e[1], agg[2] + e[2]]
  cut = sorted(k for k, e in engines.items() if not e[1])
  # no cudnn_version_start / _end: cudnn-frontend compares them with the CUDNN_VERSION XLA was
  # built against, not the runtime cuDNN the log names; the rule id carries that one instead
  rules = [{'rule_id': f'hita_jax_cudnn{cudnn}_{op}_eng{eng}', 'operation': op, 'engine': eng}
           for op, eng in cut]
  cut_engines = set(cut)
  cut_keys = [k for k in stats if k[:2] in cut_engines]
  dropped = 0
  if knobs:
    kept_tags = collections.defaultdict(list)  # (operation, engine) -> kept settings' knob tags
    for (op, eng, setting), e in stats.items():
      if e[1]:
        kept_tags[(op, eng)].append(''.join(_knob_parts(setting)))
    for key in sorted(k for k, e in stats.items() if not e[1] and k[:2] not in cut_engines):
      op, eng, setting = key
      subs = _knob_parts(setting)
      # cudnn-frontend matches each knob as a substring of the tag: '_k2=3' is also in '_k2=30'
      clash = any(all(x in tag for x in subs) for tag in kept_tags[(op, eng)])
      if not subs or clash:
        dropped += 1
        continue
      rules.append({'rule_id': f'hita_jax_cudnn{cudnn}_{op}_eng{eng}{"".join(subs)}',
                    'operation': op, 'engine': eng, 'knob': subs})
      cut_keys.append(key)
  return {'errata': {'version': 1, 'rules': rules},
          'summary': {'cudnn_version': cudnn, 'within': within, 'knobs': knobs,
                      'plain_configs': sum(e[0] for e in stats.values()),
                      'engines': len(engines), 'engines_cut': len(cut),
                      'knob_rules': len(rules) - len(cut), 'knob_rules_dropped': dropped,
                      'configs_cut': sum(stats[k][0] for k in cut_keys),
                      'runs_cut_s': round(sum(stats[k][2] for k in cut_keys), 3)}}


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
  a3 = sub.add_parser('fusion')
  a3.add_argument('log')
  a3.add_argument('--after', default=None, help='start after the first line containing this text')
  a3.add_argument('--top', type=int, default=15)
  a4 = sub.add_parser('timeline')
  a4.add_argument('log')
  a4.add_argument('--after', default=None, help='start after the first line containing this text')
  a5 = sub.add_parser('errata')
  a5.add_argument('log')
  a5.add_argument('--out', required=True, help='the errata JSON to write')
  a5.add_argument('--within', type=float, default=1.5,
                  help='keep an engine if any configuration of it came within this multiple of an '
                       "instruction's best time")
  a5.add_argument('--knobs', action='store_true',
                  help="also exclude a kept engine's knob settings that never came within --within")
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
  elif a.cmd == 'fusion':
    res = fusion_times(_lines(a.log, 'the stderr of a compile run with priority_fusion=2'), a.after)
    comps = sorted(res['computations'], key=lambda c: -(c['initial_s'] + c['fusing_s']))
    for c in comps[:5]:
      print(f"{c['initial_s'] + c['fusing_s']:9.2f} s  {c['name']}: initial pricing {c['initial_s']:.2f} s, "
            f"{c['fusions']} fusions {c['fusing_s']:.2f} s")
    if len(comps) > 5:
      print(f"{sum(c['initial_s'] + c['fusing_s'] for c in comps[5:]):9.2f} s  {len(comps) - 5} other computations")
    print('after a fusion of a producer from (s, fusions):')
    ranked = sorted(res['by_source'].items(), key=lambda kv: -kv[1][0])
    for src, (s, n) in ranked[:a.top]:
      print(f'{s:9.2f} s  {n:6d}  {src}')
    print('largest single gaps:')
    for s, name, src in res['top'][:a.top]:
      print(f'{s:9.3f} s  {name}  {src}')
    print(json.dumps({'computations': comps[:5],
                      'by_source': {k: [round(v[0], 3), v[1]] for k, v in ranked[:a.top]},
                      'by_opcode': {k: [round(v[0], 3), v[1]] for k, v in
                                    sorted(res['by_opcode'].items(), key=lambda kv: -kv[1][0])[:a.top]}}))
  elif a.cmd == 'timeline':
    res = autotune_timeline(_lines(a.log, 'the stderr of a compile run with config_assigner=1,'
                                          'autotuner=2,config_runner=2'), a.after)
    if res['instructions']:
      e, c, t = res['enumerate'], res['compiled'], res['timed']
      print(f"{res['instructions']} instructions, autotuner span {res['span_s']:.2f} s")
      print(f"  enumeration (compiling thread): {e['gaps_sum_s']:.2f} s over {e['first_last_s']}, "
            f"longest {e['max_gap_s']:.3f} s")
      print(f"  candidate compiles done: {c['count']} over {c['first_last_s']}")
      print(f"  timing (serial): {t['windows_sum_s']:.2f} s in {t['count']} windows over "
            f"{t['first_last_s']}, longest {t['max_window_s']:.3f} s")
      k = res['configs']
      beyond = '' if k['beyond_run_ms'] is None else f", {k['beyond_run_ms']:.2f} ms a configuration beyond its run"
      print(f"  configurations: {k['timed']} timed ({k['runs_s']:.2f} s of logged runs; "
            f"{k['slow_50ms'][0]} of >= 50 ms: {k['slow_50ms'][1]:.2f} s), {k['wrong_results']} wrong results, "
            f"{k['failed']} failed{beyond}")
    else:
      print('no autotuner lines (run with TF_CPP_VMODULE=config_assigner=1,autotuner=2,config_runner=2)')
    print(json.dumps(res))
  elif a.cmd == 'errata':
    res = cudnn_errata(''.join(_lines(a.log, 'the file --xla_gpu_dump_autotune_logs_to wrote')), a.within,
                       a.knobs)
    with open(a.out, 'w') as f:
      json.dump(res['errata'], f, indent=1)
    k = res['summary']
    print(f"{k['engines_cut']} of {k['engines']} engines cut (never within {k['within']}x of the best), "
          f"{k['knob_rules']} knob settings ({k['knob_rules_dropped']} left: no knobs, or a rule would match "
          f"a kept one): {k['configs_cut']} of {k['plain_configs']} plain-convolution configurations, "
          f"{k['runs_cut_s']:.2f} s of their runs; cuDNN {k['cudnn_version']}; wrote {a.out}")
    print(json.dumps(k))
  else:
    res = autotune_summary(''.join(_lines(a.log, 'the file --xla_gpu_dump_autotune_logs_to wrote')))
    for backend, r in res.items():
      print(f"{backend:10s} {r['instructions']:5d} instructions  {r['configs']:6d} configs "
            f"({r['timed']} timed, at most {r['max_configs']} for one)  best times sum {r['best_s']:.3f} s, "
            f"timed runs sum {r['timed_s']:.3f} s")
    print(json.dumps(res))


if __name__ == '__main__':
  cli.run(main)
