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
  import re
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


def format_table(rows: list[dict]) -> str:
  lines = [f"{'ms':>9} {'share':>6} {'calls':>6}  kernel"]
  lines += [f"{r['ms']:9.2f} {100 * r['share']:5.1f}% {r['calls']:6d}  {r['kernel']}" for r in rows]
  return '\n'.join(lines)
