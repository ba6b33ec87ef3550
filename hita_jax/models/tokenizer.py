"""The Hita tokenizer: CNN encoder + frozen DINOv2 + holistic encoder, two quantizers, fusion
decoder + CNN decoder. Images are NHWC in [-1, 1]; patch codes are row-major over the token grid."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from hita_jax.errors import UserError
from hita_jax.models.cnn import CNNDecoder, CNNEncoder
from hita_jax.models.dinov2 import DinoV2, DinoV2Config, preprocess_for_dinov2
from hita_jax.models.dropout import DROPOUT_RNGS
from hita_jax.models.holistic import FusionDecoder, HolisticEncoder
from hita_jax.models.layers import DTYPES, NORM_IMPLS, conv, conv_apply, dense
from hita_jax.models.quantizer import VectorQuantizer


FULL_ATTN_IMPLS = ('auto', 'xla', 'cudnn')  # tokenizer.attn_impl


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  """Every dimension of the Hita tokenizer. Defaults are the official full-size Hita-V."""
  image_size: int = 336           # training / default input size
  pos_grid: int = 21              # grid of the position tables (official YAML image_size / patch_size)
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
  encoder_res_blocks: int = 2
  decoder_res_blocks: int = 3
  cnn_dropout: float = 0.0
  norm_groups: int = 32           # CNN GroupNorm groups (official: 32; a narrow CNN needs fewer)
  dim: int = 512                  # z_channels == transformer width
  codebook_size: int = 16384
  patch_code_dim: int = 8
  holistic_code_dim: int = 12
  num_holistic: int = 128
  depth: int = 3
  num_heads: int = 8
  head_dim: int = 64              # E_trans head width (its inner width is num_heads * head_dim)
  mlp_dim: int = 2048             # SwiGLU hidden = (int(mlp_dim * 2/3) + 7) // 8 * 8
  dropout: float = 0.1
  shift_k: int = 4
  vfm: bool = False               # Hita-U: VFM reconstruction head
  vfm_out_dim: int = 1024         # official: hard-coded 1024 (DINOv2-L width)
  vfm_grid: int = 16              # official: hard-coded 16x16 (DINOv2's grid at 224)
  beta: float = 0.25
  entropy_loss_ratio: float = 0.0
  dinov2: DinoV2Config = DinoV2Config()
  dinov2_input_size: int = 224
  # the frozen DINOv2's blocks as one lax.scan (weights stacked inside the call) instead of unrolled:
  # a smaller program to compile, the same values; opt-in: on an H100 (2026-12-06) neither the
  # step nor the (warm) compile changed measurably beside attn_impl='auto'
  dinov2_scan: bool = False
  # the unmasked attention (DINOv2, E_trans): 'auto' = cuDNN's fused kernel on GPU in bf16 (the
  # reference on CPU, TPU and in fp32), 'xla' the reference everywhere (layers.full_attention).
  # 'auto': Hita-V/16 step 0.1531 -> 0.1457 s on an H100 (tok_ab, 2026-12-06)
  attn_impl: str = 'auto'
  # the CNN's GroupNorm(+swish): 'fused' = hand-written backward with each ResnetBlock's conv1 bias
  # folded into norm2, 'fused_recompute' = the same with the backward that recomputes dy * swish'
  # in the dx pass instead of writing it out in fp32 (layers.GN_BACKWARDS), 'fused_nofold' = 'fused'
  # without the fold, 'xla' = autodiff of the same formula (layers.GroupNorm); same parameters and
  # values, for A/B timing (tools/tok_ab). 'fused_recompute': Hita-V/16 step 0.1407 -> 0.1347 s
  # (every round faster, same losses) on an H100, tok_ab 2026-12-06 (docs/PERFORMANCE.md, session 25).
  cnn_norm_impl: str = 'fused_recompute'
  # the transformers' dropout masks (E_trans, E_causal, fusion decoder): 'threefry' (flax's,
  # stored for the backward) | 'hash' (recomputed in the backward, models/dropout.py); 'threefry':
  # 'hash' gained nothing measurable in the Hita-V/16 step on an H100 (2026-12-06)
  dropout_rng: str = 'threefry'
  dtype: str = 'float32'          # compute dtype; params are always fp32

  @property
  def downsample(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  def grid(self, image_size: int | None = None) -> int:
    return (image_size or self.image_size) // self.downsample

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'TokenizerConfig':
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f'unknown tokenizer config keys {sorted(unknown)}; valid keys: {sorted(known)}')
    if isinstance(d.get('dinov2'), dict):
      d['dinov2'] = DinoV2Config(**d['dinov2'])
    if 'ch_mult' in d:
      d['ch_mult'] = tuple(d['ch_mult'])
    return cls(**d)


class Tokenizer(nnx.Module):

  def __init__(self, cfg: TokenizerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    # the tokenizer's attention is unmasked (layers.full_attention): the causal kernels of the GPT
    # ('splash', 'pallas') have no use here
    if cfg.attn_impl not in FULL_ATTN_IMPLS:
      raise UserError(f'tokenizer.attn_impl must be one of {FULL_ATTN_IMPLS}, got {cfg.attn_impl!r} '
                      '(--config.tokenizer.attn_impl=auto)')
    if cfg.dropout_rng not in DROPOUT_RNGS:
      raise UserError(f'tokenizer.dropout_rng must be one of {DROPOUT_RNGS}, got {cfg.dropout_rng!r} '
                      '(--config.tokenizer.dropout_rng=threefry)')
    if cfg.cnn_norm_impl not in NORM_IMPLS:
      raise UserError(f'tokenizer.cnn_norm_impl must be one of {NORM_IMPLS}, got '
                      f'{cfg.cnn_norm_impl!r} (--config.tokenizer.cnn_norm_impl=fused_recompute)')
    dt = DTYPES[cfg.dtype]
    self.cnn_encoder = CNNEncoder(ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.encoder_res_blocks,
                                  z_channels=cfg.dim, dropout=cfg.cnn_dropout, groups=cfg.norm_groups,
                                  norm_impl=cfg.cnn_norm_impl, dtype=dt, rngs=rngs)
    self.dinov2 = DinoV2(cfg.dinov2, dtype=dt, scan_blocks=cfg.dinov2_scan, attn_impl=cfg.attn_impl,
                         rngs=rngs)
    self.holistic_encoder = HolisticEncoder(
        dim=cfg.dim, dino_dim=cfg.dinov2.embed_dim, num_holistic=cfg.num_holistic,
        pos_grid=cfg.pos_grid, depth=cfg.depth, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
        mlp_dim=cfg.mlp_dim, dropout=cfg.dropout, attn_impl=cfg.attn_impl,
        dropout_rng=cfg.dropout_rng, dtype=dt, rngs=rngs)
    self.quant_conv = conv(cfg.dim, cfg.patch_code_dim, 1, dtype=jnp.float32, rngs=rngs)
    self.patch_quantizer = VectorQuantizer(cfg.codebook_size, cfg.patch_code_dim, beta=cfg.beta,
                                           entropy_loss_ratio=cfg.entropy_loss_ratio, rngs=rngs)
    self.post_quant_conv = conv(cfg.patch_code_dim, cfg.dim, 1, dtype=dt, rngs=rngs)
    self.pre_holistic_quant = dense(cfg.dim, cfg.holistic_code_dim, names=('embed', None),
                                    dtype=jnp.float32, rngs=rngs)
    self.holistic_quantizer = VectorQuantizer(cfg.codebook_size, cfg.holistic_code_dim, beta=cfg.beta,
                                              entropy_loss_ratio=cfg.entropy_loss_ratio, rngs=rngs)
    self.post_holistic_quant = dense(cfg.holistic_code_dim, cfg.dim, names=(None, 'embed'),
                                     dtype=dt, rngs=rngs)
    self.fusion_decoder = FusionDecoder(
        dim=cfg.dim, num_holistic=cfg.num_holistic, pos_grid=cfg.pos_grid, depth=cfg.depth,
        num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim, shift_k=cfg.shift_k, dropout=cfg.dropout,
        vfm=cfg.vfm, vfm_out_dim=cfg.vfm_out_dim, vfm_grid=cfg.vfm_grid,
        dropout_rng=cfg.dropout_rng, dtype=dt, rngs=rngs)
    self.cnn_decoder = CNNDecoder(ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.decoder_res_blocks,
                                  z_channels=cfg.dim, dropout=cfg.cnn_dropout, groups=cfg.norm_groups,
                                  norm_impl=cfg.cnn_norm_impl, dtype=dt, rngs=rngs)

  # -- pieces ---------------------------------------------------------------------------------
  def _check_images(self, images):
    if images.ndim != 4 or images.shape[-1] != 3:
      raise UserError(f'tokenizer input must be (B, H, W, 3) NHWC in [-1, 1]; got shape {images.shape} '
                      '(add the batch axis / convert to RGB)')
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise UserError(f'tokenizer input must be floating point in [-1, 1]; got {images.dtype} '
                      '(convert uint8 images with hita_jax.data.images.to_unit)')
    f = self.cfg.downsample
    if images.shape[1] % f or images.shape[2] % f:
      raise UserError(f'image size {images.shape[1]}x{images.shape[2]} is not a multiple of the '
                       f'CNN downsampling factor {f}')

  def dinov2_features(self, images):
    """Frozen DINOv2 [CLS, patch] features of the tokenizer's input images (no gradient)."""
    x = preprocess_for_dinov2(images, self.cfg.dinov2_input_size)
    return jax.lax.stop_gradient(self.dinov2.features(x).astype(jnp.float32))

  def encode_pre_quant(self, images, *, return_intermediates: bool = False):
    """images -> (holistic pre-quant (B, S, e_s), patch pre-quant (B, h, w, e), aux dict)."""
    self._check_images(images)
    h = self.cnn_encoder(images)
    dino = self.dinov2_features(images)
    hol, patch, inter = self.holistic_encoder(h, dino, return_intermediates=True)
    b, gh, gw, c = h.shape
    patch = patch.reshape(b, gh, gw, c)
    pre_patch = conv_apply(self.quant_conv, patch.astype(jnp.float32))
    pre_hol = self.pre_holistic_quant(hol.astype(jnp.float32))
    aux = {'dinov2_features': dino}
    if return_intermediates:
      aux.update(inter, cnn_encoder_out=h, e_causal_holistic=hol, e_causal_patch=patch)
    return pre_hol, pre_patch, aux

  def encode(self, images):
    """images (B, H, W, 3) in [-1, 1] -> (holistic_codes (B, S), patch_codes (B, h*w)) int32."""
    pre_hol, pre_patch, _ = self.encode_pre_quant(images)
    _, hol_idx, _ = self.holistic_quantizer(pre_hol)
    _, patch_idx, _ = self.patch_quantizer(pre_patch)
    return hol_idx, patch_idx.reshape(patch_idx.shape[0], -1)

  def decode_latents(self, holistic_q, patch_q, *, return_intermediates: bool = False):
    """Quantised vectors (B, S, e_s), (B, h, w, e) -> images (B, H, W, 3) [, intermediates]."""
    post_patch = conv_apply(self.post_quant_conv, patch_q)
    post_hol = self.post_holistic_quant(holistic_q)
    z, inter = self.fusion_decoder(post_patch, post_hol, return_intermediates=True)
    recon = self.cnn_decoder(z)
    if return_intermediates:
      inter.update(postquant_patch=post_patch, postquant_holistic=post_hol, decoder_cnn_input=z)
      return recon, inter
    return recon

  def decode(self, holistic_codes, patch_codes):
    """(B, S), (B, N) or (B, h, w) code ids -> images (B, H, W, 3), roughly in [-1, 1]."""
    if patch_codes.ndim == 2:
      g = math.isqrt(patch_codes.shape[1])
      if g * g != patch_codes.shape[1]:
        raise UserError(f'{patch_codes.shape[1]} patch codes are not a square grid; pass (B, h, w)')
      patch_codes = patch_codes.reshape(-1, g, g)
    if holistic_codes.shape[-1] != self.cfg.num_holistic:
      raise UserError(f'expected {self.cfg.num_holistic} holistic codes, got {holistic_codes.shape}')
    return self.decode_latents(self.holistic_quantizer.lookup(holistic_codes),
                               self.patch_quantizer.lookup(patch_codes))

  def vfm_prediction(self, holistic_q):
    return self.fusion_decoder.vfm_prediction(self.post_holistic_quant(holistic_q))

  # -- training / eval forward ----------------------------------------------------------------
  def __call__(self, images):
    """Full forward. Returns a dict with `recon` (B, H, W, 3), `holistic_codes`, `patch_codes`,
    the summed quantizer losses `vq`, `commit`, `entropy`, `dinov2_patch_features`, and for
    Hita-U `vfm_prediction`. Straight-through quantised vectors are used, so gradients flow."""
    pre_hol, pre_patch, aux = self.encode_pre_quant(images)
    hol_q, hol_idx, lh = self.holistic_quantizer(pre_hol)
    patch_q, patch_idx, lp = self.patch_quantizer(pre_patch)
    dt = DTYPES[self.cfg.dtype]
    recon = self.decode_latents(hol_q.astype(dt), patch_q.astype(dt))
    out = {
        'recon': recon,
        'holistic_codes': hol_idx,
        'patch_codes': patch_idx.reshape(patch_idx.shape[0], -1),
        'dinov2_patch_features': aux['dinov2_features'][:, 1:],
    }
    for k in ('vq', 'commit', 'entropy'):
      out[k] = lh[k] + lp[k]
    if self.cfg.vfm:
      out['vfm_prediction'] = self.vfm_prediction(hol_q.astype(dt))
    return out


def trainable_filter():
  """Parameters the optimizer updates and the official checkpoint saves: all but DINOv2."""
  return nnx.All(nnx.Param, nnx.Not(nnx.PathContains('dinov2')))
