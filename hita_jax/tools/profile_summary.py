"""Where the device time goes: run a function under `jax.profiler.trace` and print the kernels
that took the most device time (name, calls, total ms, share), read from the Perfetto trace.

    from hita_jax.tools.profile_summary import profile
    table = profile(lambda: step(...), '/tmp/prof', repeats=3)

Used by `hita_jax.tools.bench --profile DIR` to profile any benchmark before optimising it.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re

from hita_jax.errors import MissingPathError


def device_kernel_table(trace_dir: str, top: int = 30) -> list[dict]:
  """Kernels on device streams of the newest Perfetto trace under `trace_dir`, by total time
  (the `top` largest, 0 = all, then an 'ALL' row)."""
  files = sorted(glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True)
                 + glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'), recursive=True),
                 key=os.path.getmtime)
  if not files:
    raise MissingPathError(f'no trace file under {trace_dir} (fix --profile=<the trace directory>)')
  with gzip.open(files[-1], 'rt') as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  names = {e['pid']: e.get('args', {}).get('name', '') for e in events
           if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  device_pids = {p for p, n in names.items() if '/device:' in n and 'CPU' not in n.upper()}
  if not device_pids:  # no accelerator streams (a CPU run): rank the host's ops instead
    device_pids = set(names)
  total = collections.Counter()
  calls = collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and e.get('pid') in device_pids and 'dur' in e:
      args = e.get('args') or {}
      key = args.get('hlo_op') or args.get('long_name') or e['name']
      total[key[:90]] += float(e['dur'])
      calls[key[:90]] += 1
  whole = sum(total.values()) or 1.0
  return [{'kernel': k, 'calls': calls[k], 'ms': v / 1e3, 'share': v / whole}
          for k, v in total.most_common(top or None)] + [{'kernel': 'ALL', 'calls': sum(calls.values()),
                                                   'ms': whole / 1e3, 'share': 1.0}]


def group_by_kind(rows: list[dict]) -> list[dict]:
  """Rows of `device_kernel_table(..., top=0)` summed by kernel kind: the name without XLA's
  numeric suffix (`loop_multiply_fusion.12` -> `loop_multiply_fusion`), so a loop body's many
  small kernels show up as a few lines."""
  total, calls = collections.Counter(), collections.Counter()
  whole = 0.0
  for r in rows:
    if r['kernel'] == 'ALL':
      whole = r['ms']
      continue
    kind = re.sub(r'(\.\d+)+$', '', r['kernel'])
    total[kind] += r['ms']
    calls[kind] += r['calls']
  whole = whole or sum(total.values()) or 1.0
  return [{'kernel': k, 'calls': calls[k], 'ms': v, 'share': v / whole}
          for k, v in total.most_common()]


def profile(fn, trace_dir: str, repeats: int = 3, top: int = 30) -> list[dict]:
  """Calls fn() `repeats` times under the profiler (fn must block on its result)."""
  import jax
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(repeats):
      fn()
  return device_kernel_table(trace_dir, top)


def profile_by_kind(fn, trace_dir: str, repeats: int = 3, show: int = 30):
  """Profiles fn() `repeats` times and prints the `show` largest kernels (and the total) and every
  kernel kind's total -> (all kernel rows, kind rows)."""
  rows = profile(fn, trace_dir, repeats=repeats, top=0)
  kinds = group_by_kind(rows)
  print(format_table(rows[:show] + rows[-1:]), flush=True)
  print(format_table(kinds), flush=True)
  return rows, kinds


_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$')
_COMP = re.compile(r'^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')
_SOURCE = re.compile(r'source_file="([^"]*)"\s+source_line=(\d+)')
_FRAME = re.compile(r'stack_frame_id=(\d+)')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r'calls=%?([\w.\-]+)')
_TABLE_ROW = re.compile(r'^(\d+) (.*)$')


def _short_source(path: str, line) -> str:
  """'/x/site-packages/hita_jax/models/gpt.py', 262 -> 'hita_jax/models/gpt.py:262'."""
  for root in ('hita_jax/', 'jax/', 'flax/', 'optax/'):
    i = path.rfind('/' + root)
    if i >= 0:
      return f'{path[i + 1:]}:{line}'
  return f'{os.path.basename(path)}:{line}'


def _stack_frames(hlo_text: str) -> dict[str, str]:
  """Newer XLA writes source positions as tables (FileNames, FileLocations, StackFrames) that
  instructions point into with stack_frame_id: frame id -> 'file:line' of the innermost frame in
  hita_jax (else the innermost frame)."""
  tables, table = collections.defaultdict(dict), None
  for line in hlo_text.splitlines():
    if line in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames'):
      table = line
      continue
    m = _TABLE_ROW.match(line) if table else None
    if m is None:
      if line.strip():
        table = None
      continue
    tables[table][m.group(1)] = m.group(2)
  files = {k: v.strip('"') for k, v in tables['FileNames'].items()}
  locations = {}
  for k, v in tables['FileLocations'].items():
    f, l = re.search(r'file_name_id=(\d+)', v), re.search(r'\bline=(\d+)', v)
    if f and l:
      locations[k] = _short_source(files.get(f.group(1), '?'), l.group(1))
  frames = {}
  for k, v in tables['StackFrames'].items():
    loc, parent = re.search(r'file_location_id=(\d+)', v), re.search(r'parent_frame_id=(\d+)', v)
    frames[k] = (locations.get(loc.group(1)) if loc else None, parent.group(1) if parent else None)
  out = {}
  for k in frames:
    chain, seen, f = [], set(), k
    while f in frames and f not in seen:  # innermost first; a root frame is its own parent
      seen.add(f)
      chain.append(frames[f][0])
      f = frames[f][1]
    chain = [c for c in chain if c]
    ours = [c for c in chain if c.startswith('hita_jax/')]
    if ours or chain:
      out[k] = (ours or chain)[0]
  return out


def hlo_sources(hlo_text: str) -> dict[str, tuple[str | None, str]]:
  """Instruction name -> (source 'file:line', op_name) for every instruction of an optimized HLO
  module (source_file / source_line metadata, or stack_frame_id into the module's frame tables).
  A fusion without a source of its own takes its fused computation's root's, else the line most
  of that computation's instructions came from."""
  frames = _stack_frames(hlo_text)
  own, calls, comps, roots = {}, {}, collections.defaultdict(list), {}
  comp = None
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if m is None:
      c = _COMP.match(line)
      if c is not None:
        comp = c.group(1)
      continue
    name, rest = m.groups()
    src, frame, op = _SOURCE.search(rest), _FRAME.search(rest), _OP_NAME.search(rest)
    where = _short_source(*src.groups()) if src else frames.get(frame.group(1)) if frame else None
    info = (where, op.group(1) if op else '')
    own[name] = info
    called = _CALLS.search(rest)
    if called:
      calls[name] = called.group(1)
    if comp is not None:
      comps[comp].append(info)
      if line.lstrip().startswith('ROOT'):
        roots[comp] = info
  out = {}
  for name, info in own.items():
    if info[0] is None and name in calls:
      sub = calls[name]
      root = roots.get(sub)
      if root and root[0]:
        info = root
      else:
        counted = collections.Counter(i for i in comps.get(sub, []) if i[0])
        info = counted.most_common(1)[0][0] if counted else info
    out[name] = info
  return out


def by_source_line(rows: list[dict], hlo_text: str, top: int = 30) -> list[dict]:
  """Kernel time (rows of `device_kernel_table(..., top=0)`) summed by the source line of the
  HLO instruction each kernel ran (the optimized module of the profiled program, e.g.
  `jitted.lower(...).compile().as_text()`): which lines of the model cost device time, beside the
  kernel kinds; 'fwd' / 'bwd' tells the forward pass from the gradient. Kernels with no
  instruction of that name (or no source metadata) go to '?'. The names match on GPU, where a
  trace event's `hlo_op` is the instruction's name; a CPU trace names runtime thunks instead."""
  sources = hlo_sources(hlo_text)
  total, calls, kernels, ops = (collections.Counter(), collections.Counter(), collections.Counter(),
                                {})
  whole = 0.0
  for r in rows:
    if r['kernel'] == 'ALL':
      whole = r['ms']
      continue
    src, op = sources.get(r['kernel'], (None, ''))
    # forward or gradient (JAX names the backward pass's ops 'transpose(jvp(...))')
    key = f"{src} {'bwd' if 'transpose(' in op else 'fwd'}" if src else '?'
    total[key] += r['ms']
    calls[key] += r['calls']
    kernels[key] += 1
    ops.setdefault(key, op.rsplit('/', 1)[-1] if op else '')
  whole = whole or sum(total.values()) or 1.0
  return [{'source': k, 'op': ops[k], 'kernels': kernels[k], 'calls': calls[k], 'ms': v,
           'share': v / whole} for k, v in total.most_common(top or None)]


def format_sources(rows: list[dict]) -> str:
  lines = [f"{'ms':>9} {'share':>6} {'calls':>6} {'kernels':>7}  source (an op there)"]
  lines += [f"{r['ms']:9.2f} {100 * r['share']:5.1f}% {r['calls']:6d} {r['kernels']:7d}  "
            f"{r['source']} ({r['op']})" for r in rows]
  return '\n'.join(lines)


def format_table(rows: list[dict]) -> str:
  lines = [f"{'ms':>9} {'share':>6} {'calls':>6}  kernel"]
  lines += [f"{r['ms']:9.2f} {100 * r['share']:5.1f}% {r['calls']:6d}  {r['kernel']}" for r in rows]
  return '\n'.join(lines)
