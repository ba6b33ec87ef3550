"""Hita-U's DINO discriminator (official `DinoDisc`, discriminator_dino.py), NHWC in, logits out.

A frozen DINO ViT-S/16 (GELU tanh, no LayerScale, pre-LN, the final norm never applied) reads the
image, ImageNet-normalised and brought to 224 x 224 by one draw per call: a random crop (one offset
for the whole batch) with probability 1/2 when both sides exceed 224, else an `area` resize (bicubic
when the image is not larger). Readouts `patch tokens + CLS` after the position embedding and after
each key depth feed one head each: SpectralConv1d(k=1) -> BatchNormLocal -> LeakyReLU(0.2), a
residual block `(f(x) + x) / sqrt(2)` with a circular SpectralConv1d(k=ks), and SpectralConv1d(C->1).
Logits: (B, n_heads * tokens), head j's tokens contiguous (head 0 reads the embedding readout).

Spectral norm follows `torch.nn.utils.spectral_norm` (W as (out, in*k), eps 1e-12): train mode runs
one power iteration per call and stores u, v (BatchStat variables); eval mode uses them as stored.
BatchNormLocal always normalises with batch statistics (no running stats) over virtual batches of
`virtual_batch_size` images; `batch_norm_groups` data-parallel replicas are normalised separately,
as each GPU of the official DDP run does.

The heads are the trainable parameters (`HEADS_TRAINABLE`); the DINO lives under `dino` and is
never trained (the trainer keeps it out of the optimizer).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from hita_jax.models.layers import LayerNorm, attention, conv, dense
from hita_jax.models.resize import torch_area_resize, torch_bicubic_resize

# (0.5 / std, (0.5 - mean) / std): ImageNet normalisation of (x + 1) / 2 for x in [-1, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# What the discriminator optimizer trains: the heads (the frozen DINO sits under `dino`).
HEADS_TRAINABLE = nnx.All(nnx.Param, nnx.Not(nnx.PathContains('dino')))


@dataclasses.dataclass(frozen=True)
class DinoDiscConfig:
  embed_dim: int = 384          # ViT-S/16
  depth: int = 12               # DINO blocks built (key depths >= depth are dropped, as official)
  num_heads: int = 6
  mlp_ratio: float = 4.0
  patch_size: int = 16
  img_size: int = 224           # the ViT always sees img_size x img_size
  key_depths: tuple = (2, 5, 8, 11)  # 0-based blocks whose output feeds a head (+ the embedding)
  kernel_size: int = 9         # the residual block's circular Conv1d
  norm_eps: float = 1e-6       # LayerNorm and BatchNormLocal eps
  virtual_batch_size: int = 8  # BatchNormLocal groups of this many images (per replica)
  batch_norm_groups: int = 1   # data-parallel replicas normalised separately (1 = whole batch)
  spectral_norm: bool = True

  @property
  def effective_key_depths(self) -> tuple:
    return tuple(sorted(d for d in self.key_depths if d < self.depth))

  @property
  def num_tokens(self) -> int:
    return (self.img_size // self.patch_size) ** 2

  @classmethod
  def from_dict(cls, d: dict) -> 'DinoDiscConfig':
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f'unknown DINO discriminator config keys {unknown}; valid: {sorted(names)}')
    d = dict(d)
    if 'key_depths' in d:
      d['key_depths'] = tuple(int(k) for k in d['key_depths'])
    return cls(**d)


# -- the random crop-or-resize --------------------------------------------------------------------

def sample_augmentation(key, height: int, width: int, size: int) -> dict:
  """One call's draws: coin <= 0.5 -> crop at a uniform (top, left), shared by the batch."""
  k_coin, k_top, k_left = jax.random.split(key, 3)
  coin = jax.random.uniform(k_coin, ())
  return {'crop': (coin <= 0.5) & (height > size) & (width > size),
          'top': jax.random.randint(k_top, (), 0, max(height - size, 0) + 1),
          'left': jax.random.randint(k_left, (), 0, max(width - size, 0) + 1)}


def replay_augmentation(crop: bool, top: int = 0, left: int = 0) -> dict:
  """Recorded draws (e.g. the official `draws_branch`, `draws_crop_top_left`) in the same form."""
  return {'crop': jnp.asarray(bool(crop)), 'top': jnp.asarray(max(int(top), 0), jnp.int32),
          'left': jnp.asarray(max(int(left), 0), jnp.int32)}


def dino_input(x, aug: dict, size: int):
  """(B, H, W, 3) in [-1, 1] -> the ViT's (B, size, size, 3) input, in fp32 (official order:
  normalise, then crop or resize)."""
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  x = x.astype(jnp.float32) * (0.5 / std) + (0.5 - mean) / std
  b, h, w, c = x.shape
  if h <= size:
    return torch_bicubic_resize(x, (size, size))
  resized = torch_area_resize(x, (size, size))
  if w <= size:
    return resized
  cropped = jax.lax.dynamic_slice(x, (0, aug['top'], aug['left'], 0), (b, size, size, c))
  return jnp.where(aug['crop'], cropped, resized)


# -- frozen DINO ViT --------------------------------------------------------------------------------

class DinoBlock(nnx.Module):

  def __init__(self, cfg: DinoDiscConfig, *, dtype, rngs: nnx.Rngs):
    d = cfg.embed_dim
    self.num_heads = cfg.num_heads
    self.norm1 = LayerNorm(d, eps=cfg.norm_eps, rngs=rngs)
    self.qkv = dense(d, 3 * d, names=('embed', 'heads'), dtype=dtype, rngs=rngs)
    self.proj = dense(d, d, names=('heads', 'embed'), dtype=dtype, rngs=rngs)
    self.norm2 = LayerNorm(d, eps=cfg.norm_eps, rngs=rngs)
    hidden = round(d * cfg.mlp_ratio)
    self.fc1 = dense(d, hidden, names=('embed', 'mlp'), dtype=dtype, rngs=rngs)
    self.fc2 = dense(hidden, d, names=('mlp', 'embed'), dtype=dtype, rngs=rngs)

  def __call__(self, x):
    b, t, d = x.shape
    qkv = self.qkv(self.norm1(x)).reshape(b, t, 3, self.num_heads, d // self.num_heads)
    x = x + self.proj(attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]).reshape(b, t, d))
    return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=True))


class FrozenDino(nnx.Module):
  """`FrozenDINOSmallNoDrop`: returns the readouts (B, tokens, C) in fp32, embedding first."""

  def __init__(self, cfg: DinoDiscConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg, self.dtype = cfg, dtype
    d = cfg.embed_dim
    self.patch_embed = conv(3, d, cfg.patch_size, stride=cfg.patch_size, padding='VALID', dtype=dtype,
                            rngs=rngs)
    init = nnx.initializers.normal(0.02)
    self.cls_token = nnx.Param(init(rngs.params(), (d,)), out_sharding=('embed',))
    self.pos_embed = nnx.Param(init(rngs.params(), (1 + cfg.num_tokens, d)), out_sharding=(None, 'embed'))
    self.blocks = nnx.List([DinoBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.depth)])
    self.norm = LayerNorm(d, eps=cfg.norm_eps, rngs=rngs)  # in Meta's file; never applied

  def __call__(self, x):
    b = x.shape[0]
    t = self.patch_embed(x.astype(self.dtype)).astype(jnp.float32)
    t = t.reshape(b, -1, t.shape[-1])
    cls = jnp.broadcast_to(self.cls_token[...], (b, 1, t.shape[-1]))
    t = jnp.concatenate([cls, t], axis=1) + self.pos_embed[...]
    readouts = [t[:, 1:] + t[:, :1]]
    keys = self.cfg.effective_key_depths
    for i, blk in enumerate(self.blocks[:max(keys) + 1] if keys else []):  # later blocks feed nothing
      t = blk(t.astype(self.dtype))
      if i in keys:
        t32 = t.astype(jnp.float32)
        readouts.append(t32[:, 1:] + t32[:, :1])
    return readouts


# -- heads ------------------------------------------------------------------------------------------

def _l2_normalize(x, eps=1e-12):
  return x / jnp.maximum(jnp.linalg.norm(x), eps)


class SpectralConv1d(nnx.Module):
  """Conv1d on (B, L, C) with circular padding k // 2, weight in PyTorch's (out, in, k) layout,
  divided by its spectral norm estimate u . W v."""

  def __init__(self, cin: int, cout: int, kernel_size: int, *, spectral_norm: bool = True,
               rngs: nnx.Rngs):
    bound = 1.0 / math.sqrt(cin * kernel_size)  # PyTorch's default Conv1d init
    self.kernel_size = kernel_size
    self.weight = nnx.Param(jax.random.uniform(rngs.params(), (cout, cin, kernel_size), jnp.float32,
                                               -bound, bound), out_sharding=('conv_out', 'conv_in', None))
    self.bias = nnx.Param(jax.random.uniform(rngs.params(), (cout,), jnp.float32, -bound, bound),
                          out_sharding=('conv_out',))
    self.spectral_norm = spectral_norm
    if spectral_norm:  # torch: u ~ N(0,1), v ~ N(0,1), each normalised
      self.u = nnx.BatchStat(_l2_normalize(jax.random.normal(rngs.params(), (cout,))))
      self.v = nnx.BatchStat(_l2_normalize(jax.random.normal(rngs.params(), (cin * kernel_size,))))
    self.use_running_average = False  # eval(): use the stored u, v without a power iteration

  def normalized_weight(self):
    w = self.weight[...]
    if not self.spectral_norm:
      return w
    wm = w.reshape(w.shape[0], -1)
    hp = jax.lax.Precision.HIGHEST
    u, v = self.u[...], self.v[...]
    if not self.use_running_average:
      wd = jax.lax.stop_gradient(wm)
      v = _l2_normalize(jnp.dot(u, wd, precision=hp))
      u = _l2_normalize(jnp.dot(wd, v, precision=hp))
      self.u[...], self.v[...] = u, v
    sigma = jnp.dot(u, jnp.dot(wm, v, precision=hp), precision=hp)
    return w / sigma

  def __call__(self, x):
    w = self.normalized_weight()
    k = self.kernel_size
    if k == 1:
      y = jnp.einsum('blc,oc->blo', x, w[:, :, 0], precision=jax.lax.Precision.HIGHEST)
    else:
      p = k // 2
      x = jnp.concatenate([x[:, x.shape[1] - p:], x, x[:, :p]], axis=1)  # padding_mode='circular'
      y = jax.lax.conv_general_dilated(x, w.transpose(2, 1, 0), (1,), 'VALID',
                                       dimension_numbers=('NWC', 'WIO', 'NWC'),
                                       precision=jax.lax.Precision.HIGHEST)
    return y + self.bias[...]


class BatchNormLocal(nnx.Module):
  """Batch statistics per (replica, virtual batch), per channel over (images, tokens); biased
  variance; affine. The same in train and eval mode (official: no running statistics)."""

  def __init__(self, c: int, *, eps: float, virtual_batch_size: int, groups: int = 1, rngs: nnx.Rngs):
    del rngs
    self.eps, self.virtual_batch_size, self.groups = eps, virtual_batch_size, groups
    self.weight = nnx.Param(jnp.ones((c,), jnp.float32), out_sharding=('norm',))
    self.bias = nnx.Param(jnp.zeros((c,), jnp.float32), out_sharding=('norm',))

  def __call__(self, x):
    b, l, c = x.shape
    if b % self.groups:
      raise ValueError(f'batch {b} does not split into {self.groups} batch-norm replicas')
    per_replica = b // self.groups
    virtual = -(-per_replica // self.virtual_batch_size)  # official: ceil(B / virtual_bs) groups
    if per_replica % virtual:
      raise ValueError(f'a replica batch of {per_replica} images does not split into {virtual} '
                       f'virtual batches of <= {self.virtual_batch_size} (the official view() fails too)')
    xg = x.astype(jnp.float32).reshape(self.groups * virtual, -1, l, c)
    mean = jnp.mean(xg, axis=(1, 2), keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=(1, 2), keepdims=True)
    y = ((xg - mean) / jnp.sqrt(var + self.eps)).reshape(b, l, c)
    return y * self.weight[...] + self.bias[...]


class DinoHead(nnx.Module):

  def __init__(self, cfg: DinoDiscConfig, *, rngs: nnx.Rngs):
    c = cfg.embed_dim
    sn = cfg.spectral_norm
    norm = lambda: BatchNormLocal(c, eps=cfg.norm_eps, virtual_batch_size=cfg.virtual_batch_size,
                                  groups=cfg.batch_norm_groups, rngs=rngs)
    self.conv_in = SpectralConv1d(c, c, 1, spectral_norm=sn, rngs=rngs)
    self.norm_in = norm()
    self.conv_res = SpectralConv1d(c, c, cfg.kernel_size, spectral_norm=sn, rngs=rngs)
    self.norm_res = norm()
    self.conv_out = SpectralConv1d(c, 1, 1, spectral_norm=sn, rngs=rngs)

  def __call__(self, x):
    h = jax.nn.leaky_relu(self.norm_in(self.conv_in(x)), 0.2)
    h = (jax.nn.leaky_relu(self.norm_res(self.conv_res(h)), 0.2) + h) * (1.0 / math.sqrt(2.0))
    return self.conv_out(h)[..., 0]


class DinoDiscriminator(nnx.Module):

  def __init__(self, cfg: DinoDiscConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dino = FrozenDino(cfg, dtype=dtype, rngs=rngs)
    self.heads = nnx.List([DinoHead(cfg, rngs=rngs) for _ in range(len(cfg.effective_key_depths) + 1)])

  def readouts(self, x, aug: dict):
    """(B, H, W, 3) in [-1, 1] -> the frozen DINO's readouts [(B, tokens, C)] in fp32 (gradients
    flow into the image for the generator step; the trainer never differentiates the DINO)."""
    return self.dino(dino_input(x, aug, self.cfg.img_size))

  def logits_from_readouts(self, readouts):
    b = readouts[0].shape[0]
    return jnp.concatenate([h(r).reshape(b, -1) for h, r in zip(self.heads, readouts)], axis=1)

  def __call__(self, x, aug: dict):
    """(B, H, W, 3) in [-1, 1] -> logits (B, n_heads * tokens) in fp32. `aug`: this call's draws
    (`sample_augmentation(key, H, W, img_size)` or `replay_augmentation(...)`)."""
    return self.logits_from_readouts(self.readouts(x, aug))
