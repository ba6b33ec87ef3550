"""The GPT training step's causal attention alone (`python -m hita_jax.tools.bench train_attn`):
forward and forward + backward at one layer's full-size shape, per `attn_impl` kernel, with the
causal FLOP rates and the largest difference to an fp32 reference. `tune` sweeps the Triton
kernel's launch sets (models/layers.TRITON_ATTN_TUNING)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hita_jax.models import layers
from hita_jax.tools.ab import best_time

# (block_q, block_k, backward block, warps, stages); the length is padded to the largest block
TRITON_TUNE_GRID = [(64, 64, 64, 4, 2), (64, 64, 64, 4, 3), (64, 64, 64, 8, 2), (64, 64, 32, 4, 2),
                    (64, 32, 32, 4, 2), (32, 64, 32, 4, 2), (128, 64, 64, 8, 2), (128, 128, 64, 8, 2)]


def _timed(fn, q, k, v, do, iters, rounds):
  """Milliseconds of the forward and of forward + backward (the cotangent `do`), and the
  forward's output."""
  fwd = jax.jit(fn)
  grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * do),
                           argnums=(0, 1, 2)))
  fwd_s, out = best_time(lambda i: fwd(q, k, v), iters, rounds)
  bwd_s, _ = best_time(lambda i: grads(q, k, v), iters, rounds)
  return {'fwd_ms': 1e3 * fwd_s, 'fwd_bwd_ms': 1e3 * bwd_s}, out


def bench_train_attn(cfg, batch, iters=20, rounds=3, tune=False):
  """cfg: the GPTConfig whose layer shape is timed (B, seq_len, heads, head_dim; bf16)."""
  b, t, h, d = batch, cfg.seq_len, cfg.n_head, cfg.head_dim
  kq, kk, kv, kd = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(x, (b, t, h, d), jnp.bfloat16) for x in (kq, kk, kv))
  do = jax.random.normal(kd, (b, t, h, d), jnp.float32)
  ref = layers.attention(*(a.astype(jnp.float32) for a in (q, k, v)), mask=layers.causal_mask(t))
  flops = 4 * b * h * t * t * d / 2  # the causal forward's two products; the backward's are 2.5x

  def row(fn):
    r, out = _timed(fn, q, k, v, do, iters, rounds)
    r['max_err'] = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
    r['fwd_tflops'] = round(flops / r['fwd_ms'] / 1e9, 1)
    r['bwd_tflops'] = round(2.5 * flops / max(r['fwd_bwd_ms'] - r['fwd_ms'], 1e-9) / 1e9, 1)
    return r

  out = dict(bench='train_attn', batch=b, seq_len=t, heads=h, head_dim=d, impls={},
             triton_tuning=list(layers.TRITON_ATTN_TUNING))
  for impl in ('cudnn', 'pallas'):
    try:
      out['impls'][impl] = row(functools.partial(layers.causal_attention, impl=impl))
    except Exception as e:  # e.g. no cuDNN on this backend
      out['impls'][impl] = {'error': str(e).splitlines()[0][:300]}
    print(impl, out['impls'][impl], flush=True)
  if tune:
    out['tune'] = []
    for tuning in TRITON_TUNE_GRID:
      try:
        r = row(functools.partial(layers.triton_causal_attention, tuning=tuning,
                                  interpret=jax.default_backend() != 'gpu'))
      except Exception as e:  # e.g. too much shared memory for the blocks
        r = {'error': str(e).splitlines()[0][:200]}
      out['tune'].append(dict(tuning=list(tuning), **r))
      print('tune', tuning, r, flush=True)
  return out
