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

import jax
import jax.numpy as jnp
from flax import nnx

from hita_jax.models.gpt import GPT, GPTConfig
from hita_jax.tools.ab import best_time, peak_memory
from hita_jax.tools.bench import full_size_config


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


def bench_hbm(gb: float = 4.0, iters: int = 20, rounds: int = 3, images: int = 64,
              sizes=('B', 'XL')) -> dict:
  """Read and copy rates over two bf16 buffers of `gb` GB each, then the sampler's floor (bytes
  of a run over the read rate) for GPT `sizes` at `images` images with CFG."""
  n = int(gb * 1e9 / 2) // 8192 * 8192
  # Non-zero data written in place by one fused kernel each (random draws would need several
  # times the buffer in temporaries).
  fill = jax.jit(lambda seed: ((jax.lax.broadcasted_iota(jnp.int32, (n // 8192, 8192), 0) * 17
                                + jax.lax.broadcasted_iota(jnp.int32, (n // 8192, 8192), 1) * 31
                                + seed) % 251 - 125).astype(jnp.bfloat16))
  buffers = [fill(seed) for seed in (1, 2)]
  nbytes = n * 2
  # Row sums in fp32: one read of the buffer, an output 8192x smaller.
  read, copy = jax.jit(lambda x: jnp.sum(x, axis=1, dtype=jnp.float32)), jax.jit(lambda x: x + jnp.bfloat16(1))
  read_s = best_time(lambda i: read(buffers[i % 2]), iters, rounds)[0]
  copy_s = best_time(lambda i: copy(buffers[i % 2]), iters, rounds)[0]
  read_rate, copy_rate = nbytes / read_s, 2 * nbytes / copy_s
  res = {'bench': 'hbm', 'buffer_gb': nbytes / 1e9, 'read_tb_s': read_rate / 1e12,
         'copy_tb_s': copy_rate / 1e12, 'sampler_floor': {}}
  for size in sizes:
    b = sampler_bytes(full_size_config(size), images)
    # The faster of the two measured rates: the lowest floor, so a target above it is out of reach.
    floor_s = b['total_gb'] * 1e9 / max(read_rate, copy_rate)
    res['sampler_floor'][size] = {**b, 'images': images, 'floor_s': floor_s,
                                  'floor_images_s': images / floor_s}
  res.update(peak_memory())
  return res
