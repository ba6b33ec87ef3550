"""DINOv2 ViT (with or without register tokens), as Hita's frozen semantic encoder.

Patch 14 conv embedding, CLS token, learned position table (trained at 518 -> 37x37) resized to the
input grid with PyTorch's bicubic (antialiased for the register models, offset 0.0; plain bicubic with
offset 0.1 for the original models), registers inserted after the position embedding, pre-LN blocks
with LayerScale, qkv bias, exact (erf) GELU, LayerNorm eps 1e-6, final LayerNorm.
`features()` returns [CLS, patch tokens] after the final norm, registers dropped (what Hita feeds on).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from hita_jax.models.layers import LayerNorm, conv, dense, full_attention
from hita_jax.models.resize import interpolate_pos_table, kornia_bicubic_resize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class DinoV2Config:
  embed_dim: int = 1024
  depth: int = 24
  num_heads: int = 16
  mlp_ratio: float = 4.0
  patch_size: int = 14
  img_size: int = 518            # size the position table was trained for
  num_register_tokens: int = 4
  layer_norm_eps: float = 1e-6
  interpolate_antialias: bool = True
  interpolate_offset: float = 0.0
  qkv_bias: bool = True

  @property
  def pos_grid(self) -> int:
    return self.img_size // self.patch_size

  @property
  def mlp_dim(self) -> int:
    return int(self.embed_dim * self.mlp_ratio)


# Meta's torch.hub variants (the reg4 models interpolate with antialias and no offset).
DINOV2_VARIANTS = {
    'vits14_reg4': DinoV2Config(384, 12, 6),
    'vitb14_reg4': DinoV2Config(768, 12, 12),
    'vitl14_reg4': DinoV2Config(1024, 24, 16),
    'vitg14_reg4': DinoV2Config(1536, 40, 24),
    'vitl14': DinoV2Config(1024, 24, 16, num_register_tokens=0, interpolate_antialias=False,
                           interpolate_offset=0.1),
}


class DinoBlock(nnx.Module):

  def __init__(self, cfg: DinoV2Config, *, dtype, attn_impl: str = 'xla', rngs: nnx.Rngs):
    d = cfg.embed_dim
    self.num_heads = cfg.num_heads
    self.attn_impl = attn_impl
    self.norm1 = LayerNorm(d, eps=cfg.layer_norm_eps, rngs=rngs)
    self.qkv = dense(d, 3 * d, names=('embed', 'heads'), use_bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
    self.proj = dense(d, d, names=('heads', 'embed'), dtype=dtype, rngs=rngs)
    self.ls1 = nnx.Param(jnp.ones((d,), jnp.float32), out_sharding=('norm',))
    self.norm2 = LayerNorm(d, eps=cfg.layer_norm_eps, rngs=rngs)
    self.fc1 = dense(d, cfg.mlp_dim, names=('embed', 'mlp'), dtype=dtype, rngs=rngs)
    self.fc2 = dense(cfg.mlp_dim, d, names=('mlp', 'embed'), dtype=dtype, rngs=rngs)
    self.ls2 = nnx.Param(jnp.ones((d,), jnp.float32), out_sharding=('norm',))

  def __call__(self, x):
    b, t, d = x.shape
    qkv = self.qkv(self.norm1(x)).reshape(b, t, 3, self.num_heads, d // self.num_heads)
    o = full_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], impl=self.attn_impl)
    x = x + self.proj(o.reshape(b, t, d)) * self.ls1[...].astype(x.dtype)
    h = self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False))
    return x + h * self.ls2[...].astype(x.dtype)


class DinoV2(nnx.Module):

  def __init__(self, cfg: DinoV2Config, *, dtype=jnp.float32, scan_blocks: bool = False,
               attn_impl: str = 'xla', rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.embed_dim
    self.dtype = dtype
    self.scan_blocks = scan_blocks
    self.patch_embed = conv(3, d, cfg.patch_size, stride=cfg.patch_size, padding='VALID',
                            dtype=dtype, rngs=rngs)
    init = nnx.initializers.normal(0.02)
    self.cls_token = nnx.Param(init(rngs.params(), (d,)), out_sharding=('embed',))
    self.pos_embed = nnx.Param(init(rngs.params(), (1 + cfg.pos_grid ** 2, d)),
                               out_sharding=(None, 'embed'))
    self.register_tokens = (nnx.Param(init(rngs.params(), (cfg.num_register_tokens, d)),
                                      out_sharding=(None, 'embed'))
                            if cfg.num_register_tokens else None)
    self.mask_token = nnx.Param(jnp.zeros((d,), jnp.float32), out_sharding=('embed',))
    self.blocks = nnx.List([DinoBlock(cfg, dtype=dtype, attn_impl=attn_impl, rngs=rngs)
                            for _ in range(cfg.depth)])
    self.norm = LayerNorm(d, eps=cfg.layer_norm_eps, rngs=rngs)

  def interpolated_pos_embed(self, gh: int, gw: int) -> jnp.ndarray:
    """(1 + gh*gw, C) position table for a gh x gw patch grid (official interpolate_pos_encoding)."""
    pos = self.pos_embed[...].astype(jnp.float32)
    g = self.cfg.pos_grid
    if gh * gw == g * g and gh == gw:
      return pos
    patch = interpolate_pos_table(pos[1:], g, (gh, gw), offset=self.cfg.interpolate_offset,
                                  antialias=self.cfg.interpolate_antialias)
    return jnp.concatenate([pos[:1], patch], axis=0)

  def __call__(self, x):
    """x: (B, H, W, 3) ImageNet-normalised -> all tokens after the final norm (B, 1+R+N, C)."""
    b, h, w, _ = x.shape
    p = self.cfg.patch_size
    if h % p or w % p:
      raise ValueError(f'DINOv2 input {h}x{w} is not a multiple of the patch size {p}')
    t = self.patch_embed(x.astype(self.dtype))
    gh, gw = t.shape[1], t.shape[2]
    t = t.reshape(b, gh * gw, -1)
    cls = jnp.broadcast_to(self.cls_token[...].astype(t.dtype), (b, 1, t.shape[-1]))
    t = jnp.concatenate([cls, t], axis=1) + self.interpolated_pos_embed(gh, gw).astype(t.dtype)
    if self.register_tokens is not None:
      reg = jnp.broadcast_to(self.register_tokens[...].astype(t.dtype), (b,) + self.register_tokens.shape)
      t = jnp.concatenate([t[:, :1], reg, t[:, 1:]], axis=1)
    return self.norm(self._blocks(t))

  def _blocks(self, t):
    if not self.scan_blocks:
      for blk in self.blocks:
        t = blk(t)
      return t
    # One lax.scan over the blocks' weights stacked inside the call: a program with one block
    # instead of `depth` (the frozen tower's share of the tokenizer step's compile). The dense
    # layers' weights are stacked already in the compute dtype, the cast each layer would make
    # anyway (same values); norms and LayerScale keep fp32.
    graph = nnx.graphdef(self.blocks[0])
    dense_layers = ('qkv', 'proj', 'fc1', 'fc2')

    def stack(path, *leaves):
      a = jnp.stack(leaves)
      return a.astype(self.dtype) if getattr(path[0], 'key', None) in dense_layers else a

    stacked = jax.tree_util.tree_map_with_path(stack, *(nnx.state(b) for b in self.blocks))

    def body(t, weights):
      return nnx.merge(graph, weights)(t), None
    return jax.lax.scan(body, t, stacked)[0]

  def features(self, x):
    """[CLS, patch tokens] after the final norm, registers dropped: (B, 1 + N, C)."""
    t = self(x)
    r = self.cfg.num_register_tokens
    return jnp.concatenate([t[:, :1], t[:, 1 + r:]], axis=1)


def preprocess_for_dinov2(images, size: int = 224):
  """Hita's DINOv2 preprocessing: kornia antialiased bicubic (align_corners=True) resize of the
  [-1, 1] NHWC image to size x size, clamp, map to [0, 1], ImageNet normalisation."""
  x = images.astype(jnp.float32)
  if x.shape[1:3] != (size, size):
    x = kornia_bicubic_resize(x, (size, size))
  x = (jnp.clip(x, -1.0, 1.0) + 1.0) / 2.0
  return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
