"""What the in-process A/B tools (`tok_ab`, `gpt_ab`) and the device benchmarks share: arm
parsing, config overrides, train-state layouts, the alternating timings' summary, and JSON-line
output."""
from __future__ import annotations

import ast
import json
import os
import time

import jax
import numpy as np

from hita_jax.errors import UserError


def parse_arm(text: str) -> tuple[str, list[str]]:
  """'name:key=value,key=value' -> (name, ['key=value', ...]); 'name:' is the shipped config."""
  name, sep, rest = text.partition(':')
  if not sep or not name:
    raise UserError(f'--arm {text!r}: write NAME:KEY=VALUE[,KEY=VALUE...] '
                    '(e.g. --arm scan:tokenizer.dinov2_scan=True; NAME: alone is the shipped config)')
  return name, [item for item in _split_items(rest) if item]


def parse_xla_option_set(text: str) -> tuple[str, dict]:
  """'name:xla_option=value,...' -> (name, {option: value}), 'true' / 'false' as bools and digits as
  ints; 'name:' is the empty set."""
  name, colon, rest = text.partition(':')
  if not colon or not name:
    raise ValueError(f'--options {text!r}: write NAME:xla_option=value[,...] (NAME: alone is the '
                     'empty set)')
  opts = {}
  for item in filter(None, rest.split(',')):
    k, sep, v = item.partition('=')
    if not k or not sep:
      raise ValueError(f'--options {text!r}: write NAME:xla_option=value[,...]')
    opts[k.strip()] = {'true': True, 'false': False}.get(v.lower(), int(v) if v.lstrip('-').isdigit() else v)
  return name, opts


def xla_rejects(opts: dict, device=None) -> str | None:
  """The first line of XLA's error when it refuses the option set on a one-op program (an unknown
  option costs a second, not a build and a failed compile), else None. `device`: where to compile
  (default JAX's; the CPU accepts and checks xla_gpu_* names too)."""
  x = np.float32(0) if device is None else jax.device_put(np.float32(0), device)
  try:
    jax.jit(lambda x: x + 1).lower(x).compile(compiler_options=opts or None)
  except Exception as e:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
  return None


def _split_items(text: str) -> list[str]:
  """Splits at the commas outside brackets and quotes, so a value may be a dict or a list:
  `train_ar.gpu_compiler_options={'a': True, 'b': 2},gpt.dropout_rng=hash` is two items."""
  items, depth, quote, start = [], 0, '', 0
  for i, ch in enumerate(text):
    if quote:
      quote = '' if ch == quote else quote
    elif ch in '\'"':
      quote = ch
    elif ch in '([{':
      depth += 1
    elif ch in ')]}':
      depth -= 1
    elif ch == ',' and depth == 0:
      items.append(text[start:i])
      start = i + 1
  if depth or quote:
    raise UserError(f'--arm item {text!r}: unbalanced brackets or quotes')
  return items + [text[start:]]


def apply_overrides(config, items: list[str], flag: str = '--set') -> dict:
  """'section.key=value' items set on the config (values as Python literals, else strings; the
  ConfigDict checks the type); returns them as a dict for the records. `flag`: the command-line
  option the items came from, for error messages."""
  done = {}
  for item in items:
    key, sep, text = item.partition('=')
    if not sep or not key:
      raise UserError(f'{flag} {item!r}: write KEY=VALUE, e.g. tokenizer.dinov2_scan=True')
    *parents, leaf = key.split('.')
    node = config
    for name in parents:
      node = node[name] if name in node else None
      if not hasattr(node, 'keys'):
        break
    if not hasattr(node, 'keys') or leaf not in node:
      raise UserError(f'{flag} {item!r}: the config has no key {key!r} (see the config file)')
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    node[leaf] = value
    done[key] = value
  return done


# Module switches read when a program is traced; `--set MODULE.NAME=VALUE` sets one. Qualified
# name -> (module, the module's tuple of allowed values, or int for a count >= 0).
TRACE_SWITCHES = {'layers.CONV_1X1': ('hita_jax.models.layers', 'CONV_1X1S'),
                  'layers.CONV_BIAS': ('hita_jax.models.layers', 'CONV_BIASES'),
                  'layers.SPATIAL_SUM': ('hita_jax.models.layers', 'SPATIAL_SUMS'),
                  'layers.LAYER_NORM': ('hita_jax.models.layers', 'LAYER_NORMS'),
                  'lpips.TAP_NORM': ('hita_jax.models.lpips', 'TAP_NORMS'),
                  'training.FLAT_CONCAT_GROUP': ('hita_jax.training', int)}
_SWITCH_MODULES = {k.split('.')[0] for k in TRACE_SWITCHES}  # 'layers', 'lpips', 'training'


def split_layer_switches(items: list[str], flag: str = '--set') -> tuple[list[str], dict]:
  """'layers.NAME=VALUE' / 'training.NAME=VALUE' items -> {qualified name: value} (checked against
  the switch's allowed values); the other items are returned for the config."""
  import importlib
  rest, switches = [], {}
  for item in items:
    key, sep, value = item.partition('=')
    if key.split('.')[0] not in _SWITCH_MODULES:
      rest.append(item)
      continue
    if not sep or key not in TRACE_SWITCHES:
      raise UserError(f'{flag} {item!r}: a trace switch is one of {sorted(TRACE_SWITCHES)}, '
                      'e.g. layers.CONV_1X1=gemm')
    module, allowed = TRACE_SWITCHES[key]
    if allowed is int:
      if not value.isdigit():
        raise UserError(f'{flag} {item!r}: {key} is a count >= 0')
      value = int(value)
    else:
      allowed = getattr(importlib.import_module(module), allowed)
      if value not in allowed:
        raise UserError(f'{flag} {item!r}: {key} must be one of {allowed}')
    switches[key] = value
  return rest, switches


def trace_switch_values(switches: dict) -> dict:
  """The current values of the switches named in `switches` (to put them back)."""
  import importlib
  return {k: getattr(importlib.import_module(TRACE_SWITCHES[k][0]), k.split('.', 1)[1]) for k in switches}


def set_layer_switches(switches: dict) -> None:
  """Sets trace switches ({qualified name: value}) before the program is traced."""
  import importlib
  for key, value in switches.items():
    setattr(importlib.import_module(TRACE_SWITCHES[key][0]), key.split('.', 1)[1], value)


def check_names(arms) -> None:
  if len({name for name, _ in arms}) != len(arms):
    raise UserError(f'--arm names must differ: {[name for name, _ in arms]}')


def layout(tree, with_sharding: bool = False):
  """Structure, shapes and dtypes (and shardings): what must match for two arms to share
  parameters, or one donated state."""
  leaf = (lambda x: (x.shape, x.dtype, getattr(x, 'sharding', None))) if with_sharding else (
      lambda x: (x.shape, x.dtype))
  return jax.tree.structure(tree), [leaf(x) for x in jax.tree.leaves(tree)]


def summarize(records: list[dict], times: dict[str, list[float]], tool: str, **fields) -> dict:
  """Each arm's record gets its step time (the minimum over rounds), the rounds, images/s and the
  speedup over the first arm; returns the summary line."""
  first = min(times[records[0]['arm']])
  for rec in records:
    t = times[rec['arm']]
    rec.update(step_s=min(t), step_s_rounds=t, images_s=rec['batch'] / min(t),
               speedup_vs_first=first / min(t))
  return {tool: 'summary', **fields,
          'step_s': {r['arm']: r['step_s'] for r in records},
          'images_s': {r['arm']: r['images_s'] for r in records},
          'speedup_vs_first': {r['arm']: r['speedup_vs_first'] for r in records},
          'jax': jax.__version__, 'device': jax.devices()[0].device_kind}


def emit_jsonl(rec: dict, filename: str) -> None:
  """Prints `rec` as one JSON line and, with $OUT set, appends it to $OUT/`filename`."""
  line = json.dumps(rec)
  print(line, flush=True)
  if os.environ.get('OUT'):
    with open(os.path.join(os.environ['OUT'], filename), 'a') as f:
      f.write(line + '\n')


def peak_memory() -> dict:
  """{'peak_mem_gb': ...} of the first device, where the backend reports it."""
  try:
    stats = jax.devices()[0].memory_stats() or {}
    return {'peak_mem_gb': stats.get('peak_bytes_in_use', 0) / 2 ** 30}
  except Exception:
    return {}


def best_time(call, iters: int, rounds: int):
  """Seconds per call of `call(i)` (asynchronous dispatches, blocked on at the end of a window),
  the best of `rounds` windows of `iters` calls after one warm-up call, and the last output."""
  out = jax.block_until_ready(call(0))
  best = float('inf')
  for _ in range(rounds):
    t0 = time.perf_counter()
    for i in range(iters):
      out = call(i)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t0) / iters)
  return best, out
