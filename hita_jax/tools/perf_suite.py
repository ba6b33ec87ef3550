"""One benchmark command for hita_jax against the official PyTorch code on the same machine.

    python -m hita_jax.tools.perf_suite run ours     --out DIR          # our real tasks
    python -m hita_jax.tools.perf_suite run official --out DIR --official CHECKOUT --lpips-lin vgg.pth
    python -m hita_jax.tools.perf_suite report DIR [--write docs/PERFORMANCE.md]

`run` is split into parts that each fit one 10-minute device call (`launch/perf_suite_gpu.sh`
runs them back to back on one lease); every result is one JSON line in DIR/suite.jsonl. `report`
pairs each workload with the best official variant measured in the same DIR, prints one table of
ratios against the issue's targets and, with --write, regenerates the generated section of
docs/PERFORMANCE.md from the JSON (no hand-copied numbers).

Ours is measured through what users run: `python -m hita_jax.main` with the shipped configs (AR
training on synthetic codes, the trainer's own metrics.jsonl throughput), the jitted sampler of the
`sample` task, and the tokenizer trainer's jitted step.

A missing or unreadable input, a bad `--only` item or `--config-arg` prints one line `error: ...`
(exit status 2); `--verbosity=1` shows the traceback.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time

from hita_jax import cli
from hita_jax.errors import MissingPathError, UserError

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
BEGIN, END = '<!-- perf_suite:begin -->', '<!-- perf_suite:end -->'

# (size, batch) of the AR trainer runs and the sampler curve; the largest batches are what fit.
OURS_TRAIN = [('B', 64), ('L', 64), ('XL', 32), ('B', 256), ('L', 128), ('XL', 64)]
OURS_SAMPLE = [('B', 64), ('B', 256), ('B', 512), ('XL', 64), ('XL', 256)]
OURS_TOK = [16]
OFFICIAL = ['ar_compiled:GPT-B:64', 'ar_compiled:GPT-L:64', 'ar_compiled:GPT-XL:32',
            'sample_compiled:GPT-B:64', 'sample:GPT-XL:64', 'tok:16', 'sample_compiled:GPT-B:256',
            'sample_compiled:GPT-XL:64', 'ar:GPT-B:64']

TARGETS = {  # workload kind -> (min ratio vs best official, min MFU by size, extra)
    'ar_train': {'ratio': 1.3, 'mfu': {'B': 0.50, 'L': 0.55, 'XL': 0.55}},
    'sample': {'ratio': {'B': 3.0, 'XL': 2.0}, 'eager_ratio': {'XL': 10.0}},
    'tok_train': {'eager_ratio': 3.0, 'compile_s': 60.0},
}


def _emit(out_dir: str, rec: dict):
  rec['time'] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
  line = json.dumps(rec)
  print(line, flush=True)
  with open(os.path.join(out_dir, 'suite.jsonl'), 'a') as f:
    f.write(line + '\n')


def _sh(cmd: list[str], timeout: float, env=None) -> tuple[int, str]:
  try:
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    return r.returncode, r.stdout + r.stderr
  except subprocess.TimeoutExpired as e:
    return 124, f'timed out after {timeout} s: {(e.stdout or b"")[-2000:]!r}'


def _env() -> dict:
  """Versions and device of this machine, for records whose run (a `main` subprocess) reports none
  (a lease that measured only `ar_train` rows otherwise has no environment line)."""
  import importlib.metadata
  import platform
  env = {'python': platform.python_version()}
  for name in ('jax', 'flax', 'optax'):
    try:
      env[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  try:
    env['device'] = subprocess.run(['nvidia-smi', '--query-gpu=name', '--format=csv,noheader'],
                                   capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
  except (OSError, IndexError, subprocess.SubprocessError):
    pass
  return env


def ours_train(out_dir, size, batch, steps=40, timeout=240, config_arg='', overrides=()):
  """`python -m hita_jax.main --config=configs/hita_<size>.py` on synthetic codes; steady-state
  images/s and MFU from the trainer's metrics.jsonl (the first logging period holds the compile).
  `overrides`: KEY=VALUE config changes passed to `main` as --config.KEY=VALUE (kept in the record,
  and the report marks the row: it is not the shipped config)."""
  work = os.path.join('/tmp', f'perf_suite_{size}_{batch}_{os.getpid()}')
  cmd = [sys.executable, '-m', 'hita_jax.main', f'--config=configs/hita_{size.lower()}.py' + (f':{config_arg}' if config_arg else ''),
         f'--workdir={work}', '--config.train_ar.codes_dir=synthetic',
         f'--config.train_ar.num_steps={steps}', f'--config.train_ar.global_batch_size={batch}',
         '--config.train_ar.log_every=10', '--config.train_ar.sample_every=0',
         '--config.train_ar.ckpt_every=1000000'] + [f'--config.{x}' for x in overrides]
  t0 = time.time()
  rc, log = _sh(cmd, timeout)
  rec = {'side': 'ours', 'kind': 'ar_train', 'model': size, 'batch': batch, 'command': ' '.join(cmd[1:]),
         'wall_s': time.time() - t0, **_env()}
  if overrides:
    rec['set'] = list(overrides)
  path = os.path.join(work, 'metrics.jsonl')
  lines = [json.loads(x) for x in open(path)] if os.path.exists(path) else []
  steady = [x for x in lines if 'images_per_s' in x][1:]
  if rc or not steady:
    rec['error'] = log[-1500:]
  if steady:
    rec['images_s'] = sorted(x['images_per_s'] for x in steady)[len(steady) // 2]
    rec['mfu'] = sorted(x.get('mfu', float('nan')) for x in steady)[len(steady) // 2]
    rec['loss'] = steady[-1].get('loss')
  subprocess.run(['rm', '-rf', work])
  _emit(out_dir, rec)


def ours_bench(out_dir, kind, model, args, timeout=300):
  cmd = [sys.executable, '-m', 'hita_jax.tools.bench'] + args
  rc, log = _sh(cmd, timeout)
  js = [json.loads(x) for x in log.splitlines() if x.startswith('{"bench"')]
  rec = {'side': 'ours', 'kind': kind, 'model': model, 'command': ' '.join(cmd[1:])}
  if rc or not js:
    rec['error'] = log[-1500:]
  else:
    rec.update(js[-1])
  _emit(out_dir, rec)


def parse_only(only) -> list[tuple[str, str, int]]:
  """`--only` KIND:SIZE:BATCH items -> jobs; a malformed item is a UserError naming it."""
  jobs = []
  for item in only:
    parts = item.split(':')
    if len(parts) != 3 or parts[0] not in TARGETS or not parts[2].isdigit():
      raise UserError(f'--only {item}: expected KIND:SIZE:BATCH with KIND one of {sorted(TARGETS)} '
                      'and an integer BATCH, e.g. --only ar_train:B:64')
    jobs.append((parts[0], parts[1], int(parts[2])))
  return jobs


def check_config_arg(config_arg: str, sizes, overrides=()) -> None:
  """The AR configs the jobs run load with `config_arg` and take the `--set` overrides (else a
  UserError naming --config-arg, --set or the size), before any run starts."""
  from hita_jax import config_lib
  from hita_jax.tools.ab import apply_overrides
  for size in sorted(set(sizes)):
    path = os.path.join(ROOT, 'configs', f'hita_{size.lower()}.py')
    if not os.path.exists(path):
      raise MissingPathError(f'no AR config for size {size!r}: {path} does not exist (fix the SIZE '
                             'of --only KIND:SIZE:BATCH)')
    try:
      config = config_lib.load_config(path + (f':{config_arg}' if config_arg else ''))
    except UserError as e:
      raise UserError(f'--config-arg {config_arg!r}: {cli.message(e)}') from e
    apply_overrides(config, list(overrides))


def run_ours(out_dir, only=None, steps=40, config_arg='', overrides=()):
  jobs = ([('ar_train', s, b) for s, b in OURS_TRAIN] + [('sample', s, b) for s, b in OURS_SAMPLE]
          + [('tok_train', 'V', b) for b in OURS_TOK])
  if only:  # KIND:SIZE:BATCH items, any batch
    jobs = parse_only(only)
  check_config_arg(config_arg, [s for k, s, _ in jobs if k == 'ar_train'], overrides)
  for kind, size, batch in jobs:
    if kind == 'ar_train':
      ours_train(out_dir, size, batch, steps=steps, config_arg=config_arg, overrides=overrides)
    elif kind == 'sample':
      ours_bench(out_dir, 'sample', size, ['sample', '--size', size, '--batch', str(batch), '--cfg', '1.5'])
    else:
      ours_bench(out_dir, 'tok_train', 'Hita-V', ['tok_trainer', '--batch', str(batch)], timeout=420)


def run_official(out_dir, checkout, lpips_lin, specs=None, timeout=560):
  """The official code through launch/official/official_bench.py, one process for all specs."""
  specs = specs or OFFICIAL
  script = os.path.join(ROOT, 'launch', 'official', 'official_bench.py')
  env = {'OFFICIAL_HITA': checkout, 'LPIPS_LIN': lpips_lin, 'OUT': out_dir}
  rc, log = _sh([sys.executable, script] + list(specs), timeout, env)
  path = os.path.join(out_dir, 'bench_official.json')
  res = json.load(open(path)) if os.path.exists(path) else {}
  for key, val in res.items():
    rec = _official_record(key)
    if rec is None or not isinstance(val, dict):
      continue
    rec['torch'] = res.get('torch')
    rec.update(val)
    if 'mfu_vs_989' in val:
      rec['mfu'] = val['mfu_vs_989']
    _emit(out_dir, rec)
  # a spec the process never reached or finished (a timeout, a crash) is a failed row of its own,
  # so the report says 'failed' rather than leaving the column empty as if it had not been asked
  for spec in specs:
    key = official_key(spec)
    rec = _official_record(key) if key and key not in res else None
    if rec is not None:
      _emit(out_dir, {**rec, 'error': f'no result (official process rc {rc}): {log[-300:]}'})
  if rc:
    _emit(out_dir, {'side': 'official', 'kind': 'log', 'error': log[-2000:], 'rc': rc})


def _official_record(key: str) -> dict | None:
  """The suite record fields of a bench_official.json key such as 'ar_train_GPT-B_bs64_compiled'
  (None for keys that are no workload, e.g. 'torch')."""
  m = re.match(r'(ar_train|sample|tok_train)_(GPT-[A-Z0-9]+|HitaV)_bs(\d+)', key)
  if not m:
    return None
  model = m.group(2).replace('GPT-', '')
  return {'side': 'official', 'kind': m.group(1), 'model': 'Hita-V' if model == 'HitaV' else model,
          'batch': int(m.group(3)), 'variant': 'compiled' if key.endswith('_compiled') else 'eager',
          'key': key}


def official_key(spec: str) -> str | None:
  """The bench_official.json key that launch/official/official_bench.py writes for a
  MODE:MODEL:BATCH (or tok:BATCH) spec; None for its named groups ('ar', 'sample', ...)."""
  mode, *rest = spec.split(':')
  compiled = '_compiled' if mode.endswith('_compiled') else ''
  base = mode[:-len(compiled)] if compiled else mode
  if base == 'ar' and len(rest) == 2:
    return f'ar_train_{rest[0]}_bs{rest[1]}{compiled}'
  if base == 'sample' and len(rest) == 2:
    return f'sample_{rest[0]}_bs{rest[1]}_cfg1.5{compiled}'
  if base == 'tok' and len(rest) == 1:
    return f'tok_train_HitaV_bs{rest[0]}{compiled}'
  return None


# -- report --------------------------------------------------------------------------------------
def load(dirs) -> list[dict]:
  """The records of suite.jsonl files (or folders holding one); a missing or unreadable file is a
  UserError naming it."""
  fix = '(fix the report arguments: suite.jsonl files or folders holding one)'
  recs = []
  for d in dirs:
    path = os.path.join(d, 'suite.jsonl') if os.path.isdir(d) else d
    if not os.path.isfile(path):
      raise MissingPathError(f'{path} not found {fix}')
    try:
      with open(path) as f:
        lines = f.readlines()
    except UnicodeDecodeError as e:
      raise UserError(f'{path} is not a text file of JSON lines ({e}) {fix}') from e
    for n, x in enumerate(lines, 1):
      if not x.strip():
        continue
      try:
        rec = json.loads(x)
      except ValueError as e:
        raise UserError(f'{path}:{n} is not a JSON line ({e}) {fix}') from e
      if not isinstance(rec, dict):
        raise UserError(f'{path}:{n} holds no JSON object {fix}')
      recs.append(rec)
  return recs


def table(recs: list[dict]) -> tuple[list[dict], dict]:
  """One row per workload of ours: best official eager / compiled at the same model and batch."""
  off = {}
  for r in recs:
    if r.get('side') == 'official' and r.get('kind') in TARGETS and ('images_s' in r or 'error' in r):
      key = (r['kind'], r['model'], r['batch'], r['variant'])
      if 'images_s' in r or 'images_s' not in off.get(key, {}):  # a result beats a failure
        off[key] = r
  rows = []
  for r in recs:
    if r.get('side') != 'ours' or r.get('kind') not in TARGETS:
      continue
    model = r.get('model') or r.get('size')
    key = (r['kind'], model, r.get('batch'))
    eager, comp = off.get(key + ('eager',)), off.get(key + ('compiled',))
    best = max([x for x in (eager, comp) if x and 'images_s' in x], key=lambda x: x['images_s'],
               default=None)
    row = {'kind': r['kind'], 'model': model, 'batch': r.get('batch'), 'ours': r.get('images_s'),
           'ours_mfu': r.get('mfu'), 'eager': eager and eager.get('images_s'),
           'eager_error': eager and eager.get('error'),
           'compiled': comp and comp.get('images_s'), 'compiled_error': comp and comp.get('error'),
           'ratio_best': (r['images_s'] / best['images_s']) if best and r.get('images_s') else None,
           'error': r.get('error'), 'compile_s': r.get('compile_s'), 'peak_mem_gb': r.get('peak_mem_gb'),
           'set': r.get('set')}
    row['target'], row['met'] = _target(row)
    rows.append(row)
  env = next((r for r in recs if r.get('side') == 'ours' and r.get('jax')), {})
  torch_v = next((r.get('torch') for r in recs if r.get('side') == 'official' and r.get('torch')), None)
  return rows, {'jax': env.get('jax'), 'flax': env.get('flax'), 'optax': env.get('optax'),
                'device': env.get('device'), 'python': env.get('python'), 'torch': torch_v,
                'date': min((r['time'][:10] for r in recs if 'time' in r), default=None)}


def _target(row):
  t = TARGETS[row['kind']]
  if row['ours'] is None:
    return 'run failed', False
  if row['kind'] == 'ar_train':
    mfu = t['mfu'].get(row['model'])
    ok = row['ratio_best'] is not None and row['ratio_best'] >= t['ratio'] and (row['ours_mfu'] or 0) >= mfu
    return f"≥ {t['ratio']}× best, MFU ≥ {mfu:.0%}", ok
  if row['kind'] == 'sample':
    need = t['ratio'].get(row['model'])
    if need is None or row['batch'] != 64:
      return 'curve point', None
    ok = row['compiled'] is not None and row['ours'] >= need * row['compiled']
    eager_need = t['eager_ratio'].get(row['model'])
    if eager_need:
      ok = ok and row['eager'] is not None and row['ours'] >= eager_need * row['eager']
      return f'≥ {need}× compiled, ≥ {eager_need}× eager', ok
    return f'≥ {need}× compiled', ok
  ok = (row['eager'] is not None and row['ours'] >= t['eager_ratio'] * row['eager']
        and (row['compile_s'] or 1e9) <= t['compile_s'])
  return f"≥ {t['eager_ratio']}× eager, compile ≤ {t['compile_s']:.0f} s", ok


def _f(x, fmt='{:.1f}'):
  return '—' if x is None else fmt.format(x)


def markdown(rows, env, command: str, source: str = 'suite.jsonl') -> str:
  out = [f"Measured {env['date']} on one {env['device']} (one device lease, consecutive calls), "
         f"jax {env['jax']}, flax {env['flax']}, optax {env['optax']}, Python {env['python']}; "
         f"official code on torch {env['torch'] or '(not run in this lease)'}. Generated by "
         f"`python -m hita_jax.tools.perf_suite report` from `{source}`; command: `{command}`.", '',
         '| workload | batch | hita_jax img/s | MFU | official eager | official compiled | '
         'ours ÷ best official | target | met |', '|---|---|---|---|---|---|---|---|---|']
  names = {'ar_train': 'AR train GPT-{}', 'sample': 'sampling GPT-{}, CFG 1.5', 'tok_train': 'tokenizer train {} @336'}
  for r in rows:
    ours = _f(r['ours']) if r['ours'] is not None else 'failed'
    comp = _f(r['compiled']) if r['compiled'] is not None else ('failed' if r['compiled_error'] else '—')
    eager = _f(r['eager']) if r['eager'] is not None else ('failed' if r.get('eager_error') else '—')
    extra = f" (compile {r['compile_s']:.0f} s)" if r.get('compile_s') else ''
    met = {True: 'yes', False: '**no**', None: '—'}[r['met']]
    changed = f" (not shipped: {', '.join(r['set'])})" if r.get('set') else ''
    out.append(f"| {names[r['kind']].format(r['model'])}{changed} | {r['batch']} | {ours}{extra} | "
               f"{_f(r['ours_mfu'], '{:.1%}')} | {eager} | {comp} | "
               f"{_f(r['ratio_best'], '{:.2f}×')} | {r['target']} | {met} |")
  return '\n'.join(out)


def write_doc(doc: str, text: str):
  body = open(doc).read() if os.path.exists(doc) else '# Performance\n\n' + BEGIN + '\n' + END + '\n'
  if BEGIN not in body or END not in body:
    raise UserError(f'{doc} has no {BEGIN} ... {END} section to regenerate (fix --write, or add the '
                    'two markers where the table goes)')
  head, rest = body.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  open(doc, 'w').write(head + BEGIN + '\n' + text + '\n' + END + tail)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=cli.VERBOSITY_HELP)
  sub = p.add_subparsers(dest='cmd', required=True)
  r = sub.add_parser('run')
  r.add_argument('part', choices=['ours', 'official'])
  r.add_argument('--out', default=os.environ.get('OUT', '/tmp'))
  r.add_argument('--only', nargs='*', help='ours: KIND:SIZE:BATCH items; official: MODE:MODEL:BATCH specs')
  r.add_argument('--steps', type=int, default=40, help='ours: AR training steps per run')
  r.add_argument('--config-arg', default='', help="ours: config argument, e.g. 'tiny' for a CPU smoke run")
  r.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='ours: AR config change passed to main (e.g. gpt.attn_impl=pallas; repeatable); '
                      'the report marks such rows as not the shipped config')
  r.add_argument('--official', default=os.environ.get('OFFICIAL_HITA'), help='CVMI-Lab/Hita checkout')
  r.add_argument('--lpips-lin', default=os.environ.get('LPIPS_LIN'), help="LPIPS 'vgg.pth' (7 KB)")
  r.add_argument('--timeout', type=float, default=560.0,
                 help='official: seconds for the one process that runs every spec (torch.compile of '
                      'GPT-B and GPT-L together took ~560 s on an H100; give GPT-XL a call of its own)')
  g = sub.add_parser('report')
  g.add_argument('inputs', nargs='+', help='suite.jsonl files or folders holding one')
  g.add_argument('--write', default=None, help='regenerate this markdown file (docs/PERFORMANCE.md)')
  g.add_argument('--command', default='bash launch/perf_suite_gpu.sh')
  a = p.parse_args(argv)
  if a.cmd == 'run':
    os.makedirs(a.out, exist_ok=True)
    if a.part == 'ours':
      run_ours(a.out, a.only, a.steps, a.config_arg, a.set)
    else:
      if not a.official or not os.path.isdir(a.official):
        raise MissingPathError(f'run official: no CVMI-Lab/Hita checkout at {a.official!r} (fix '
                               '--official=<checkout> or $OFFICIAL_HITA)')
      if not a.lpips_lin or not os.path.exists(a.lpips_lin):
        raise MissingPathError(f"run official: no LPIPS 'vgg.pth' at {a.lpips_lin!r} (fix "
                               '--lpips-lin=<lpips/weights/v0.1/vgg.pth> or $LPIPS_LIN)')
      run_official(a.out, a.official, a.lpips_lin, a.only, timeout=a.timeout)
    return
  parts = []
  for path in a.inputs:  # one table per lease: ratios are only meaningful inside one
    rows, env = table(load([path]))
    parts.append(f'### {os.path.basename(path.rstrip("/"))}\n\n' + markdown(rows, env, a.command, path))
  text = '\n\n'.join(parts)
  print(text)
  if a.write:
    write_doc(a.write, text)


if __name__ == '__main__':
  cli.run(main)
