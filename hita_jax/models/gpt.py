"""Hita's AR generator: a LlamaGen-style Llama (RMSNorm, SwiGLU, no biases) over
[class, q_0..q_{S-1}, z_0..z_{N-2}] that predicts [q_0..q_{S-1}, z_0..z_{N-1}].

Hita's additions to LlamaGen (spec section 4): a second input table for holistic codes, a 2xV
output head (first half holistic), and a learned holistic position embedding added to q and k in
every layer for the first S positions, while patch tokens use 2D RoPE (official table offset: the
zero row lands on position S, q_{S-1}, whose q and k become 0).

Layer parameters are stacked along a leading `layers` axis; `scan_layers` picks lax.scan or an
unrolled loop over them, `remat` a rematerialisation policy.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from hita_jax.models import decode_matmul
from hita_jax.models.decode_attention import DECODE_ATTN_IMPLS, decode_attention_update
from hita_jax.models.decode_matmul import DECODE_LAYER_IMPLS
from hita_jax.models.dropout import DROPOUT_RNGS, drop_path, dropout
from hita_jax.models.layers import (ATTN_IMPLS, DTYPES, causal_attention, causal_pad,
                                    on_batch_shards)
from hita_jax.models.rope import apply_rope, gpt_position_tables


def find_multiple(n: int, k: int) -> int:
  return n if n % k == 0 else n + k - (n % k)


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  dim: int = 768
  n_layer: int = 12
  n_head: int = 12
  multiple_of: int = 256
  ffn_dim_multiplier: float | None = None
  rope_base: float = 10000.0
  norm_eps: float = 1e-5
  initializer_range: float = 0.02
  vocab_size: int = 16384          # per codebook (holistic and patch tables / heads)
  num_holistic: int = 128
  grid: int = 21                   # patch grid; block_size = grid**2
  num_classes: int = 1000
  class_dropout_prob: float = 0.1  # also decides whether the null-class row exists
  cls_token_num: int = 1
  token_dropout: float = 0.1
  attn_dropout: float = 0.0
  resid_dropout: float = 0.1
  ffn_dropout: float = 0.1
  drop_path_rate: float = 0.0
  # random bits per dropout decision: 16 = keep_mask_16 (4x fewer Threefry hashes, drop
  # probability quantised to 1/65536, expectation kept exact; GPT-B/64 step +2.7 % on an H200);
  # 32 = jax.random.bernoulli
  dropout_bits: int = 16
  # where the masks come from: 'threefry' (dropout_bits above; masks stored for the backward) |
  # 'hash' (a keyed 32-bit hash of each element's index, recomputed in the backward: no mask in
  # memory, models/dropout.py). 'hash': GPT-B/64 step -2.4 %, L/64 -1.6 % on an H100 (gpt_ab,
  # 2026-12-06). Official: torch's Philox, so no mask matches it either way
  dropout_rng: str = 'hash'
  dtype: str = 'float32'           # compute dtype; params are fp32
  attn_impl: str = 'auto'          # 'auto' (cuDNN on GPU, splash on TPU, XLA on CPU) | 'xla' | 'cudnn' | 'splash' | 'pallas' (Triton flash kernel, GPU)
  # the sampler's one-query attention: 'auto' (the Pallas kernel on GPU) | 'xla' | 'pallas' | 'pallas_write'
  decode_attn_impl: str = 'auto'
  # the sampler's per-layer products: 'xla' | 'pallas' (RMSNorm + qkv, RMSNorm + SwiGLU up, and
  # the two residual products as fused kernels, models/decode_matmul.py; slower than 'xla' on an
  # H200, 2026-12-05: GPT-B/64 sampling 112.8 against 138.6 img/s)
  decode_layer_impl: str = 'xla'
  remat: str = 'none'              # 'none' | 'minimal' | 'dots' | 'full'
  scan_layers: bool = False
  # the full-sequence qkv projection: 1 = one (dim, 3 dim) product, then q / k / v split off it
  # (v's slice is copied before attention, and the gradients concatenated back); 2 = two products
  # on column splits of the same wqkv, q|k and v, so v comes out contiguous (one more product, a
  # weight-sized concatenate in the gradient instead of an activation-sized one). 2 is the default:
  # +0.3 % (B/64, two alternating pairs) and +0.5 % (L/64) on an H100, 2026-12-05e. The sampler's
  # decode step keeps one product (its few rows are launch-bound).
  qkv_gemms: int = 2

  def __post_init__(self):
    if self.dim % self.n_head:
      raise ValueError(f'dim {self.dim} is not divisible by n_head {self.n_head}')
    if self.cls_token_num != 1:
      raise ValueError('class-conditional Hita uses exactly one class token (cls_token_num=1)')
    if self.attn_impl not in ATTN_IMPLS:
      raise ValueError(f'attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}')
    if self.decode_attn_impl not in DECODE_ATTN_IMPLS:
      raise ValueError(f'decode_attn_impl must be one of {DECODE_ATTN_IMPLS}, '
                       f'got {self.decode_attn_impl!r}')
    if self.decode_layer_impl not in DECODE_LAYER_IMPLS:
      raise ValueError(f'decode_layer_impl must be one of {DECODE_LAYER_IMPLS}, '
                       f'got {self.decode_layer_impl!r}')
    if self.dropout_bits not in (16, 32):
      raise ValueError(f'dropout_bits must be 16 or 32, got {self.dropout_bits!r}')
    if self.dropout_rng not in DROPOUT_RNGS:
      raise ValueError(f'dropout_rng must be one of {DROPOUT_RNGS}, got {self.dropout_rng!r}')
    if self.qkv_gemms not in (1, 2):
      raise ValueError(f'qkv_gemms must be 1 or 2, got {self.qkv_gemms!r}')
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}')

  @property
  def fused_decode_layer(self) -> bool:
    """decode_layer_impl='pallas' and every product has Triton blocks (else the XLA path)."""
    return self.decode_layer_impl == 'pallas' and decode_matmul.layer_fits(
        self.dim, self.ffn_hidden, self.vocab_size)

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_head

  @property
  def ffn_hidden(self) -> int:
    h = int(2 * 4 * self.dim / 3)
    if self.ffn_dim_multiplier is not None:
      h = int(self.ffn_dim_multiplier * h)
    return find_multiple(h, self.multiple_of)

  @property
  def num_patches(self) -> int:
    return self.grid * self.grid

  @property
  def seq_len(self) -> int:
    """Input length of a full sequence: class + S holistic + (N - 1) patch tokens = S + N."""
    return self.num_holistic + self.num_patches

  @property
  def null_class(self) -> int:
    return self.num_classes

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'GPTConfig':
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f'unknown gpt config keys {sorted(unknown)}; valid keys: {sorted(known)}')
    return cls(**d)


# Official sizes (autoregressive/models/gpt.py GPT_models); vocab/S/grid come from the tokenizer.
GPT_SIZES = {
    'B': dict(dim=768, n_layer=12, n_head=12),
    'L': dict(dim=1024, n_layer=24, n_head=16),
    'XL': dict(dim=1280, n_layer=36, n_head=20),
    'XXL': dict(dim=1536, n_layer=48, n_head=24),
    '2B': dict(dim=1920, n_layer=48, n_head=32),
    'XXXL': dict(dim=2560, n_layer=48, n_head=40),
}

REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'minimal': jax.checkpoint_policies.save_only_these_names('qkv', 'attn_out', 'mlp_hidden'),
}


class RMSNorm(nnx.Module):
  """Official RMSNorm: normalise in fp32, cast back, then scale."""

  def __init__(self, dim: int, eps: float):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=('norm',))

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    y = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)).astype(x.dtype)
    return y * self.weight[...].astype(x.dtype)


class Block(nnx.Module):
  """Pre-norm Llama block: h = x + Attn(RMSNorm(x)); out = h + SwiGLU(RMSNorm(h))."""

  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.dim
    self.attention_norm = RMSNorm(d, cfg.norm_eps)
    self.wqkv = nnx.Param(nnx.initializers.normal(cfg.initializer_range)(rngs.params(), (d, 3 * d)),
                          out_sharding=('embed', 'heads'))
    self.wo = nnx.Param(nnx.initializers.normal(cfg.initializer_range)(rngs.params(), (d, d)),
                        out_sharding=('heads', 'embed'))
    self.ffn_norm = RMSNorm(d, cfg.norm_eps)
    f = cfg.ffn_hidden
    self.w1 = nnx.Param(nnx.initializers.normal(cfg.initializer_range)(rngs.params(), (d, f)),
                        out_sharding=('embed', 'mlp'))
    self.w3 = nnx.Param(nnx.initializers.normal(cfg.initializer_range)(rngs.params(), (d, f)),
                        out_sharding=('embed', 'mlp'))
    self.w2 = nnx.Param(nnx.initializers.normal(cfg.initializer_range)(rngs.params(), (f, d)),
                        out_sharding=('mlp', 'embed'))

  def _mm(self, x, w):
    return jnp.einsum('...i,io->...o', x, w[...].astype(x.dtype))

  def qkv(self, x, pos_add, cos, sin, gemms: int = 1):
    """Projections with Hita's position treatment: + holistic pos (first S positions) then RoPE.
    `gemms` (`qkv_gemms`, the full-sequence forward only): 2 = q|k and v as two products."""
    y = self.attention_norm(x)
    if gemms == 1:
      qkv = checkpoint_name(self._mm(y, self.wqkv), 'qkv')
      return self.positions(*jnp.split(qkv, 3, axis=-1), pos_add, cos, sin)
    # a split (not two slices) of the weight: its gradient is one concatenate
    w_qk, w_v = jnp.split(self.wqkv[...], [2 * self.cfg.dim], axis=-1)
    qk = checkpoint_name(self._mm(y, w_qk), 'qkv')
    v = checkpoint_name(self._mm(y, w_v), 'qkv')
    return self.positions(*jnp.split(qk, 2, axis=-1), v, pos_add, cos, sin)

  def positions(self, q, k, v, pos_add, cos, sin):
    """(B, T, dim) projections -> q, k, v (B, T, H, hd) with the holistic position embedding
    added to q and k, then RoPE. `pos_add` (T or fewer rows): added to the first rows only, so
    the table's gradient reduces over those rows alone (not over T rows, most of them zero)."""
    b, t, _ = q.shape
    h, hd = self.cfg.n_head, self.cfg.head_dim
    q, k, v = (a.reshape(b, t, h, hd) for a in (q, k, v))
    add = pos_add.reshape(pos_add.shape[:-1] + (h, hd)).astype(q.dtype)
    if add.ndim == 3:
      add = add[None]
    s = add.shape[1]
    plus = (lambda a: a + add) if s == t else (
        lambda a: jnp.concatenate([a[:, :s] + add, a[:, s:]], axis=1))
    return apply_rope(plus(q), cos, sin), apply_rope(plus(k), cos, sin), v

  def finish(self, x, o, keys, rows=None):
    """Output projection, residuals and the FFN. keys: (resid, ffn, drop_path) dropout keys;
    `rows`: the real rows of a padded sequence (dropout masks are drawn for those)."""
    b, t = o.shape[:2]
    cfg = self.cfg
    o = checkpoint_name(self._mm(o.reshape(b, t, -1), self.wo), 'attn_out')
    h = x + drop_path(dropout(o, cfg.resid_dropout, keys[0], cfg.dropout_bits, rows, cfg.dropout_rng),
                      cfg.drop_path_rate, keys[2])
    y = self.ffn_norm(h)
    hidden = checkpoint_name(jax.nn.silu(self._mm(y, self.w1)) * self._mm(y, self.w3), 'mlp_hidden')
    out = dropout(self._mm(hidden, self.w2), cfg.ffn_dropout, keys[1], cfg.dropout_bits, rows,
                  cfg.dropout_rng)
    return h + drop_path(out, cfg.drop_path_rate, keys[3])

  def __call__(self, x, pos_add, cos, sin, key=None, rows=None):
    """Full causal sequence (training / teacher forcing); `rows` as in `finish`."""
    keys = list(jax.random.split(key, 5)) if key is not None else [None] * 5
    q, k, v = self.qkv(x, pos_add, cos, sin, gemms=self.cfg.qkv_gemms)
    drop = (functools.partial(dropout, rate=self.cfg.attn_dropout, key=keys[4], rng=self.cfg.dropout_rng)
            if keys[4] is not None and self.cfg.attn_dropout > 0 else None)
    o = causal_attention(q, k, v, impl=self.cfg.attn_impl, dropout=drop)
    return self.finish(x, o, keys, rows)

  def decode(self, x, pos_add, cos, sin, k_cache, v_cache, pos, kv_len: int | None = None,
             w_qkv_rope=None):
    """One position `pos` (scalar) for all batch rows with this layer's (B, H, T_max, hd) cache.
    Heads-major cache layout: the two attention products contract over hd / T with (B, H) as
    batch dimensions, so XLA never transposes the cache. `kv_len` (static, > pos) attends over
    the cache's first kv_len positions only on the XLA path (the read of the cache is most of a
    decode step's memory traffic); the fused kernel reads exactly positions <= pos, and with
    'pallas_write' also writes the new K / V row (`decode_attn_impl`, models/decode_attention.py).
    `decode_layer_impl='pallas'`: the products as fused kernels (models/decode_matmul.py); with
    `w_qkv_rope` (wqkv with q / k columns in half-split order, from `GPT.decode_weights`; then
    `pos_add` is in that order too) the position embedding and RoPE happen in the qkv kernel and
    q / k (so the cache) stay in that order, which leaves the attention unchanged."""
    cfg = self.cfg
    b = x.shape[0]
    fused = cfg.fused_decode_layer
    # the kernels under a mesh: rows (argument 0, and the residual) split over the batch axes,
    # weights replicated (layers.on_batch_shards)
    on_rows = functools.partial(on_batch_shards, batch=b)
    if fused and w_qkv_rope is not None:
      qkv = on_rows(functools.partial(decode_matmul.norm_qkv_rope, n_head=cfg.n_head, eps=cfg.norm_eps),
                    (x[:, 0], self.attention_norm.weight[...], w_qkv_rope, pos_add[0], cos[0], sin[0]),
                    split=(0,), n_out=3)
      q, k, v = (a.reshape(b, 1, cfg.n_head, cfg.head_dim) for a in qkv)
    elif fused:
      qkv = on_rows(functools.partial(decode_matmul.norm_matmul, eps=cfg.norm_eps),
                    (x[:, 0], self.attention_norm.weight[...], self.wqkv[...]), split=(0,))
      q, k, v = self.positions(*jnp.split(qkv[:, None], 3, axis=-1), pos_add, cos, sin)
    else:
      q, k, v = self.qkv(x, pos_add, cos, sin)                  # (B, 1, H, hd)
    o, k_cache, v_cache = decode_attention_update(q[:, 0], k[:, 0], v[:, 0], k_cache, v_cache, pos,
                                                  impl=cfg.decode_attn_impl, kv_len=kv_len)
    if not fused:
      o = o[:, None].astype(x.dtype)
      return self.finish(x, o, [None] * 4), k_cache, v_cache
    residual = lambda a, w, r: on_rows(decode_matmul.matmul_residual, (a, w, r), split=(0, 2))
    h = residual(o.reshape(b, -1).astype(x.dtype), self.wo[...], x[:, 0])
    swiglu = lambda y, g, w1, w3: decode_matmul.norm_matmul(y, g, w1, w_gate=w3, eps=cfg.norm_eps)
    hidden = on_rows(swiglu, (h, self.ffn_norm.weight[...], self.w1[...], self.w3[...]), split=(0,))
    out = residual(hidden, self.w2[...], h)
    return out[:, None], k_cache, v_cache


class GPT(nnx.Module):

  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, v = cfg.dim, cfg.vocab_size
    normal = nnx.initializers.normal(cfg.initializer_range)
    n_cls = cfg.num_classes + (1 if cfg.class_dropout_prob > 0 else 0)
    self.class_embedding = nnx.Param(normal(rngs.params(), (n_cls, d)), out_sharding=(None, 'embed'))
    self.patch_embedding = nnx.Param(normal(rngs.params(), (v, d)), out_sharding=('vocab', 'embed'))
    self.holistic_embedding = nnx.Param(normal(rngs.params(), (v, d)), out_sharding=('vocab', 'embed'))
    self.holistic_pos = nnx.Param(normal(rngs.params(), (cfg.num_holistic, d)),
                                  out_sharding=(None, 'embed'))

    @nnx.split_rngs(splits=cfg.n_layer)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=cfg.n_layer,
              transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make_blocks(r):
      return Block(cfg, rngs=r)

    self.blocks = make_blocks(rngs)
    self.norm = RMSNorm(d, cfg.norm_eps)
    # Zero-initialised 2V head: [:, :V] holistic, [:, V:] patch (official `output`).
    self.head = nnx.Param(jnp.zeros((d, 2 * v), jnp.float32), out_sharding=('embed', 'vocab'))

  # -- helpers --------------------------------------------------------------------------------
  @property
  def compute_dtype(self):
    return DTYPES[self.cfg.dtype]

  def position_tables(self, length: int):
    cfg = self.cfg
    is_hol, cos, sin = gpt_position_tables(cfg.num_holistic, cfg.grid, cfg.head_dim, cfg.rope_base,
                                           max(length, cfg.num_holistic + 1))
    return is_hol[:length], jnp.asarray(cos[:length]), jnp.asarray(sin[:length])

  def pos_add(self, length: int):
    """(min(length, S), dim): the holistic position embedding of the first positions (the rest
    get none; `Block.positions` adds it to the first rows)."""
    return self.holistic_pos[...].astype(self.compute_dtype)[:length]

  def logits(self, h):
    h = self.norm(h)
    return logits_fp32(h, self.head[...].astype(h.dtype))

  def drop_labels(self, labels, key):
    if key is None or self.cfg.class_dropout_prob <= 0:
      return labels
    drop = jax.random.uniform(key, labels.shape) < self.cfg.class_dropout_prob
    return jnp.where(drop, self.cfg.null_class, labels)

  def _layer_loop(self, x, fn, keys=None):
    """Applies fn(block, x, key) over the stacked layers (scan or unrolled), with remat."""
    graphdef, state = nnx.split(self.blocks)
    policy = REMAT_POLICIES[self.cfg.remat]

    def body(x, layer_state, key):
      return fn(nnx.merge(graphdef, layer_state, copy=True), x, key)
    if self.cfg.remat != 'none':
      body = jax.checkpoint(body, policy=policy, prevent_cse=not self.cfg.scan_layers)
    if self.cfg.scan_layers:
      def step(x, xs):
        layer_state, key = xs
        return body(x, layer_state, key), None
      x, _ = jax.lax.scan(step, x, (state, keys))
      return x
    for i, layer_state in enumerate(unstack_layers(state, self.cfg.n_layer)):
      x = body(x, layer_state, None if keys is None else keys[i])
    return x

  # -- full sequence --------------------------------------------------------------------------
  def embed_sequence(self, labels, holistic_codes, patch_codes):
    """[class, q_0..q_{S-1}, z_0..z_{n-2}] embeddings for n given patch codes."""
    dt = self.compute_dtype
    cls = jnp.take(self.class_embedding[...], labels, axis=0)[:, None]
    hol = jnp.take(self.holistic_embedding[...], holistic_codes, axis=0)
    pat = jnp.take(self.patch_embedding[...], patch_codes[:, :-1], axis=0)
    return jnp.concatenate([cls, hol, pat], axis=1).astype(dt)

  def hidden(self, labels, holistic_codes, patch_codes, *, rng=None):
    """Final hidden states (B, S + n, dim), before the output norm. `rng` turns on the
    training-time randomness (label drop, token/resid/FFN dropout)."""
    if holistic_codes.shape[1] != self.cfg.num_holistic:
      raise ValueError(f'expected {self.cfg.num_holistic} holistic codes, got {holistic_codes.shape}')
    if patch_codes.shape[1] > self.cfg.num_patches:
      raise ValueError(f'at most {self.cfg.num_patches} patch codes, got {patch_codes.shape[1]}')
    keys = jax.random.split(rng, 3) if rng is not None else [None] * 3
    labels = self.drop_labels(labels, keys[0])
    x = dropout(self.embed_sequence(labels, holistic_codes, patch_codes), self.cfg.token_dropout, keys[1],
                self.cfg.dropout_bits, rng=self.cfg.dropout_rng)
    t = x.shape[1]
    # one pad of the sequence to the attention kernel's block (cuDNN: 64) instead of one per layer
    # of q, k, v and the output; the padded rows come last, so the causal mask hides them from
    # every real row, and they are dropped before the norm and the head
    # (attention-probability dropout takes the XLA path, which needs no padding)
    attn_dropout = rng is not None and self.cfg.attn_dropout > 0
    tp = t + (0 if attn_dropout else causal_pad(t, self.cfg.attn_impl))
    x = jnp.pad(x, ((0, 0), (0, tp - t), (0, 0)))
    rows = t if tp > t else None
    _, cos, sin = self.position_tables(tp)
    add = self.pos_add(tp)
    layer_keys = jax.random.split(keys[2], self.cfg.n_layer) if keys[2] is not None else None
    return self._layer_loop(x, lambda blk, h, key: blk(h, add, cos, sin, key, rows),
                            layer_keys)[:, :t]

  def __call__(self, labels, holistic_codes, patch_codes, *, rng=None):
    """Teacher-forced logits (B, S + n, 2V) in fp32; row p predicts token p of cat(q, z)."""
    return self.logits(self.hidden(labels, holistic_codes, patch_codes, rng=rng))

  def split_logits(self, logits):
    """(B, T, 2V) -> holistic logits of rows < S and patch logits of rows >= S."""
    s, v = self.cfg.num_holistic, self.cfg.vocab_size
    return logits[:, :s, :v], logits[:, s:, v:]

  def loss(self, labels, holistic_codes, patch_codes, *, rng=None):
    """Official loss terms: (CE over holistic positions, CE over patch positions), each a mean.
    The official model computes all 2V logits at every row and keeps one half per row; the other
    half never reaches the loss, so each row multiplies only its own half of the head (same values
    and gradients, half the head FLOPs and logits memory)."""
    h = self.norm(self.hidden(labels, holistic_codes, patch_codes, rng=rng))
    # splits, not two slices each: a split's gradient is one concatenate, two slices' are two
    # pads to the whole array and their sum (the hidden rows' and the 2V head's gradients)
    h_holistic, h_patch = jnp.split(h, [self.cfg.num_holistic], axis=1)
    head_holistic, head_patch = jnp.split(self.head[...].astype(h.dtype), 2, axis=1)
    return (head_cross_entropy(h_holistic, head_holistic, holistic_codes),
            head_cross_entropy(h_patch, head_patch, patch_codes))

  # -- incremental decoding ---------------------------------------------------------------------
  def init_cache(self, batch: int, max_len: int | None = None, dtype=None):
    """KV cache: per layer (B, H, T_max, hd) arrays. Unrolled layers keep one array per layer so
    each step writes one position in place and attends over its own buffer (no per-layer slicing
    copies of a stacked cache, which dominated decode time); scanned layers keep a stacked array
    in the carry, written in place at (layer, pos)."""
    cfg = self.cfg
    t = find_multiple(max_len or cfg.seq_len, 8)
    shape = (batch, cfg.n_head, t, cfg.head_dim)
    dt = dtype or self.compute_dtype
    if cfg.scan_layers:
      full = (cfg.n_layer,) + shape
      return {'k': jnp.zeros(full, dt), 'v': jnp.zeros(full, dt)}
    return {'k': tuple(jnp.zeros(shape, dt) for _ in range(cfg.n_layer)),
            'v': tuple(jnp.zeros(shape, dt) for _ in range(cfg.n_layer))}

  def embed_step(self, labels, tokens, pos, *, legacy_pos128_embedding: bool = False):
    """Input embedding at position `pos`: the class at 0, else the previous token through the
    holistic table (pos <= S) or the patch table. `legacy_pos128_embedding` reproduces the released
    sampler, which feeds q_{S-1} at pos = S through the patch table (spec section 5)."""
    s = self.cfg.num_holistic
    cls = jnp.take(self.class_embedding[...], labels, axis=0)
    hol = jnp.take(self.holistic_embedding[...], tokens, axis=0)
    pat = jnp.take(self.patch_embedding[...], tokens, axis=0)
    use_hol = (pos < s) if legacy_pos128_embedding else (pos <= s)
    x = jnp.where(pos == 0, cls, jnp.where(use_hol, hol, pat))
    return x[:, None].astype(self.compute_dtype)

  def decode_weights(self):
    """Loop-invariant views of the weights for `decode_step`, made once outside a decode loop:
    per-layer slices of the stacked layers (slicing inside the loop made XLA copy every layer's
    weights at every step) and the two head halves (so a step multiplies by one half only)."""
    graphdef, state = nnx.split(self.blocks)
    cfg = self.cfg
    v = cfg.vocab_size
    head = self.head[...]
    layers = state if cfg.scan_layers else unstack_layers(state, cfg.n_layer)
    w = {'graphdef': graphdef, 'layers': layers, 'head': (head[:, :v], head[:, v:])}
    mesh = jax.sharding.get_abstract_mesh()
    if cfg.fused_decode_layer and not mesh.empty and mesh.size > 1:
      # the kernels take whole weights (`on_batch_shards` replicates them): gathered once per generate,
      # not in every step, when a mesh shards them (FSDP / tensor presets)
      rep = jax.sharding.PartitionSpec()
      w['layers'] = jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, rep), w['layers'])
      w['head'] = tuple(jax.lax.with_sharding_constraint(h, rep) for h in w['head'])
    if cfg.fused_decode_layer and decode_matmul.rope_fits(cfg.head_dim):
      # q / k columns (and the holistic position table) in half-split order for the qkv kernel
      perm = decode_matmul.half_split_columns(cfg.n_head, cfg.head_dim)
      cols = jnp.concatenate([perm, perm + cfg.dim, jnp.arange(2 * cfg.dim, 3 * cfg.dim)])
      wqkv = state['wqkv'][...][..., cols]
      w['qkv_rope'] = wqkv if cfg.scan_layers else [wqkv[i] for i in range(cfg.n_layer)]
      w['holistic_pos_rope'] = self.holistic_pos[...][:, perm]
    return w

  def decode_step(self, x, cache, pos, weights=None, *, kv_len: int | None = None,
                  head: str | None = None):
    """x (B, 1, dim) at scalar position `pos` -> (head-selected logits (B, V) fp32, cache).
    Pass `weights=self.decode_weights()` computed outside the decode loop. Static hints for a
    loop over a known range of positions: `kv_len` (> every pos of the range) bounds the cache
    read; `head` ('holistic' when every pos < S, 'patch' when every pos >= S) picks the head
    without a data-dependent branch."""
    cfg = self.cfg
    w = weights or self.decode_weights()
    graphdef = w['graphdef']
    t_max = cache['k'][0].shape[-2]
    _, cos, sin = self.position_tables(t_max)
    cos_p = jax.lax.dynamic_slice_in_dim(cos, pos, 1)
    sin_p = jax.lax.dynamic_slice_in_dim(sin, pos, 1)
    s = cfg.num_holistic
    rope = w.get('qkv_rope')  # fused qkv + RoPE: the position table in the kernel's column order
    table = w['holistic_pos_rope'] if rope is not None else self.holistic_pos[...]
    row = jax.lax.dynamic_slice_in_dim(table, jnp.minimum(pos, s - 1), 1)
    add_p = jnp.where(pos < s, row, 0).astype(self.compute_dtype)

    if cfg.scan_layers:
      def body(carry, xs):
        layer_state, w_rope = xs
        h, i, k_all, v_all = carry
        blk = nnx.merge(graphdef, layer_state, copy=True)
        kc = jax.lax.dynamic_index_in_dim(k_all, i, keepdims=False)
        vc = jax.lax.dynamic_index_in_dim(v_all, i, keepdims=False)
        h, kc, vc = blk.decode(h, add_p, cos_p, sin_p, kc, vc, pos, kv_len, w_rope)
        k_new = jax.lax.dynamic_slice_in_dim(kc, pos, 1, axis=2)[None]
        v_new = jax.lax.dynamic_slice_in_dim(vc, pos, 1, axis=2)[None]
        k_all = jax.lax.dynamic_update_slice(k_all, k_new, (i, 0, 0, pos, 0))
        v_all = jax.lax.dynamic_update_slice(v_all, v_new, (i, 0, 0, pos, 0))
        return (h, i + 1, k_all, v_all), None
      (x, _, k, v), _ = jax.lax.scan(body, (x, 0, cache['k'], cache['v']), (w['layers'], rope))
      cache = {'k': k, 'v': v}
    else:
      ks, vs = list(cache['k']), list(cache['v'])
      for i, layer_state in enumerate(w['layers']):
        blk = nnx.merge(graphdef, layer_state, copy=True)
        x, ks[i], vs[i] = blk.decode(x, add_p, cos_p, sin_p, ks[i], vs[i], pos, kv_len,
                                     None if rope is None else rope[i])
      cache = {'k': tuple(ks), 'v': tuple(vs)}
    if cfg.fused_decode_layer:  # the output norm inside the head's product
      norm_head = functools.partial(decode_matmul.norm_matmul, eps=cfg.norm_eps, out_dtype=jnp.float32)
      mm = lambda head: on_batch_shards(norm_head, (x[:, 0], self.norm.weight[...], head), split=(0,),
                                        batch=x.shape[0])
    else:
      h = self.norm(x)[:, 0]
      mm = lambda head: jnp.einsum('bd,dv->bv', h, head.astype(h.dtype),
                                   preferred_element_type=jnp.float32)
    # Holistic head below S, patch head from S on; only one of them is computed.
    if head is None:
      logits = jax.lax.cond(pos < s, lambda: mm(w['head'][0]), lambda: mm(w['head'][1]))
    elif head in ('holistic', 'patch'):
      logits = mm(w['head'][0 if head == 'holistic' else 1])
    else:
      raise ValueError(f"head must be None, 'holistic' or 'patch', got {head!r}")
    return logits, cache


def unstack_layers(state, n: int) -> list:
  """The per-layer states of stacked (n, ...) layer parameters, by one split per parameter rather
  than a[i] per layer: a split's gradient is one concatenate of the layers' gradients, a[i]'s a pad
  to the whole stack per layer, summed over the layers (O(n^2) gradient traffic)."""
  leaves, treedef = jax.tree.flatten(state)
  per_leaf = [[p[0] for p in jnp.split(a, n, axis=0)] for a in leaves]
  return [jax.tree.unflatten(treedef, [layers[i] for layers in per_leaf]) for i in range(n)]


@jax.custom_vjp
def logits_fp32(h, head):
  """h @ head accumulated and returned in fp32: `GPT.logits` (teacher-forced and inference logits,
  as the decode step's head). Its backward casts the fp32 cotangent to the operands' dtype before
  the two products: autodiff's would multiply it by the bf16 operands, which XLA runs as fp32 GEMMs
  (5.5x the forward's time on an H200). The training loss takes `head_cross_entropy` instead."""
  return jnp.einsum('...d,dv->...v', h, head, preferred_element_type=jnp.float32)


def _logits_fp32_fwd(h, head):
  return logits_fp32(h, head), (h, head)


def _logits_fp32_bwd(res, g):
  h, head = res
  g = g.astype(jnp.result_type(h, head))  # the GEMMs still accumulate in fp32
  d_h = jnp.einsum('...v,dv->...d', g, head).astype(h.dtype)
  d_head = jnp.einsum('nd,nv->dv', h.reshape(-1, h.shape[-1]), g.reshape(-1, g.shape[-1]))
  return d_h, d_head.astype(head.dtype)


logits_fp32.defvjp(_logits_fp32_fwd, _logits_fp32_bwd)


def head_cross_entropy(h, head, targets):
  """Mean CE of the logits h @ head against targets, as the official step takes it: the product in
  the operands' dtype (under bf16 autocast `self.output(h)` is a bf16 Linear: fp32 accumulation,
  bf16 result), then `.float()` and the loss in fp32. The CE's backward returns the cotangent in
  that dtype, so the two backward products are bf16 GEMMs as the official ones, and the logits
  kept for the backward (the step's largest array) are half the bytes of fp32 ones."""
  return cross_entropy(jnp.einsum('...d,dv->...v', h, head), targets)


def cross_entropy(logits, targets):
  """Mean of logsumexp(logits) - logits[target], computed in fp32 (no log-softmax array). A
  negative target counts from the end, as indexing does (forward and backward alike)."""
  targets = targets.astype(jnp.int32)
  targets = jnp.where(targets < 0, targets + logits.shape[-1], targets)
  return jnp.mean(_ce_rows(logits, targets))


@jax.custom_vjp
def _ce_rows(logits, targets):
  """Per-row logsumexp(x) - x[target] of x = logits in fp32. Its backward is one element-wise
  expression, softmax(x) - onehot(target), returned in the logits' dtype: autodiff's gradient of
  the picked logit is a scatter into zeros, and XLA cannot fuse the cast of a scatter's output into
  it (on one H100, GPT-B batch 64: a 2.4 GB fp32 gradient written, read again and cast, 3.3 ms of
  a 63 ms step)."""
  return _ce_rows_fwd(logits, targets)[0]


def _ce_rows_fwd(logits, targets):
  x = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(x, axis=-1)
  picked = jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0]
  return lse - picked, (logits, targets, lse)


def _ce_rows_bwd(res, g):
  logits, targets, lse = res
  x = logits.astype(jnp.float32)
  onehot = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1) == targets[..., None]
  d = (jnp.exp(x - lse[..., None]) - onehot.astype(jnp.float32)) * g[..., None]
  return d.astype(logits.dtype), None


_ce_rows.defvjp(_ce_rows_fwd, _ce_rows_bwd)


def gpt_config_from(cfg) -> GPTConfig:
  d = cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg)
  return GPTConfig.from_dict(d)

