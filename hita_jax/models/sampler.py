"""Jitted class-conditional sampling with a KV cache, as the official `generate()` does it.

One `lax.fori_loop` over all S + N positions; the KV cache lives in the loop carry and is updated in
place. Classifier-free guidance concatenates the null-class batch and mixes the logits
`uncond + (cond - uncond) * s` at every step (both holistic and patch tokens); a scale <= 1 skips
the unconditional half, as the official code. Temperature / top-k / top-p follow the official
`top_k_top_p_filtering`. Positions < S sample from the holistic head, the rest from the patch head.

`prefix_codes` + `prefix_mask` teacher-force known codes (completion / in-painting): where the mask
is set, that code is written instead of the sampled one and fed to the next step.

The positions are decoded in `kv_segments` consecutive loops (static ranges, split at S): a loop
reads only the cache prefix its last position needs and calls one head without a branch. The same
distribution as one loop over everything (the masked tail adds exact zeros to the softmax; only
the summation order may differ in the last bit); on a GPU the cache read is most of a step's
memory traffic, so this roughly halves it. With the fused decode-attention kernel (GPU default,
models/decode_attention.py) the kernel itself reads exactly the valid prefix, and the loops only
keep the heads branch-free. 'auto' (None) is one loop on CPU (each loop is compiled separately),
2 with the kernel and 8 otherwise.

`legacy_pos128_embedding=True` reproduces the released sampler's quirk: the last holistic code is
fed at position S through the *patch* table (training uses the holistic table). It is set for
models imported from official checkpoints, so published numbers reproduce; models trained here
leave it off.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from hita_jax.models.decode_attention import KERNEL_IMPLS, resolve_decode_attn_impl
from hita_jax.models.gpt import GPT


def filter_logits(logits, *, top_k: int = 0, top_p: float = 1.0):
  """Official `top_k_top_p_filtering` (filter value -inf, at least one token kept)."""
  neg = jnp.finfo(logits.dtype).min
  if top_k > 0:
    k = min(top_k, logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # a sorted token is removed when the mass before it already exceeds top_p (first always kept)
    keep = jnp.concatenate([jnp.ones_like(cum[..., :1], bool), cum[..., :-1] <= top_p], axis=-1)
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, neg, logits)
  return logits


def sample_token(key, logits, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
  logits = logits.astype(jnp.float32) / max(temperature, 1e-5)
  logits = filter_logits(logits, top_k=top_k, top_p=top_p)
  if top_k == 1:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def resolve_kv_segments(kv_segments: int | None, platform: str | None = None,
                        fused_attention: bool = False) -> int:
  """None / 0 = by platform: 1 loop on CPU; with the fused decode-attention kernel (which reads
  exactly the valid prefix itself) 2, for the branch-free heads; else 8 on GPU / TPU."""
  if kv_segments is None or kv_segments == 0:
    if (platform or jax.default_backend()) == 'cpu':
      return 1
    return 2 if fused_attention else 8
  if kv_segments < 1:
    raise ValueError(f'kv_segments must be >= 1 (or 0 / None for auto), got {kv_segments}')
  return int(kv_segments)


def decode_segments(length: int, num_holistic: int, kv_segments: int,
                    cache_len: int) -> list[tuple[int, int, int, str | None]]:
  """Static (start, end, kv_len, head) loops covering positions [0, length): about `kv_segments`
  equal ranges, also split at S (head: 'holistic' below S, 'patch' from S on); kv_len is the end
  rounded up to 8, capped at the cache length. One segment keeps the single-loop form (full cache
  read, head picked per step)."""
  if kv_segments <= 1:
    return [(0, length, cache_len, None)]
  cuts = {0, length} | {round(length * i / kv_segments) for i in range(1, kv_segments)}
  if 0 < num_holistic < length:
    cuts.add(num_holistic)
  cuts = sorted(cuts)
  segs = []
  for a, b in zip(cuts[:-1], cuts[1:]):
    head = 'holistic' if b <= num_holistic else 'patch'
    segs.append((a, b, min(cache_len, -(-b // 8) * 8), head))
  return segs


@functools.partial(jax.jit, static_argnames=('graphdef', 'use_cfg', 'temperature', 'top_k', 'top_p',
                                             'cfg_interval', 'legacy_pos128_embedding', 'length',
                                             'return_logits', 'kv_segments'))
def _generate(graphdef, state, labels, key, cfg_scale, prefix_codes, prefix_mask, *, use_cfg: bool,
              temperature: float, top_k: int, top_p: float, cfg_interval: int,
              legacy_pos128_embedding: bool, length: int, return_logits: bool, kv_segments: int):
  model: GPT = nnx.merge(graphdef, state, copy=True)
  b = labels.shape[0]
  lab = jnp.concatenate([labels, jnp.full_like(labels, model.cfg.null_class)]) if use_cfg else labels
  cache = model.init_cache(lab.shape[0], length)
  seq = jnp.zeros((b, length), jnp.int32)
  v = model.cfg.vocab_size
  logit_buf = jnp.zeros((b, length, v) if return_logits else (0,), jnp.float32)
  weights = model.decode_weights()  # loop invariants, sliced once

  def body(p, carry, kv_len, head):
    cache, seq, key, logit_buf = carry
    prev = jax.lax.dynamic_slice_in_dim(seq, jnp.maximum(p - 1, 0), 1, axis=1)[:, 0]
    tokens = jnp.concatenate([prev, prev]) if use_cfg else prev
    x = model.embed_step(lab, tokens, p, legacy_pos128_embedding=legacy_pos128_embedding)
    logits, cache = model.decode_step(x, cache, p, weights, kv_len=kv_len, head=head)
    if use_cfg:
      cond, uncond = logits[:b], logits[b:]
      guided = uncond + (cond - uncond) * cfg_scale
      if cfg_interval > -1:  # official: guidance only for the first cfg_interval + 1 decode steps
        guided = jnp.where((p == 0) | (p - 1 <= cfg_interval), guided, cond)
      logits = guided
    key, sub = jax.random.split(key)
    tok = sample_token(sub, logits, temperature=temperature, top_k=top_k, top_p=top_p)
    forced = jax.lax.dynamic_slice_in_dim(prefix_mask, p, 1, axis=1)[:, 0]
    known = jax.lax.dynamic_slice_in_dim(prefix_codes, p, 1, axis=1)[:, 0]
    tok = jnp.where(forced, known, tok)
    seq = jax.lax.dynamic_update_slice_in_dim(seq, tok[:, None], p, axis=1)
    if return_logits:
      logit_buf = jax.lax.dynamic_update_slice_in_dim(logit_buf, logits[:, None], p, axis=1)
    return cache, seq, key, logit_buf

  carry = (cache, seq, key, logit_buf)
  cache_len = cache['k'][0].shape[-2]  # per-layer tuple or stacked array: T is the same axis
  for start, end, kv_len, head in decode_segments(length, model.cfg.num_holistic, kv_segments,
                                                  cache_len):
    carry = jax.lax.fori_loop(start, end, functools.partial(body, kv_len=kv_len, head=head), carry)
  _, seq, _, logit_buf = carry
  return seq, logit_buf


def generate(model: GPT, labels, key, *, cfg_scale: float = 1.5, cfg_interval: int = -1,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             legacy_pos128_embedding: bool = False, prefix_codes=None, prefix_mask=None,
             length: int | None = None, return_logits: bool = False, state: Any = None,
             kv_segments: int | None = None):
  """Samples (B, S + N) codes [holistic | patch] for class `labels` (B,).

  Compiles once per (batch, CFG on/off, sampling settings, length, kv_segments); the CFG scale
  itself is traced. `state` may be passed (e.g. a sharded `nnx.state(model)`) to avoid re-reading
  the module. `kv_segments`: see the module docstring (None / 0 = by platform)."""
  args, static = _generate_args(model, labels, key, cfg_scale=cfg_scale, cfg_interval=cfg_interval,
                                temperature=temperature, top_k=top_k, top_p=top_p,
                                legacy_pos128_embedding=legacy_pos128_embedding,
                                prefix_codes=prefix_codes, prefix_mask=prefix_mask, length=length,
                                return_logits=return_logits, state=state, kv_segments=kv_segments)
  seq, logits = _generate(*args, **static)
  return (seq, logits) if return_logits else seq


def lower_generate(model: GPT, labels, key, **kw):
  """`generate`'s jitted program for these arguments, lowered (`.compile().as_text()` is the
  optimized HLO a profile's kernels are named after; `bench sample --profile`)."""
  args, static = _generate_args(model, labels, key, **kw)
  return _generate.lower(*args, **static)


def _generate_args(model: GPT, labels, key, *, cfg_scale: float = 1.5, cfg_interval: int = -1,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   legacy_pos128_embedding: bool = False, prefix_codes=None, prefix_mask=None,
                   length: int | None = None, return_logits: bool = False, state: Any = None,
                   kv_segments: int | None = None):
  """`_generate`'s (arrays, static arguments) for `generate`'s arguments."""
  cfg = model.cfg
  length = length or (cfg.num_holistic + cfg.num_patches)
  labels = jnp.asarray(labels, jnp.int32)
  b = labels.shape[0]
  if prefix_codes is None:
    prefix_codes = jnp.zeros((b, length), jnp.int32)
    prefix_mask = jnp.zeros((b, length), bool)
  else:
    prefix_codes = jnp.asarray(prefix_codes, jnp.int32)
    if prefix_codes.shape[1] < length:
      prefix_codes = jnp.pad(prefix_codes, ((0, 0), (0, length - prefix_codes.shape[1])))
    if prefix_mask is None:
      raise ValueError('prefix_codes needs prefix_mask (True where a code is given)')
    prefix_mask = jnp.asarray(prefix_mask, bool)
    if prefix_mask.ndim == 1:
      prefix_mask = jnp.broadcast_to(prefix_mask, (b, prefix_mask.shape[0]))
    if prefix_mask.shape[1] < length:
      prefix_mask = jnp.pad(prefix_mask, ((0, 0), (0, length - prefix_mask.shape[1])))
  graphdef, st = nnx.split(model)
  st = st if state is None else state
  args = (graphdef, st, labels, key, jnp.float32(cfg_scale), prefix_codes, prefix_mask)
  static = dict(use_cfg=cfg_scale > 1.0, temperature=float(temperature), top_k=int(top_k),
                top_p=float(top_p), cfg_interval=int(cfg_interval),
                legacy_pos128_embedding=bool(legacy_pos128_embedding), length=int(length),
                return_logits=return_logits,
                kv_segments=resolve_kv_segments(
                    kv_segments, fused_attention=uses_fused_attention(model, b, cfg_scale)))
  return args, static


def decode_attn_impl_for(model: GPT, batch: int, cfg_scale: float) -> str:
  """The decode attention (models/decode_attention.py) that the steps of `generate(model, labels
  of length batch, cfg_scale=...)` run: CFG doubles the rows."""
  cfg = model.cfg
  rows = 2 * batch if cfg_scale > 1.0 else batch
  return resolve_decode_attn_impl(cfg.decode_attn_impl, rows, cfg.n_head, cfg.head_dim)


def uses_fused_attention(model: GPT, batch: int, cfg_scale: float) -> bool:
  return decode_attn_impl_for(model, batch, cfg_scale) in KERNEL_IMPLS


def for_sampling(model: GPT, dtype: str) -> tuple[GPT, Any]:
  """(the model computing in `dtype`, its state with floating weights cast to `dtype`), for
  `generate(model, ..., state=state)`. test_net.py samples with bf16 weights and KV cache; 'float32'
  keeps the model as it is. Nothing is allocated besides the cast copy of the weights."""
  if dtype == model.cfg.dtype and dtype == 'float32':
    return model, nnx.state(model)
  cfg = dataclasses.replace(model.cfg, dtype=dtype)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))
  dt = jnp.dtype(dtype)
  state = jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                       nnx.state(model))
  return nnx.merge(graphdef, state), state


def split_codes(seq, num_holistic: int):
  return seq[:, :num_holistic], seq[:, num_holistic:]
