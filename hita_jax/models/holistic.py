"""Hita's holistic encoder and fusion decoder (official `hita.core.layers.Encoder/Decoder`).

Encoder: learnable holistic tokens + projected DINOv2 tokens + CNN patch tokens (with a position
table) go through E_trans (bidirectional), the DINOv2 tokens are dropped, and [holistic, patch] go
through E_causal (causal mask). Decoder (fusion): [holistic + slot positions, patch + positions] go
through a causal transformer whose outputs at [S - k, S - k + N) feed the CNN decoder (the "last k"
readout: grid cells 0..k-1 come from the last k holistic outputs, the last k patch codes are dead).
Hita-U adds a VFM head that regresses DINOv2 patch features from the holistic tokens.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from hita_jax.models.dropout import module_dropout
from hita_jax.models.layers import LayerNorm, SwiGLUFused, attention, causal_mask, dense, full_attention
from hita_jax.models.resize import interpolate_pos_table

LN_EPS = 1e-5


def _table_init(rngs, shape, dim):
  # official: randn * dim^-0.5
  return jax.random.normal(rngs.params(), shape, jnp.float32) * dim ** -0.5


def xavier_linears(module: nnx.Module, key) -> None:
  """Re-initialises every Linear below `module` as the official fusion decoder does:
  xavier-uniform weights, zero biases (the encoder's stacks keep PyTorch's default init, because
  the official Encoder's xavier loop never matches a Linear; spec 2.4)."""
  init = nnx.initializers.xavier_uniform()
  # One key per Linear by its rank among the Linears: a module's other attributes (which
  # iter_graph also yields) do not move the draws.
  linears = [node for _, node in nnx.iter_graph(module) if isinstance(node, nnx.Linear)]
  for i, node in enumerate(linears):
    node.kernel[...] = init(jax.random.fold_in(key, i), node.kernel.shape, jnp.float32)
    if node.bias is not None:
      node.bias[...] = jnp.zeros_like(node.bias[...])


class HolisticLayer(nnx.Module):
  """Pre-LN layer `x + Attn(LN(x)); x + SwiGLU(LN(x))`.

  kind='bidirectional' is E_trans's `CrossAttention` (no qkv bias, heads*head_dim inner width,
  dropout on the attention output); kind='causal' is `Attention3` (qkv bias, inner width = dim,
  dropout on the attention probabilities, used with a mask).
  """

  def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_dim: int, *, kind: str,
               dropout: float = 0.0, attn_impl: str = 'xla', dropout_rng: str = 'threefry',
               dtype=jnp.float32, rngs: nnx.Rngs):
    if kind not in ('bidirectional', 'causal'):
      raise ValueError(kind)
    self.kind = kind
    # E_trans's unmasked attention may take a fused kernel; the causal kind drops probabilities
    # in training, which the fused kernels cannot, so it keeps the reference path.
    self.attn_impl = attn_impl
    self.dropout_rng = dropout_rng  # 'hash': masks recomputed in the backward (models/dropout.py)
    self.num_heads = num_heads
    self.head_dim = head_dim if kind == 'bidirectional' else dim // num_heads
    inner = self.num_heads * self.head_dim
    bias = kind == 'causal'
    self.norm1 = LayerNorm(dim, eps=LN_EPS, rngs=rngs)
    self.q = dense(dim, inner, names=('embed', 'heads'), use_bias=bias, dtype=dtype, rngs=rngs)
    self.k = dense(dim, inner, names=('embed', 'heads'), use_bias=bias, dtype=dtype, rngs=rngs)
    self.v = dense(dim, inner, names=('embed', 'heads'), use_bias=bias, dtype=dtype, rngs=rngs)
    self.out = dense(inner, dim, names=('heads', 'embed'), dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.norm2 = LayerNorm(dim, eps=LN_EPS, rngs=rngs)
    self.ffn = SwiGLUFused(dim, mlp_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x, mask=None):
    b, t, _ = x.shape
    y = self.norm1(x)
    split = lambda z: z.reshape(b, t, self.num_heads, self.head_dim)
    q, k, v = split(self.q(y)), split(self.k(y)), split(self.v(y))
    drop = functools.partial(module_dropout, self.dropout, rng=self.dropout_rng)
    if self.kind == 'causal':
      o = attention(q, k, v, mask=mask,
                    dropout=None if self.dropout.deterministic or not self.dropout.rate else drop)
      o = self.out(o.reshape(b, t, -1))
    else:
      o = attention(q, k, v, mask=mask) if mask is not None else full_attention(
          q, k, v, impl=self.attn_impl)
      o = drop(self.out(o.reshape(b, t, -1)))
    x = x + o
    return x + self.ffn(self.norm2(x))


class HolisticStack(nnx.Module):

  def __init__(self, depth: int, *args, **kwargs):
    self.layers = nnx.List([HolisticLayer(*args, **kwargs) for _ in range(depth)])

  def __call__(self, x, mask=None):
    for layer in self.layers:
      x = layer(x, mask)
    return x


class DinoProjection(nnx.Module):
  """Official `build_mlp(in, dim, dim, 2)`: Linear(no bias) -> LN -> ReLU -> Linear(no bias) -> LN."""

  def __init__(self, in_dim: int, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.fc1 = dense(in_dim, dim, names=(None, 'embed'), use_bias=False, dtype=dtype, rngs=rngs)
    self.norm1 = LayerNorm(dim, eps=LN_EPS, rngs=rngs)
    self.fc2 = dense(dim, dim, names=('embed', None), use_bias=False, dtype=dtype, rngs=rngs)
    self.norm2 = LayerNorm(dim, eps=LN_EPS, rngs=rngs)

  def __call__(self, x):
    return self.norm2(self.fc2(jax.nn.relu(self.norm1(self.fc1(x)))))


def pos_table_for_grid(table, grid: int, hw: tuple[int, int]):
  """Official Hita pos-table resize: unchanged when the grid matches, else bicubic (no antialias)
  with `scale_factor = (g + 0.1) / G` (PyTorch maps coordinates with that factor)."""
  if hw[0] * hw[1] == grid * grid and hw[0] == hw[1]:
    return table
  return interpolate_pos_table(table, grid, hw, offset=0.1, antialias=False)


class HolisticEncoder(nnx.Module):

  def __init__(self, *, dim: int, dino_dim: int, num_holistic: int, pos_grid: int, depth: int,
               num_heads: int, head_dim: int, mlp_dim: int, dropout: float = 0.1,
               attn_impl: str = 'xla', dropout_rng: str = 'threefry', dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.num_holistic = num_holistic
    self.pos_grid = pos_grid
    self.dtype = dtype
    self.dino_proj = DinoProjection(dino_dim, dim, dtype=dtype, rngs=rngs)
    self.holistic_tokens = nnx.Param(_table_init(rngs, (num_holistic, dim), dim),
                                     out_sharding=(None, 'embed'))
    self.pos_embed = nnx.Param(_table_init(rngs, (pos_grid * pos_grid, dim), dim),
                               out_sharding=(None, 'embed'))
    self.norm_pre1 = LayerNorm(dim, eps=LN_EPS, rngs=rngs)
    self.e_trans = HolisticStack(depth, dim, num_heads, head_dim, mlp_dim, kind='bidirectional',
                                 dropout=dropout, attn_impl=attn_impl, dropout_rng=dropout_rng,
                                 dtype=dtype, rngs=rngs)
    self.norm_pre2 = LayerNorm(dim, eps=LN_EPS, rngs=rngs)
    self.e_causal = HolisticStack(depth, dim, num_heads, head_dim, mlp_dim, kind='causal',
                                  dropout=dropout, dropout_rng=dropout_rng, dtype=dtype, rngs=rngs)

  def patch_pos_embed(self, h: int, w: int):
    return pos_table_for_grid(self.pos_embed[...], self.pos_grid, (h, w))

  def __call__(self, cnn_features, dino_features, *, return_intermediates: bool = False):
    """cnn_features (B, h, w, C), dino_features (B, 1+M, C_dino) ->
    holistic (B, S, C), patch (B, h*w, C)."""
    b, h, w, c = cnn_features.shape
    s = self.num_holistic
    dino = self.dino_proj(dino_features.astype(self.dtype))
    patch = cnn_features.reshape(b, h * w, c) + self.patch_pos_embed(h, w).astype(cnn_features.dtype)
    hol = jnp.broadcast_to(self.holistic_tokens[...].astype(patch.dtype), (b, s, c))
    m = dino.shape[1]
    x = self.e_trans(self.norm_pre1(jnp.concatenate([hol, dino.astype(patch.dtype), patch], 1)))
    e_trans_out = x
    x = jnp.concatenate([x[:, :s], x[:, s + m:]], axis=1)
    x = self.e_causal(self.norm_pre2(x), causal_mask(x.shape[1]))
    out = (x[:, :s], x[:, s:])
    if return_intermediates:
      return out + ({'proj_features': dino, 'e_trans_out': e_trans_out},)
    return out


class FusionDecoder(nnx.Module):

  def __init__(self, *, dim: int, num_holistic: int, pos_grid: int, depth: int, num_heads: int,
               mlp_dim: int, shift_k: int = 4, dropout: float = 0.1, vfm: bool = False,
               vfm_out_dim: int = 1024, vfm_grid: int = 16, dropout_rng: str = 'threefry',
               dtype=jnp.float32, rngs: nnx.Rngs):
    if not 0 <= shift_k <= num_holistic:
      raise ValueError(f'shift_k={shift_k} must lie in [0, num_holistic={num_holistic}]')
    self.num_holistic = num_holistic
    self.pos_grid = pos_grid
    self.shift_k = shift_k
    self.vfm_grid = vfm_grid
    self.position_embedding = nnx.Param(_table_init(rngs, (pos_grid * pos_grid, dim), dim),
                                        out_sharding=(None, 'embed'))
    self.holistic_position_embedding = nnx.Param(_table_init(rngs, (num_holistic, dim), dim),
                                                 out_sharding=(None, 'embed'))
    self.transformer = HolisticStack(depth, dim, num_heads, dim // num_heads, mlp_dim,
                                     kind='causal', dropout=dropout, dropout_rng=dropout_rng,
                                     dtype=dtype, rngs=rngs)
    self.norm = LayerNorm(dim, eps=LN_EPS, rngs=rngs)
    self.vfm = vfm
    if vfm:
      self.mask_embedding = nnx.Param(_table_init(rngs, (dim,), dim), out_sharding=('embed',))
      self.norm_vfm = LayerNorm(dim, eps=LN_EPS, rngs=rngs)
      self.vfm_proj = dense(dim, vfm_out_dim, names=('embed', None), dtype=dtype, rngs=rngs)
    xavier_linears(self, rngs.params())

  def patch_pos_embed(self, h: int, w: int):
    # The official decoder passes (W, H) where the encoder passes (H, W); identical when square.
    return pos_table_for_grid(self.position_embedding[...], self.pos_grid, (w, h))

  def __call__(self, patch_features, holistic, *, return_intermediates: bool = False):
    """patch_features (B, h, w, C) post-quant, holistic (B, S, C) post-quant ->
    CNN-decoder input (B, h, w, C) [, intermediates]."""
    b, h, w, c = patch_features.shape
    s, n = self.num_holistic, h * w
    mem = holistic + self.holistic_position_embedding[...].astype(holistic.dtype)
    tok = (patch_features.reshape(b, n, c)
           + self.patch_pos_embed(h, w).astype(patch_features.dtype))
    x = self.norm(jnp.concatenate([mem, tok], axis=1))
    x = self.transformer(x, causal_mask(s + n))
    k = self.shift_k
    out = x[:, s - k:s - k + n].reshape(b, h, w, c)
    if return_intermediates:
      return out, {'fusion_out': x}
    return out

  def vfm_prediction(self, holistic):
    """Hita-U: DINOv2 patch features (B, g*g, vfm_out_dim) predicted from the post-quant holistic
    tokens, with the fusion transformer's own weights, `norm_vfm` and mask tokens."""
    b, s, c = holistic.shape
    g = self.vfm_grid
    pos = pos_table_for_grid(self.position_embedding[...], self.pos_grid, (g, g))
    lat = jnp.broadcast_to((self.mask_embedding[...] + pos).astype(holistic.dtype), (b, g * g, c))
    x = self.norm_vfm(jnp.concatenate([holistic, lat], axis=1))
    t = s + g * g
    allow = jnp.ones((t, t), bool)
    allow = allow.at[:s, :s].set(causal_mask(s)).at[:s, s:].set(False)  # holistic: causal, blind
    x = self.transformer(x, allow)
    return self.vfm_proj(x[:, s:]).astype(jnp.float32)
