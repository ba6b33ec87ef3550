"""Which kind of op an XLA option set breaks: small programs of the op kinds the training steps are
made of (cuDNN convolutions, cuBLAS products, cuDNN and XLA attention, scatter, the VQ lookup,
GroupNorm), each compiled and run with XLA's defaults and with each option set, and checked.

    python -m hita_jax.tools.xla_option_probe --options exnd:xla_gpu_exclude_nondeterministic_ops=true

Why: some options cut the tokenizer step's compile but the compiled step fails at its first call
(`xla_gpu_deterministic_ops` and `xla_gpu_exclude_nondeterministic_ops` on jax 0.11.2, both with
`IndexError: raw_hash_map<>::at`: docs/PERFORMANCE.md, sessions 28 and 32). Compiling the whole
step per guess costs minutes of device time; these programs compile in seconds and name the op
kind, so the step can avoid it (e.g. `tokenizer.attn_impl=xla`) and keep the option.

Each (probe, set) runs in its own process by default: the set's compile is that process's first
of the program, so no autotuning result of another compile is reused (XLA keeps them in memory
per process; the persistent compilation cache, which would also bring XLA's autotune cache, is
off), and a set that aborts the process is reported, not fatal. The parent stays off the GPU.
`--in-process` runs everything in this process (quicker; probes sharing an op, e.g. the two 3x3
convolutions' backward, then share its autotuning). The empty set `base` runs first for every
probe: an op kind is charged to a set only where `base` is ok and the set is not.

One JSON line per (probe, set), then a summary line (`broken_by`: set -> probes it breaks); with
$OUT set they are also appended to $OUT/xla_option_probe.jsonl. A record's `status`:
  ok        compiled and ran; every output finite and within --rtol of the same function in fp32
            on the CPU (relative to the output's largest magnitude)
  mismatch  ran, but an output differs by more than --rtol (or is not finite where the CPU's is)
  failed    `stage` (compile: trace, lower and XLA compile; run; reference) raised: `error`
  crashed   its process died, or ran past --timeout, without a record (`rc`, the fatal line, the
            tail of its stderr)
  skipped   the op needs another backend (cuDNN attention off GPU)
  not_run   --deadline passed first
On the CPU backend `conv3x3_bias` mismatches under any set: XLA's CPU compiler rounds a bf16
reduction after every add, so the bias gradient's long sum stalls (docs/PERFORMANCE.md, session
30); the GPU keeps such sums in fp32.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from hita_jax import cli
from hita_jax.errors import UserError
from hita_jax.models.layers import padded_dot_product_attention
from hita_jax.tools.ab import emit_jsonl, parse_xla_option_set, xla_rejects

BF16 = jnp.bfloat16
BASE = 'base:'


def _grads_of_square(fn, *args):
  """value and gradients of mean(fn(*args)^2) in fp32: the forward and every backward op."""
  def loss(*a):
    y = fn(*a).astype(jnp.float32)
    return jnp.mean(y * y)
  return jax.value_and_grad(loss, argnums=tuple(range(len(args))))(*args)


def _conv(k, stride=1, bias=False):
  """A convolution's forward and both backward ops (input and filter gradients), NHWC as the CNN
  runs; with `bias` a per-channel add XLA may fold into cuDNN's fused conv-bias kernel."""
  def case(key):
    kx, kw, kb = jax.random.split(key, 3)
    x = jax.random.normal(kx, (4, 42, 42, 128), BF16)
    w = (jax.random.normal(kw, (k, k, 128, 128)) / (k * np.sqrt(128))).astype(BF16)
    b = jax.random.normal(kb, (128,), BF16)

    def conv(x, w, b):
      y = jax.lax.conv_general_dilated(x, w, (stride, stride), 'SAME',
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      return y + b if bias else y
    fn = lambda x, w, b: _grads_of_square(conv, x, w, b)
    return fn, (x, w, b), fn
  return case


def _gemm(key):
  ka, kb = jax.random.split(key)
  a = jax.random.normal(ka, (8, 577, 1024), BF16)
  b = (jax.random.normal(kb, (1024, 1024)) / 32).astype(BF16)
  fn = lambda a, b: _grads_of_square(lambda a, b: a @ b, a, b)
  return fn, (a, b), fn


def _attention(impl):
  """The tokenizer's unmasked attention as it calls it (`layers.padded_dot_product_attention`:
  577 rows padded to cuDNN's block, padded keys masked by length), forward and backward."""
  def case(key):
    q, k, v = (jax.random.normal(kk, (2, 577, 16, 64), BF16) for kk in jax.random.split(key, 3))
    grads = lambda impl: lambda q, k, v: _grads_of_square(
        lambda q, k, v: padded_dot_product_attention(q, k, v, implementation=impl), q, k, v)
    return grads(impl), (q, k, v), grads('xla')  # the CPU reference has no cuDNN
  return case


def _scatter_add(key):
  ki, kv = jax.random.split(key)
  idx = jax.random.randint(ki, (8192,), 0, 1024)              # repeated indices: order matters
  vals = jax.random.normal(kv, (8192, 64), jnp.float32)
  fn = lambda idx, vals: jnp.zeros((1024, 64), jnp.float32).at[idx].add(vals)
  return fn, (idx, vals), fn


def _nearest_code(key):
  """A VQ lookup as the quantizer does it (fp32 distances at full precision, argmin, gather) and
  the gradient of the codebook loss (a scatter-add). Each vector sits next to one code, so the
  nearest code does not depend on the summation order."""
  kj, kn, kc = jax.random.split(key, 3)
  codebook = jax.random.normal(kc, (16384, 8), jnp.float32)
  z = codebook[jax.random.randint(kj, (16 * 441,), 0, 16384)] + 0.01 * jax.random.normal(kn, (16 * 441, 8))

  def fn(z, codebook):
    d = (jnp.sum(z * z, 1, keepdims=True) + jnp.sum(codebook * codebook, 1)
         - 2 * jnp.einsum('nd,kd->nk', z, codebook, precision='highest'))
    idx = jnp.argmin(d, axis=1)
    return idx, jax.grad(lambda c: jnp.mean((z - c[idx]) ** 2))(codebook)
  return fn, (z, codebook), fn


def _group_norm(key):
  x = jax.random.normal(key, (4, 42, 42, 256), BF16)

  def norm(x):
    g = x.astype(jnp.float32).reshape(4, 42, 42, 32, 8)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=(1, 2, 4), keepdims=True)
    y = ((g - mean) * jax.lax.rsqrt(var + 1e-6)).reshape(x.shape)
    return (y * jax.nn.sigmoid(y)).astype(x.dtype)
  fn = lambda x: _grads_of_square(norm, x)
  return fn, (x,), fn


# name -> (case(key) -> (fn, args, fn for the CPU reference), backends it runs on or None for all)
PROBES = {
    'conv3x3': (_conv(3), None),
    'conv3x3_stride2': (_conv(3, stride=2), None),
    'conv3x3_bias': (_conv(3, bias=True), None),
    'conv1x1': (_conv(1), None),
    'gemm': (_gemm, None),
    'attn_cudnn': (_attention('cudnn'), ('gpu', 'cuda')),
    'attn_xla': (_attention('xla'), None),
    'scatter_add': (_scatter_add, None),
    'nearest_code': (_nearest_code, None),
    'group_norm': (_group_norm, None),
}


def _max_rel_diff(got, want) -> float:
  """Largest |got - want| over the leaves, each relative to its leaf's largest |want|; integer
  leaves (argmin indices) count the fraction of entries that differ. A non-finite value where the
  reference is finite, or leaves of other shapes, is infinitely far."""
  got, want = jax.tree.leaves(got), jax.tree.leaves(want)
  if len(got) != len(want):
    return float('inf')
  worst = 0.0
  for g, w in zip(got, want):
    g, w = np.asarray(g), np.asarray(w)
    if g.shape != w.shape:
      return float('inf')
    if np.issubdtype(w.dtype, np.integer):
      worst = max(worst, float(np.mean(g != w)))
      continue
    g, w = g.astype(np.float64), w.astype(np.float64)
    if not np.all(np.isfinite(g) | ~np.isfinite(w)):
      return float('inf')
    worst = max(worst, float(np.nanmax(np.abs(g - w), initial=0.0) / (np.max(np.abs(w), initial=0.0) + 1e-30)))
  return worst


def _reference(fn, args):
  """`fn` in fp32 on the CPU (bf16 inputs widened exactly): the values every program is checked
  against, computed apart from the GPU's compiles and their autotuning caches."""
  cpu = jax.devices('cpu')[0]
  wide = [np.asarray(a, np.float32) if jnp.issubdtype(a.dtype, jnp.floating) else np.asarray(a)
          for a in args]
  with jax.default_device(cpu):
    return jax.device_get(jax.jit(fn)(*[jax.device_put(a, cpu) for a in wide]))


def _error_text(e: BaseException) -> str:
  """'Type: first line', and ' ... last line' where the message is longer (a runtime error's
  last line is usually the failing op's own message)."""
  lines = [x.strip() for x in str(e).splitlines() if x.strip()]
  text = f'{type(e).__name__}: {lines[0] if lines else ""}'
  return (text + (f' ... {lines[-1]}' if len(lines) > 1 else ''))[:600]


def probe(name: str, opts: dict, rtol: float) -> dict:
  """One probe with one option set in this process -> its record (see the module docstring)."""
  jax.config.update('jax_enable_compilation_cache', False)  # cold: no executable, no autotune cache
  case, backends = PROBES[name]
  rec = {'probe': name, 'backend': jax.default_backend(), 'jax': jax.__version__,
         'device': jax.devices()[0].device_kind}
  if backends and jax.default_backend() not in backends:
    return {**rec, 'status': 'skipped', 'reason': f'needs backend {backends[0]}'}
  fn, args, ref_fn = case(jax.random.key(0))
  stage = 'compile'
  try:
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile(compiler_options=opts or None)
    rec['compile_s'] = time.perf_counter() - t0  # trace, lower and compile
    stage = 'run'
    got = jax.device_get(compiled(*args))
    stage = 'reference'
    want = _reference(ref_fn, args)
  except Exception as e:  # what the option set breaks: report it, go on with the next probe
    return {**rec, 'status': 'failed', 'stage': stage, 'error': _error_text(e)}
  diff = _max_rel_diff(got, want)
  return {**rec, 'status': 'ok' if diff <= rtol else 'mismatch', 'max_rel_diff': diff}


def _child_command(name: str, options_text: str, rtol: float) -> list[str]:
  return [sys.executable, '-m', 'hita_jax.tools.xla_option_probe', '--child', name,
          '--options', options_text, '--rtol', str(rtol)]


def _text(out) -> str:
  return out.decode(errors='replace') if isinstance(out, bytes) else (out or '')


def _last_record(stdout: str) -> dict | None:
  for line in reversed(stdout.splitlines()):
    if line.startswith('{'):
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        return None
  return None


def _fatal_line(stderr: str) -> str | None:
  """The first line of an abort's stderr that says why (glog's F lines, CHECK failures)."""
  for line in stderr.splitlines():
    if re.match(r'^F\d{4}|.*(Check failed|Fatal Python error|Segmentation fault)', line):
      return line[:400]
  return None


def probe_in_child(name: str, options_text: str, rtol: float, timeout: float) -> dict:
  """One probe with one set in its own process: its record (with the process's exit status), or
  'crashed' when the process died, or ran past `timeout`, without writing one."""
  env = {k: v for k, v in os.environ.items() if k not in ('OUT', 'JAX_COMPILATION_CACHE_DIR')}
  try:
    p = subprocess.run(_child_command(name, options_text, rtol), capture_output=True, text=True,
                       timeout=timeout, env=env)
    stdout, stderr, rc, why = p.stdout, p.stderr, p.returncode, None
  except subprocess.TimeoutExpired as e:
    stdout, stderr, rc, why = _text(e.stdout), _text(e.stderr), None, f'no exit within {timeout:.0f} s'
  rec = _last_record(stdout)
  if rec is not None:
    return {**rec, 'rc': rc}
  return {'probe': name, 'status': 'crashed', 'rc': rc, 'error': why or _fatal_line(stderr),
          'stderr_tail': stderr[-600:]}


def check_option_set(options_text: str) -> tuple[str, dict]:
  """The parsed set, after XLA accepted it on a one-op CPU program (the parent never starts the
  GPU, so every child has the whole device); a rejected or malformed set is a UserError."""
  try:
    name, opts = parse_xla_option_set(options_text)
  except ValueError as e:
    raise UserError(str(e)) from None
  error = xla_rejects(opts, jax.devices('cpu')[0])
  if error:
    raise UserError(f'--options {options_text!r}: this XLA rejects the set ({error}); check the '
                    "option names against `strings libjax_common.so | grep '^xla_gpu_'` of the "
                    'installed jaxlib')
  return name, opts


def broken_by(records: list[dict]) -> dict[str, list[str]]:
  """set name -> the probes it breaks: not ok under the set, ok under `base`."""
  base_ok = {r['probe'] for r in records if r['options'] == 'base' and r['status'] == 'ok'}
  out = {}
  for r in records:
    if r['options'] != 'base':
      out.setdefault(r['options'], [])
      if r['probe'] in base_ok and r['status'] not in ('ok', 'skipped', 'not_run'):
        out[r['options']].append(r['probe'])
  return out


def run(option_texts: list[str], probes: list[str], rtol: float, in_process: bool, timeout: float,
        deadline: float = float('inf')) -> list[dict]:
  """`base` and every set for each probe (the sets checked first); records, then the summary."""
  sets = [(BASE, ('base', {}))] + [(t, check_option_set(t)) for t in option_texts]
  names = [n for _, (n, _) in sets]
  if len(set(names)) != len(names):
    raise UserError(f'--options: set names must differ from each other and from "base", got {names}')
  t_end = time.monotonic() + deadline
  records = []
  for p in probes:
    for text, (name, opts) in sets:
      if time.monotonic() > t_end:
        rec = {'probe': p, 'status': 'not_run'}
      elif in_process:
        rec = probe(p, opts, rtol)
      else:
        rec = probe_in_child(p, text, rtol, timeout)
      rec = {**rec, 'options': name, 'xla': opts}
      emit_jsonl(rec, 'xla_option_probe.jsonl')
      records.append(rec)
  summary = {'xla_option_probe': 'summary', 'broken_by': broken_by(records),
             'status': {f"{r['probe']}/{r['options']}": r['status'] for r in records}}
  emit_jsonl(summary, 'xla_option_probe.jsonl')
  return records


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=cli.VERBOSITY_HELP)
  p.add_argument('--options', nargs='+', required=True,
                 help='NAME:xla_option=value[,...] per set to probe (the empty set "base" always runs)')
  p.add_argument('--probes', nargs='+', default=list(PROBES), choices=list(PROBES), metavar='PROBE',
                 help=f'which (default all): {", ".join(PROBES)}')
  p.add_argument('--rtol', type=float, default=0.05,
                 help="largest output difference from the CPU's fp32 values, relative to the "
                      "output's largest magnitude, still 'ok' (bf16 programs are ~1e-2 off)")
  p.add_argument('--in-process', action='store_true',
                 help='everything in this process (probes sharing an op then share its autotuning)')
  p.add_argument('--timeout', type=float, default=60.0, help='seconds one probe process may take')
  p.add_argument('--deadline', type=float, default=float('inf'),
                 help='seconds for the whole run; what is left is reported not_run (the summary is '
                      'still written, e.g. before a device call ends)')
  p.add_argument('--child', default=None, choices=list(PROBES), help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a.child:  # one probe with one set, its record on stdout for the parent
    (text,) = a.options
    _, opts = parse_xla_option_set(text)
    print(json.dumps(probe(a.child, opts, a.rtol)), flush=True)
    return
  run(a.options, a.probes, a.rtol, a.in_process, a.timeout, a.deadline)


if __name__ == '__main__':
  cli.run(main)
