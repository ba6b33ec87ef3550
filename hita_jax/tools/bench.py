"""Throughput benchmarks on the current accelerator (results for docs/PERFORMANCE.md).

    python -m hita_jax.tools.bench gpt_train --size B --batch 64 [--attn cudnn] [--remat none]
    python -m hita_jax.tools.bench sample --size B --batch 64 --cfg 1.5
    python -m hita_jax.tools.bench decode_attn --size B --batch 64 [--tune]  (decode kernel vs XLA)
    python -m hita_jax.tools.bench sample --size B --decode-tuning 128,4,3   (kernel launch params)
    python -m hita_jax.tools.bench decode_matmul --size B --batch 64 [--tune]  (fused layer products)
    python -m hita_jax.tools.bench sample --size B --decode-layer pallas [--layer-tuning M,N,K,W,S]
    python -m hita_jax.tools.bench inception --batch 500
    python -m hita_jax.tools.bench tok_trainer --batch 16      (train_tokenizer's step, Hita-V @336)
    python -m hita_jax.tools.bench cnn_train --batch 16        (CNN encoder+decoder: fused GroupNorm, no fold, flax, sum spellings)
    python -m hita_jax.tools.bench gn_sums --batch 16          (the fused GroupNorm alone per resolution and sum spelling)
    python -m hita_jax.tools.bench hbm --batch 64              (read / copy rates; the sampler's bandwidth floor at 64 images)
    python -m hita_jax.tools.bench fanin_compile               (compile time vs a flat optimizer's leaf count and spelling)
    python -m hita_jax.tools.bench parallel_compile --mode seq|threads  (do two programs' compiles overlap from threads?)
    python -m hita_jax.tools.tok_ab --batch 16 --arm base: --arm new:KEY=VALUE,...  (tokenizer switches, alternating)
    ... --profile DIR   also prints the kernels that take the device time (see profile_summary)

Random weights and codes at the official full size (vocab 16384, 128 holistic + 441 patch tokens,
1000 classes). Training: bf16 compute, fp32 params, AdamW(0.9, 0.95, wd 0.05 on >=2-D), clip 1.0,
one jitted step with donated state. Sampling: bf16 weights and KV cache, the jitted sampler.
Each result is printed as one JSON line (and appended to $OUT/bench.jsonl when $OUT is set).
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import flax
import optax
from flax import nnx

from hita_jax import checkpoint, cli, config_lib, pretrained, sharding
from hita_jax.metrics import flops
from hita_jax.metrics.inception_features import InceptionRunner
from hita_jax.models.decode_attention import DECODE_ATTN_IMPLS, KERNEL_IMPLS
from hita_jax.models.decode_matmul import DECODE_LAYER_IMPLS
from hita_jax.models.gpt import GPT, GPT_SIZES, REMAT_POLICIES, GPTConfig
from hita_jax.models.layers import ATTN_IMPLS
from hita_jax.models.rope import apply_rope
from hita_jax.models.sampler import decode_attn_impl_for, generate, lower_generate, resolve_kv_segments
from hita_jax.tasks import train_ar as ar
from hita_jax.tools import profile_summary
from hita_jax.tools.ab import emit_jsonl, peak_memory
from hita_jax.tools.bench_norm import bench_cnn_train, bench_gn_sums


def env_info():
  """Versions and device, and $XLA_FLAGS when set: a record timed under an XLA option (e.g. the
  exhaustive tiling search) must say so."""
  info = {'jax': jax.__version__, 'flax': flax.__version__, 'optax': optax.__version__,
          'device': jax.devices()[0].device_kind, 'n_devices': jax.device_count(),
          'python': platform.python_version()}
  if os.environ.get('XLA_FLAGS'):
    info['xla_flags'] = os.environ['XLA_FLAGS']
  return info


def full_size_config(size: str, **kw) -> GPTConfig:
  return GPTConfig(**GPT_SIZES[size], vocab_size=16384, num_holistic=128, grid=21, num_classes=1000, **kw)


def gpt_train_optimizer():
  return ar.adamw(1e-4, 0.9, 0.95, 0.05, 1.0)  # the train_ar optimizer at the official settings


def random_codes(cfg: GPTConfig, batch: int, seed: int = 0):
  """Random (labels, holistic codes, patch codes) for a training step."""
  r = np.random.RandomState(seed)
  return (jnp.asarray(r.randint(0, cfg.num_classes, batch)),
          jnp.asarray(r.randint(0, cfg.vocab_size, (batch, cfg.num_holistic))),
          jnp.asarray(r.randint(0, cfg.vocab_size, (batch, cfg.num_patches))))


def gpt_train_step(graphdef, tx, codes):
  """(params, opt_state, key) -> (params, opt_state, loss): one AdamW step of the GPT `graphdef`
  on `codes` (unjitted)."""
  labels, q, z = codes

  def step(params, opt_state, key):
    def loss_fn(p):
      lh, lp = nnx.merge(graphdef, p, copy=True).loss(labels, q, z, rng=key)
      return lh + lp
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def bench_gpt_train(size, batch, attn='auto', remat='none', scan=False, warmup=3, iters=10, profile_dir=None,
                    dropout_bits=16, hlo_out=None, qkv_gemms=2, dropout_rng=None):
  cfg = full_size_config(size, dtype='bfloat16', attn_impl=attn, remat=remat, scan_layers=scan,
                         dropout_bits=dropout_bits, qkv_gemms=qkv_gemms,
                         **({'dropout_rng': dropout_rng} if dropout_rng else {}))
  model = GPT(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = gpt_train_optimizer()
  opt_state = tx.init(params)
  step = _jit_donating(gpt_train_step(graphdef, tx, random_codes(cfg, batch)))

  key = jax.random.key(0)
  abstract = checkpoint.abstract_like((params, opt_state, key))  # the arguments are donated below
  t0 = time.perf_counter()
  for i in range(warmup):
    params, opt_state, loss = step(params, opt_state, jax.random.fold_in(key, i))
  float(loss)
  compile_and_warm = time.perf_counter() - t0
  t0 = time.perf_counter()
  for i in range(iters):
    params, opt_state, loss = step(params, opt_state, jax.random.fold_in(key, 100 + i))
  float(loss)
  dt = (time.perf_counter() - t0) / iters
  t = cfg.seq_len
  tok_s = batch * t / dt
  peak = flops.device_peak_flops() or 989e12
  out = dict(bench='gpt_train', size=size, batch=batch, attn=attn, remat=remat, scan=scan,
             dropout_bits=dropout_bits, dropout_rng=cfg.dropout_rng, qkv_gemms=qkv_gemms, step_s=dt,
             images_s=batch / dt,
             tokens_s=tok_s,
             mfu=flops.mfu(tok_s, flops.gpt_train_flops_per_token(cfg, t), peak),
             mfu_causal=flops.mfu(tok_s, flops.gpt_train_flops_per_token(cfg, t, causal=True), peak),
             loss=float(loss), warmup_s=compile_and_warm)
  out.update(peak_memory())
  box = [params, opt_state]

  def once():
    box[0], box[1], l = step(box[0], box[1], key)
    float(l)
  # the optimized module, to name the model line behind each kernel (one more compile, profiling only)
  hlo = functools.cache(lambda: step.lower(*abstract).compile().as_text())  # --hlo and --profile share it
  _write_hlo(hlo_out, hlo)
  _maybe_profile(out, profile_dir, once, hlo=hlo)
  return out


def _maybe_profile(out, profile_dir, once, repeats=3, hlo=None):
  """With a trace directory: the 30 largest kernels and every kernel kind's total (printed, and
  in the JSON line as 'profile' and 'profile_kinds'); with `hlo` (-> the program's optimized HLO
  text) also the time by model source line ('profile_sources')."""
  if profile_dir:
    rows, kinds = profile_summary.profile_by_kind(once, profile_dir, repeats=repeats)
    out['profile'] = rows[:30] + rows[-1:]
    out['profile_kinds'] = kinds
    if hlo is not None:
      out['profile_sources'] = profile_summary.by_source_line(rows, hlo(), top=40)
      print(profile_summary.format_sources(out['profile_sources']), flush=True)


def _write_hlo(path, hlo):
  """The step's optimized HLO text, gzipped, for reading its fusions offline (`--hlo PATH`)."""
  if path:
    import gzip
    with gzip.open(path, 'wt') as f:
      f.write(hlo())


def _jit_donating(fn):
  return jax.jit(fn, donate_argnums=(0, 1))


def bench_sample(size, batch, cfg_scale=1.5, repeats=2, profile_dir=None, kv_segments=None,
                 decode_attn='auto', decode_tuning=None, decode_layer='xla', layer_tuning=None):
  from hita_jax.models import decode_attention as da
  from hita_jax.models import decode_matmul as dm
  again = functools.partial(bench_sample, size, batch, cfg_scale, repeats, profile_dir, kv_segments,
                            decode_attn, decode_layer=decode_layer)
  if decode_tuning:  # traced inside the context: the first call below compiles with it
    with da.tuning(**decode_tuning):
      out = again(layer_tuning=layer_tuning)
    out['decode_tuning'] = decode_tuning
    return out
  if layer_tuning:
    with dm.tuning(**layer_tuning):
      out = again()
    out['layer_tuning'] = layer_tuning
    return out
  cfg = full_size_config(size, dtype='bfloat16', decode_attn_impl=decode_attn,
                         decode_layer_impl=decode_layer)
  model = GPT(cfg, rngs=nnx.Rngs(0))
  model.head[...] = jax.random.normal(jax.random.key(1), model.head.shape) * 0.02  # as the anchor
  model.eval()
  state = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                       nnx.state(model))
  labels = jnp.asarray(np.random.RandomState(0).randint(0, cfg.num_classes, batch))
  impl = decode_attn_impl_for(model, batch, cfg_scale)
  run = lambda k: generate(model, labels, jax.random.key(k), cfg_scale=cfg_scale, state=state,
                           kv_segments=kv_segments).block_until_ready()
  t0 = time.perf_counter()
  run(0)
  first = time.perf_counter() - t0
  times = []
  for i in range(repeats):
    t0 = time.perf_counter()
    run(i + 1)
    times.append(time.perf_counter() - t0)
  dt = float(np.median(times))
  out = dict(bench='sample', size=size, batch=batch, cfg=cfg_scale, tokens=cfg.seq_len, seconds=dt,
             images_s=batch / dt, first_call_s=first,
             kv_segments=resolve_kv_segments(kv_segments, fused_attention=impl in KERNEL_IMPLS),
             decode_attn=impl, decode_layer=decode_layer)
  out.update(peak_memory())
  # one run: an XL run is ~270k kernels, and three of them outlast a 100 s budget to parse; the
  # kernels by source line need the program's optimized HLO (compiled once more, profile only)
  hlo = lambda: lower_generate(model, labels, jax.random.key(9), cfg_scale=cfg_scale, state=state,
                               kv_segments=kv_segments).compile().as_text()
  _maybe_profile(out, profile_dir, lambda: run(9), repeats=1, hlo=hlo)
  return out


# what `bench decode_attn --tune` tries (36 launch-parameter sets)
DECODE_TUNE_GRID = [dict(block_k=bk, num_warps=w, num_stages=st)
                    for bk in (32, 64, 128) for w in (2, 4, 8) for st in (1, 2, 3, 4)]


def _chain_timer(step, carry, repeats, chain=20):
  """Microseconds per call of `step(carry) -> carry`, `chain` calls in one jitted program (each
  call feeds the next, so none is hoisted or merged) launched `repeats` times: kernel time, not
  the host's dispatch of tiny programs."""
  many = jax.jit(lambda c: functools.reduce(lambda c, _: step(c), range(chain), c),
                 donate_argnums=(0,))
  carry = jax.block_until_ready(many(carry))
  t0 = time.perf_counter()
  for _ in range(repeats):
    carry = many(carry)
  jax.block_until_ready(carry)
  return (time.perf_counter() - t0) / (repeats * chain) * 1e6


def bench_decode_attn(size, batch, cfg_scale=1.5, repeats=20, tune=False):
  """The decode step's attention alone at one layer's shape (CFG rows, bf16 cache of the full
  sequence), the fused kernel against the XLA path, at a few valid lengths: microseconds per call
  (20 chained calls per program, so kernel time), GB/s of valid K + V read, and the largest
  difference to an fp32 XLA reference; 'pallas_update' is the sampler's kernel, which also writes
  the step's K / V row into the (donated) caches. `tune`: also every (block_k, num_warps,
  num_stages) of a small grid for the plain kernel, with the best per length and over all."""
  from hita_jax.models import decode_attention as da
  cfg = full_size_config(size)
  rows = 2 * batch if cfg_scale > 1 else batch
  t = -(-cfg.seq_len // 8) * 8
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (rows, cfg.n_head, cfg.head_dim), jnp.bfloat16)
  kc, vc = (jax.random.normal(k, (rows, cfg.n_head, t, cfg.head_dim), jnp.bfloat16) for k in keys[1:])
  kernel = functools.partial(da.decode_attention_pallas, **da._TUNING)  # what the sampler runs
  impls = {'pallas': kernel,
           'xla': lambda *a: da.decode_attention_xla(*a[:3], a[3], kv_len=None)}
  out = dict(bench='decode_attn', size=size, batch=batch, rows=rows, heads=cfg.n_head,
             head_dim=cfg.head_dim, cache=t, lengths={}, tuning=dict(da._TUNING))
  lengths = (cfg.num_holistic, t // 2, cfg.seq_len)
  gb_s = lambda length, us: round(2 * rows * cfg.n_head * length * cfg.head_dim * 2 / (us * 1e-6) / 1e9)

  def time_attend(fn, n):
    # the output (B, H, D) becomes the next call's query
    return _chain_timer(lambda c: (fn(c[0], c[1], c[2], n), c[1], c[2]), (q + 0, kc + 0, vc + 0),
                        repeats)

  for length in lengths:
    n = jnp.int32(length)
    ref = da.decode_attention_xla(*(a.astype(jnp.float32) for a in (q, kc, vc)), length)
    row = {}
    for name, fn in impls.items():
      got = jax.jit(fn)(q, kc, vc, n)
      us = time_attend(fn, n)
      row[name] = dict(us=round(us, 1), gb_s=gb_s(length, us), max_err=float(jnp.max(jnp.abs(
          got.astype(jnp.float32) - ref))))
    # the sampler's kernel: also writes the step's K / V row (caches donated, so updated in place)
    update_kernel = functools.partial(da.decode_attention_update_pallas, **da._TUNING)
    upd = jax.jit(update_kernel)
    want = da.decode_attention_update(*(a.astype(jnp.float32) for a in (q, q, q, kc, vc)), n - 1,
                                      impl='xla')
    got, kc2, vc2 = upd(q, q, q, kc, vc, n - 1)
    err = max(float(jnp.max(jnp.abs(got.astype(jnp.float32) - want[0]))),
              float(jnp.max(jnp.abs(kc2.astype(jnp.float32) - want[1]))),
              float(jnp.max(jnp.abs(vc2.astype(jnp.float32) - want[2]))))
    del kc2, vc2
    us = _chain_timer(lambda c: update_kernel(c[0], c[0], c[0], c[1], c[2], n - 1),
                      (q + 0, kc + 0, vc + 0), repeats)
    row['pallas_update'] = dict(us=round(us, 1), gb_s=gb_s(length, us), max_err=err)
    out['lengths'][str(length)] = row
    print(length, row, flush=True)
  if tune:
    results = []
    for params in DECODE_TUNE_GRID:
      try:
        us = [time_attend(functools.partial(da.decode_attention_pallas, **params), jnp.int32(n))
              for n in lengths]
      except Exception as e:  # e.g. too much shared memory for the block
        print('tune', params, 'failed:', str(e).splitlines()[0][:200], flush=True)
        continue
      results.append(dict(params, us=[round(u, 1) for u in us], total_us=round(sum(us), 1)))
      print('tune', results[-1], flush=True)
    results.sort(key=lambda r: r['total_us'])
    out['tune'] = results
    out['tune_best'] = results[0] if results else None
  return out


# what `bench decode_matmul --tune` tries (72 launch-parameter sets)
LAYER_TUNE_GRID = [dict(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=st)
                   for bm in (32, 64, 128) for bn in (16, 32, 64) for bk in (128, 256)
                   for w in (2, 4) for st in (2, 3)]


def bench_decode_matmul(size, batch, cfg_scale=1.5, repeats=20, tune=False):
  """One decode layer's products at the sampler's rows (CFG doubles them), bf16: the XLA path
  (RMSNorm + qkv, output projection + residual, RMSNorm + SwiGLU up, down projection + residual)
  against the fused kernels of models/decode_matmul.py, as a chain (each layer's output is the
  next one's input; the attention is left out: its output is stood in for by q + k + v, after the
  position embedding and RoPE; the fused side's q / k are in half-split order, so its stand-in is
  not the XLA side's and the outputs differ, only the times compare). `block_n` of the launch
  parameters does not apply to the qkv kernel (one head per column program).
  Microseconds per layer, GB/s of weights read, and each path's largest difference to itself in
  fp32.
  `tune`: every launch set of LAYER_TUNE_GRID, best first."""
  from hita_jax.models import decode_matmul as dm
  from hita_jax.models.gpt import RMSNorm
  cfg = full_size_config(size)
  rows = 2 * batch if cfg_scale > 1 else batch
  d, f = cfg.dim, cfg.ffn_hidden
  keys = jax.random.split(jax.random.key(0), 7)
  w = {name: (0.02 * jax.random.normal(k, shape)).astype(jnp.bfloat16) for name, k, shape in
       (('wqkv', keys[0], (d, 3 * d)), ('wo', keys[1], (d, d)), ('w1', keys[2], (d, f)),
        ('w3', keys[3], (d, f)), ('w2', keys[4], (f, d)))}
  gains = [1.0 + 0.1 * jax.random.normal(k, (d,)) for k in keys[5:7]]
  x0 = jax.random.normal(jax.random.key(9), (rows, d), jnp.bfloat16)

  def norm(x, g):
    n = RMSNorm(d, cfg.norm_eps)
    n.weight[...] = g
    return n(x)

  hd, nh = cfg.head_dim, cfg.n_head
  add = (0.02 * jax.random.normal(jax.random.key(11), (d,))).astype(jnp.bfloat16)
  angle = jnp.linspace(0.0, 3.0, hd // 2)  # a patch position: rotated and, here, also shifted
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  perm = dm.half_split_columns(nh, hd)
  cols = jnp.concatenate([perm, perm + d, jnp.arange(2 * d, 3 * d)])
  add_perm = add[perm]

  def xla_layer(x, w):
    mm = lambda a, b: jnp.einsum('mk,kn->mn', a, b.astype(a.dtype))
    qkv = mm(norm(x, gains[0]), w['wqkv'])
    q, k = (apply_rope((a + add).reshape(rows, 1, nh, hd), cos[None], sin[None]).reshape(rows, d)
            for a in (qkv[:, :d], qkv[:, d:2 * d]))
    h = x + mm(q + k + qkv[:, 2 * d:], w['wo'])
    y = norm(h, gains[1])
    return h + mm(jax.nn.silu(mm(y, w['w1'])) * mm(y, w['w3']), w['w2'])

  def fused_layer(x, w):
    if dm.rope_fits(hd):  # what the sampler runs: q / k in half-split order, RoPE in the kernel
      # w['wqkv'] is in half-split column order here (permuted once, below, as the sampler does)
      q, k, v = dm.norm_qkv_rope(x, gains[0], w['wqkv'], add_perm, cos, sin, n_head=nh,
                                 eps=cfg.norm_eps)
    else:
      qkv = dm.norm_matmul(x, gains[0], w['wqkv'], eps=cfg.norm_eps)
      q, k, v = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]
    h = dm.matmul_residual(q + k + v, w['wo'], x)
    hidden = dm.norm_matmul(h, gains[1], w['w1'], w_gate=w['w3'], eps=cfg.norm_eps)
    return dm.matmul_residual(hidden, w['w2'], h)

  weight_bytes = sum(a.size * 2 for a in w.values())
  weights = {'xla': w, 'pallas': {**w, 'wqkv': w['wqkv'][:, cols]} if dm.rope_fits(hd) else w}
  f32 = lambda ws: {k: v.astype(jnp.float32) for k, v in ws.items()}
  ref = {'xla': xla_layer(x0.astype(jnp.float32), f32(weights['xla'])),
         'pallas': fused_layer(x0.astype(jnp.float32), f32(weights['pallas']))}
  # the chain's carry is donated: fresh copies of the input and the weights per timing
  time_layer = lambda fn, ws: _chain_timer(lambda c: (fn(c[0], c[1]), c[1]),
                                           (x0 + 0, jax.tree.map(lambda a: a + 0, ws)), repeats)
  out = dict(bench='decode_matmul', size=size, batch=batch, rows=rows, dim=d, ffn=f,
             weight_mb=round(weight_bytes / 1e6, 2), tuning=dict(dm._TUNING), paths={})
  for name, fn in (('xla', xla_layer), ('pallas', fused_layer)):
    got = jax.jit(fn)(x0, weights[name])
    us = time_layer(fn, weights[name])
    out['paths'][name] = dict(us=round(us, 1), gb_s=round(weight_bytes / (us * 1e-6) / 1e9),
                              max_err=float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref[name]))))
    print(name, out['paths'][name], flush=True)
  if tune:
    results = []
    for params in LAYER_TUNE_GRID:
      try:
        with dm.tuning(**params):
          us = time_layer(fused_layer, weights['pallas'])
      except Exception as e:  # e.g. too much shared memory for the blocks
        print('tune', params, 'failed:', str(e).splitlines()[0][:200], flush=True)
        continue
      results.append(dict(params, us=round(us, 1)))
      print('tune', results[-1], flush=True)
    results.sort(key=lambda r: r['us'])
    out['tune'] = results
    out['tune_best'] = results[0] if results else None
  return out


def bench_inception(batch, repeats=5):
  """pool3 (+ sFID features and logits) of uint8 256x256 images at `batch`, random weights
  (speed only), fp32 at HIGHEST precision as in evaluation, ADM preprocessing included."""
  runner = InceptionRunner(pretrained.load_inception('random'), batch_size=batch)
  images = np.random.RandomState(0).randint(0, 256, (batch, 256, 256, 3)).astype(np.uint8)
  t0 = time.perf_counter()
  runner(images)
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    runner(images)
    times.append(time.perf_counter() - t0)
  dt = float(np.median(times))
  out = dict(bench='inception_pool3', batch=batch, seconds=dt, images_s=batch / dt, first_call_s=first)
  out.update(peak_memory())
  return out


def bench_ar_trainer(size, batch, steps=20, attn='auto', profile_dir=None, hlo_out=None):
  """The `train_ar` trainer's own jitted step (AdamW, EMA, dropout, label drop) on synthetic codes."""
  config = config_lib.hita_recipe(size, None)
  config.train_ar.codes_dir = 'synthetic'
  config.train_ar.global_batch_size = batch
  config.gpt.attn_impl = attn
  mesh = sharding.make_mesh([('data', -1)])
  parts, state, _ = ar.build(config, mesh)
  it = ar.make_data(config, parts)
  jitted = ar.jit_train_step(parts, config)  # as train_ar compiles it
  step = lambda s, b, r: jitted(s, None, b, r)
  key = jax.random.key(0)
  t0 = time.perf_counter()
  for i in range(3):
    state, m = step(state, {k: jnp.asarray(v) for k, v in next(it).items()}, key)
  float(m['loss'])
  warm = time.perf_counter() - t0
  batches = [{k: jnp.asarray(v) for k, v in next(it).items()} for _ in range(steps)]
  t0 = time.perf_counter()
  for b in batches:
    state, m = step(state, b, key)
  float(m['loss'])
  dt = (time.perf_counter() - t0) / steps
  t = parts.cfg.seq_len
  tok_s = batch * t / dt
  peak = flops.device_peak_flops() or 989e12
  out = dict(bench='train_ar_step', size=size, batch=batch, attn=attn, step_s=dt, images_s=batch / dt,
             tokens_s=tok_s, mfu=flops.mfu(tok_s, flops.gpt_train_flops_per_token(parts.cfg, t), peak),
             loss=float(m['loss']), warmup_s=warm)
  out.update(peak_memory())
  abstract = checkpoint.abstract_like((state, None, batches[0], key))
  hlo = functools.cache(lambda: jitted.lower(*abstract).compile().as_text())
  _write_hlo(hlo_out, hlo)
  box = [state]

  def once():
    box[0], mm = step(box[0], batches[0], key)
    float(mm['loss'])
  _maybe_profile(out, profile_dir, once, hlo=hlo)
  return out


def bench_tok_trainer(batch, variant='V', steps=5, profile_dir=None, stages=None):
  """The `train_tokenizer` trainer's own jitted step (G with LPIPS + PatchGAN + VQ + VFM terms, then
  D) at full size on random images, random frozen towers (speed only)."""
  from hita_jax.tasks import train_tokenizer as tt
  config = config_lib.load_config(os.path.join(os.path.dirname(__file__), '..', '..', 'configs',
                                               f'tokenizer_{variant.lower()}.py'))
  config.train_tokenizer.global_batch_size = batch
  if stages:
    config.train_tokenizer.step_stages = stages
  config.init.allow_random_dinov2 = True
  config.tokenizer_loss.lpips_weights = 'random'
  mesh = sharding.make_mesh([('data', -1)])
  t0 = time.perf_counter()
  parts, state, lp_state, _ = tt.build(config, mesh)
  build_s = time.perf_counter() - t0
  size = config.tokenizer.image_size
  r = np.random.RandomState(0)
  image_sh = sharding.batch_sharding(mesh, config_lib.axis_rules(config), 4)  # as the trainer's batches
  batches = [{'image': jax.device_put(r.randint(0, 256, (batch, size, size, 3)).astype(np.uint8), image_sh)}
             for _ in range(2)]
  step = tt.make_train_step(parts, config)  # as train_tokenizer compiles it
  key = jax.random.key(0)
  t0 = time.perf_counter()
  compiled = tt.compile_train_step(step, state, lp_state, batches[0], key)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  state, m = compiled(state, lp_state, batches[0], key)
  float(m['g_loss'])
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for i in range(steps):
    state, m = compiled(state, lp_state, batches[i % 2], key)
  float(m['g_loss'])
  dt = (time.perf_counter() - t0) / steps
  out = dict(bench='train_tokenizer_step', variant=variant, image_size=size, batch=batch, step_s=dt,
             images_s=batch / dt, compile_s=compile_s, first_step_s=first, build_s=build_s,
             g_loss=float(m['g_loss']), stages=config.train_tokenizer.step_stages,
             **getattr(compiled, 'timing', {}))
  out.update(peak_memory())
  box = [state]

  def once():
    box[0], mm = compiled(box[0], lp_state, batches[0], key)
    float(mm['g_loss'])
  _maybe_profile(out, profile_dir, once)
  return out


def _parse_tuning(text):
  if not text:
    return None
  try:
    bk, warps, stages = (int(x) for x in text.split(','))
  except ValueError:
    raise SystemExit(f'--decode-tuning {text!r}: write BLOCK_K,WARPS,STAGES, e.g. 128,4,3')
  return dict(block_k=bk, num_warps=warps, num_stages=stages)


def _parse_layer_tuning(text):
  if not text:
    return None
  try:
    bm, bn, bk, warps, stages = (int(x) for x in text.split(','))
  except ValueError:
    raise SystemExit(f'--layer-tuning {text!r}: write BLOCK_M,BLOCK_N,BLOCK_K,WARPS,STAGES, '
                     'e.g. 64,32,128,4,3')
  return dict(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=cli.VERBOSITY_HELP)
  p.add_argument('what', choices=['gpt_train', 'ar_trainer', 'sample', 'decode_attn', 'decode_matmul',
                                  'inception', 'tok_trainer', 'cnn_train', 'gn_sums', 'hbm', 'train_attn',
                                  'fanin_compile', 'parallel_compile'])
  p.add_argument('--size', default='B', choices=sorted(GPT_SIZES))
  p.add_argument('--stages', type=int, default=None, choices=[1, 3],
                 help='tok_trainer: train_tokenizer.step_stages (default: the config\'s)')
  p.add_argument('--mode', default='threads', choices=['seq', 'threads'],
                 help='parallel_compile: compile the programs one after another or from a thread each')
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--attn', default='auto', choices=list(ATTN_IMPLS))
  p.add_argument('--profile', default=None, help='trace directory: also print the top device kernels')
  p.add_argument('--hlo', default=None, metavar='PATH.gz',
                 help='gpt_train / ar_trainer: also write the step\'s optimized HLO text (gzipped)')
  p.add_argument('--variant', default='V', choices=['V', 'U'])
  p.add_argument('--remat', default='none', choices=sorted(REMAT_POLICIES))
  p.add_argument('--scan', action='store_true')
  p.add_argument('--cfg', type=float, default=1.5)
  p.add_argument('--iters', type=int, default=10)
  p.add_argument('--kv-segments', type=int, default=0,
                 help='sample: decode loops over position ranges (0 = by platform)')
  p.add_argument('--dropout-bits', type=int, default=16, choices=[16, 32],
                 help='gpt_train: random bits per Threefry dropout decision (GPTConfig.dropout_bits)')
  p.add_argument('--dropout-rng', default=None, choices=['threefry', 'hash'],
                 help='gpt_train: where the dropout masks come from (GPTConfig.dropout_rng; default its default)')
  p.add_argument('--qkv-gemms', type=int, default=2, choices=[1, 2],
                 help='gpt_train: the qkv projection as one product or q|k and v apart (GPTConfig.qkv_gemms)')
  p.add_argument('--tune', action='store_true',
                 help='decode_attn / decode_matmul / train_attn: also sweep the kernels\' launch parameters')
  p.add_argument('--decode-tuning', default=None, metavar='BLOCK_K,WARPS,STAGES',
                 help='sample: the decode kernel\'s launch parameters (default: the module\'s)')
  p.add_argument('--decode-attn', default='auto', choices=list(DECODE_ATTN_IMPLS),
                 help="sample: the decode step's attention (auto = the Pallas kernel on GPU)")
  p.add_argument('--decode-layer', default='xla', choices=list(DECODE_LAYER_IMPLS),
                 help="sample: the decode step's per-layer products (pallas = models/decode_matmul.py)")
  p.add_argument('--layer-tuning', default=None, metavar='BLOCK_M,BLOCK_N,BLOCK_K,WARPS,STAGES',
                 help="sample: the fused layer products' launch parameters (default: the module's)")
  a = p.parse_args(argv)
  if a.what == 'gpt_train':
    res = bench_gpt_train(a.size, a.batch, a.attn, a.remat, a.scan, iters=a.iters, profile_dir=a.profile,
                          dropout_bits=a.dropout_bits, hlo_out=a.hlo, qkv_gemms=a.qkv_gemms,
                          dropout_rng=a.dropout_rng)
  elif a.what == 'ar_trainer':
    res = bench_ar_trainer(a.size, a.batch, attn=a.attn, profile_dir=a.profile, hlo_out=a.hlo)
  elif a.what == 'sample':
    res = bench_sample(a.size, a.batch, a.cfg, profile_dir=a.profile, kv_segments=a.kv_segments,
                       decode_attn=a.decode_attn, decode_tuning=_parse_tuning(a.decode_tuning),
                       decode_layer=a.decode_layer, layer_tuning=_parse_layer_tuning(a.layer_tuning))
  elif a.what == 'decode_attn':
    res = bench_decode_attn(a.size, a.batch, a.cfg, tune=a.tune)
  elif a.what == 'decode_matmul':
    res = bench_decode_matmul(a.size, a.batch, a.cfg, tune=a.tune)
  elif a.what == 'tok_trainer':
    res = bench_tok_trainer(a.batch, a.variant, profile_dir=a.profile, stages=a.stages)
  elif a.what == 'cnn_train':
    res = bench_cnn_train(a.batch, iters=a.iters)
  elif a.what == 'gn_sums':
    res = bench_gn_sums(a.batch)
  elif a.what == 'train_attn':
    from hita_jax.tools.bench_attn import bench_train_attn
    res = bench_train_attn(full_size_config(a.size), a.batch, tune=a.tune)
  elif a.what == 'fanin_compile':
    from hita_jax.tools.bench_compile import bench_fanin_compile
    res = bench_fanin_compile()
  elif a.what == 'parallel_compile':
    from hita_jax.tools.bench_compile import bench_parallel_compile
    res = bench_parallel_compile(mode=a.mode)
  elif a.what == 'hbm':
    from hita_jax.tools.bench_floor import bench_hbm  # it builds on this module's configs
    res = bench_hbm(images=a.batch)
  else:
    res = bench_inception(a.batch)
  res.update(env_info())
  emit_jsonl(res, 'bench.jsonl')


if __name__ == '__main__':
  cli.run(main)
