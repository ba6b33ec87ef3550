"""Which kind of op an XLA option set breaks: small programs of the op kinds the training steps are
made of (cuDNN convolutions, cuBLAS products, cuDNN and XLA attention, scatter, reductions), each
compiled with XLA's defaults and with the option set, run, and compared.

    python -m hita_jax.tools.xla_option_probe --options exnd:xla_gpu_exclude_nondeterministic_ops=true

Why: some options cut the tokenizer step's compile but the compiled step fails at its first call
(`xla_gpu_deterministic_ops` and `xla_gpu_exclude_nondeterministic_ops` on jax 0.11.2, both with
`IndexError: raw_hash_map<>::at`: docs/PERFORMANCE.md, sessions 28 and 32). Compiling the whole
step per guess costs minutes of device time; these programs compile in seconds and name the op
kind, so the step can avoid it (e.g. `tokenizer.attn_impl=xla`) and keep the option.

Each probe runs in its own process by default (an option may abort the process, not only raise),
`--in-process` runs them in this one. One JSON line per probe, then a summary line; with $OUT set
they are also appended to $OUT/xla_option_probe.jsonl. A probe's `status`:
  ok        compiled and ran; every output within --rtol of the same function in fp32 on the CPU
            (relative to the output's largest magnitude)
  mismatch  ran, but an output differs by more than --rtol
  failed    the compile or the run raised (`stage` says which, `error` the first line)
  crashed   its process died without a record (`rc`, the tail of its stderr)
  skipped   the op needs another backend (cuDNN attention off GPU)
On the CPU backend `conv3x3_bias` mismatches under any option set: XLA's CPU compiler rounds a
bf16 reduction after every add, so the bias gradient's long sum stalls (docs/PERFORMANCE.md,
session 30); the GPU keeps such sums in fp32.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from hita_jax import cli
from hita_jax.errors import UserError
from hita_jax.tools.ab import emit_jsonl, parse_xla_option_set

BF16 = jnp.bfloat16


def _grads_of_square(fn, *args):
  """value and gradients of sum(fn(*args)^2) / size in fp32: the forward and both backward ops."""
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
  def case(key):
    q, k, v = (jax.random.normal(kk, (2, 577, 16, 64), BF16) for kk in jax.random.split(key, 3))
    grads = lambda impl: lambda q, k, v: _grads_of_square(
        lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=impl), q, k, v)
    return grads(impl), (q, k, v), grads('xla')  # the CPU reference has no cuDNN
  return case


def _scatter_add(key):
  ki, kv = jax.random.split(key)
  idx = jax.random.randint(ki, (8192,), 0, 1024)              # repeated indices: order matters
  vals = jax.random.normal(kv, (8192, 64), jnp.float32)
  fn = lambda idx, vals: jnp.zeros((1024, 64), jnp.float32).at[idx].add(vals)
  return fn, (idx, vals), fn


def _nearest_code(key):
  """A VQ lookup: squared distances to a codebook, argmin, gather, and the gradient through the
  straight-through estimator's distance term."""
  kz, kc = jax.random.split(key)
  z = jax.random.normal(kz, (16 * 441, 8), jnp.float32)
  codebook = jax.random.normal(kc, (16384, 8), jnp.float32)

  def fn(z, codebook):
    d = (jnp.sum(z * z, 1, keepdims=True) - 2 * z @ codebook.T + jnp.sum(codebook * codebook, 1))
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
  leaves (argmin indices) count the fraction of entries that differ."""
  worst = 0.0
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g), np.asarray(w)
    if np.issubdtype(w.dtype, np.integer):
      worst = max(worst, float(np.mean(g != w)))
      continue
    g, w = g.astype(np.float64), w.astype(np.float64)
    worst = max(worst, float(np.max(np.abs(g - w)) / (np.max(np.abs(w)) + 1e-30)))
  return worst


def _reference(fn, args):
  """`fn` in fp32 on the CPU (bf16 inputs widened exactly): the values every program is checked
  against, computed apart from the GPU's compiles and their autotuning caches."""
  cpu = jax.devices('cpu')[0]
  wide = [np.asarray(a, np.float32) if jnp.issubdtype(a.dtype, jnp.floating) else np.asarray(a)
          for a in args]
  with jax.default_device(cpu):
    return jax.device_get(jax.jit(fn)(*[jax.device_put(a, cpu) for a in wide]))


def probe(name: str, opts: dict, rtol: float) -> dict:
  """One probe in this process -> its record (see the module docstring). The option set's
  compile is the process's first of this program, so no autotuning result of another compile is
  reused (XLA keeps them in memory per process)."""
  case, backends = PROBES[name]
  rec = {'probe': name, 'backend': jax.default_backend()}
  if backends and jax.default_backend() not in backends:
    return {**rec, 'status': 'skipped', 'reason': f'needs backend {backends[0]}'}
  fn, args, ref_fn = case(jax.random.key(0))
  stage = 'compile'
  try:
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile(compiler_options=opts or None)
    rec['compile_s'] = time.perf_counter() - t0
    stage = 'run'
    got = jax.device_get(compiled(*args))
  except Exception as e:  # what the option set breaks: report it, go on with the next probe
    first = str(e).splitlines()[0] if str(e) else ''
    return {**rec, 'status': 'failed', 'stage': stage, 'error': f'{type(e).__name__}: {first}'}
  diff = _max_rel_diff(got, _reference(ref_fn, args))
  return {**rec, 'status': 'ok' if diff <= rtol else 'mismatch', 'max_rel_diff': diff}


def _child_command(name: str, options_text: str, rtol: float) -> list[str]:
  return [sys.executable, '-m', 'hita_jax.tools.xla_option_probe', '--child', name,
          '--options', options_text, '--rtol', str(rtol)]


def probe_in_child(name: str, options_text: str, rtol: float, timeout: float) -> dict:
  """One probe in its own process: its record, or 'crashed' with the exit status and the tail
  of its stderr when the process died (or ran past `timeout`) without writing one."""
  env = {k: v for k, v in os.environ.items() if k != 'OUT'}  # the parent writes the records
  try:
    p = subprocess.run(_child_command(name, options_text, rtol), capture_output=True, text=True,
                       timeout=timeout, env=env)
  except subprocess.TimeoutExpired as e:
    tail = (e.stderr or b'')[-600:]
    return {'probe': name, 'status': 'crashed', 'rc': None, 'error': f'no record within {timeout:.0f} s',
            'stderr_tail': tail.decode(errors='replace') if isinstance(tail, bytes) else tail}
  for line in reversed(p.stdout.splitlines()):
    if line.startswith('{'):
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        break
  return {'probe': name, 'status': 'crashed', 'rc': p.returncode, 'stderr_tail': p.stderr[-600:]}


def check_option_set(options_text: str) -> tuple[str, dict]:
  """The parsed set, after XLA accepted it on a one-op program; a rejected set is a UserError."""
  try:
    name, opts = parse_xla_option_set(options_text)
  except ValueError as e:
    raise UserError(str(e)) from None
  try:
    jax.jit(lambda x: x + 1).lower(jnp.float32(0)).compile(compiler_options=opts or None)
  except Exception as e:
    raise UserError(f'--options {options_text!r}: this XLA rejects the set '
                    f'({str(e).splitlines()[0]}); check the option names against '
                    "`strings libjax_common.so | grep '^xla_gpu_'` of the installed jaxlib") from None
  return name, opts


def run(options_text: str, probes: list[str], rtol: float, in_process: bool, timeout: float) -> list[dict]:
  name, opts = check_option_set(options_text)
  records = []
  for p in probes:
    rec = probe(p, opts, rtol) if in_process else probe_in_child(p, options_text, rtol, timeout)
    rec = {**rec, 'options': name, 'xla': opts, 'jax': jax.__version__,
           'device': jax.devices()[0].device_kind}
    emit_jsonl(rec, 'xla_option_probe.jsonl')
    records.append(rec)
  summary = {'xla_option_probe': 'summary', 'options': name, 'xla': opts,
             'status': {r['probe']: r['status'] for r in records}}
  emit_jsonl(summary, 'xla_option_probe.jsonl')
  return records


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=cli.VERBOSITY_HELP)
  p.add_argument('--options', required=True, help='NAME:xla_option=value[,...], the set to probe')
  p.add_argument('--probes', nargs='*', default=list(PROBES), choices=list(PROBES), metavar='PROBE',
                 help=f'which (default all): {", ".join(PROBES)}')
  p.add_argument('--rtol', type=float, default=0.05,
                 help="largest output difference from the CPU's fp32 values, relative to the "
                      "output's largest magnitude, still 'ok' (bf16 programs are ~1e-2 off)")
  p.add_argument('--in-process', action='store_true', help='every probe in this process')
  p.add_argument('--timeout', type=float, default=180.0, help='seconds a probe process may take')
  p.add_argument('--child', default=None, choices=list(PROBES), help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a.child:  # one probe, its record on stdout for the parent
    _, opts = parse_xla_option_set(a.options)
    print(json.dumps(probe(a.child, opts, a.rtol)), flush=True)
    return
  run(a.options, a.probes, a.rtol, a.in_process, a.timeout)


if __name__ == '__main__':
  cli.run(main)
