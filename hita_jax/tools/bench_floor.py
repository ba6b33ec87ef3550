"""Memory-bandwidth ceilings of the current accelerator and the sampler's floor at them
(`python -m hita_jax.tools.bench hbm`).

A decode step must read every layer's weights (bf16) and the valid prefix of both CFG halves' K / V
caches; nothing else it touches is comparable in size. So the bytes of one sampling run (the
whole sequence of 569 tokens) over the device's read rate bound its time from below for any
implementation that keeps the released model's bf16 weights and cache. The read rate is measured
here, not taken from the datasheet: a large reduction (read only) and a large copy (read + write,
counting both), each over buffers far larger than the L2 cache, rotated between calls.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

from hita_jax.models.gpt import GPT, GPT_SIZES, GPTConfig
from hita_jax.tools.ab import peak_memory


def sampler_bytes(cfg: GPTConfig, images: int, cfg_scale: float = 1.5, weight_bytes: int = 2,
                  cache_bytes: int = 2) -> dict:
  """Bytes one sampling run must read: the decode weights once per generated token (the blocks,
  the final norm and one of the two head halves; an embedding row is negligible) and, per layer,
  K and V of every row over the valid prefix (class token(s) + the tokens so far)."""
  model = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
  flat = {'/'.join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  per_step = sum(v.size for k, v in flat.items() if k.startswith('blocks/') or k.startswith('norm/'))
  per_step += flat['head'].size // 2  # each position multiplies its own half of the two heads
  tokens = cfg.num_holistic + cfg.grid ** 2
  rows = 2 * images if cfg_scale > 1.0 else images
  prefix_sum = sum(cfg.cls_token_num + i for i in range(tokens))  # cache length at each step
  kv = cfg.n_layer * 2 * rows * prefix_sum * cfg.dim * cache_bytes
  weights = tokens * per_step * weight_bytes
  return {'tokens': tokens, 'rows': rows, 'weights_gb': weights / 1e9, 'kv_gb': kv / 1e9,
          'total_gb': (weights + kv) / 1e9}


def _best_time(fn, buffers, iters, rounds):
  """Seconds per call, the best of `rounds` windows of `iters` calls rotating over `buffers`."""
  jax.block_until_ready([fn(b) for b in buffers])
  best = float('inf')
  for _ in range(rounds):
    t0 = time.perf_counter()
    out = [fn(buffers[i % len(buffers)]) for i in range(iters)]
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t0) / iters)
  return best


def bench_hbm(gb: float = 4.0, iters: int = 20, rounds: int = 3, images: int = 64,
              sizes=('B', 'XL')) -> dict:
  """Read and copy rates over two bf16 buffers of `gb` GB each, then the sampler's floor (bytes
  of a run over the read rate) for GPT `sizes` at `images` images with CFG."""
  n = int(gb * 1e9 / 2) // 8192 * 8192
  keys = jax.random.split(jax.random.key(0), 2)
  buffers = [jax.random.normal(k, (n // 8192, 8192), jnp.bfloat16) for k in keys]  # never zeros
  nbytes = n * 2
  # Row sums in fp32: one read of the buffer, an output 8192x smaller.
  read_s = _best_time(jax.jit(lambda x: jnp.sum(x, axis=1, dtype=jnp.float32)), buffers, iters, rounds)
  copy_s = _best_time(jax.jit(lambda x: x + jnp.bfloat16(1)), buffers, iters, rounds)
  read_rate, copy_rate = nbytes / read_s, 2 * nbytes / copy_s
  res = {'bench': 'hbm', 'buffer_gb': nbytes / 1e9, 'read_tb_s': read_rate / 1e12,
         'copy_tb_s': copy_rate / 1e12, 'sampler_floor': {}}
  for size in sizes:
    cfg = GPTConfig(**GPT_SIZES[size], vocab_size=16384, num_holistic=128, grid=21, num_classes=1000)
    b = sampler_bytes(cfg, images)
    # The faster of the two measured rates: the lowest floor, so a target above it is out of reach.
    floor_s = b['total_gb'] * 1e9 / max(read_rate, copy_rate)
    res['sampler_floor'][size] = {**b, 'images': images, 'floor_s': floor_s,
                                  'floor_images_s': images / floor_s}
  res.update(peak_memory())
  return res
