"""DINO discriminator weights: Meta's `dino_deitsmall16_pretrain.pth` (the frozen ViT-S/16) and an
official training checkpoint's `discriminator` entry (`DinoDisc.state_dict()`: the heads only).

| official key (DINO, Meta's names)              | hita_jax (`DinoDiscriminator.dino`) |
|------------------------------------------------|-------------------------------------|
| `cls_token` (1,1,C), `pos_embed` (1,1+N,C)      | `cls_token` (C,), `pos_embed`       |
| `patch_embed.proj.*`                           | `patch_embed.*`                     |
| `blocks.i.norm{1,2}.*`                         | `blocks.i.norm{1,2}`                |
| `blocks.i.attn.{qkv,proj}.*` (qkv k-bias zeroed at load, as DinoDisc) | `blocks.i.{qkv,proj}` |
| `blocks.i.mlp.fc{1,2}.*`                       | `blocks.i.fc{1,2}`                  |
| `norm.*` (loaded, never applied)               | `norm`                              |

| official key (heads, `discriminator` entry)    | hita_jax (`DinoDiscriminator.heads[j]`) |
|------------------------------------------------|-----------------------------------------|
| `heads.j.0.0.{weight_orig,bias,weight_u,weight_v}` | `conv_in.{weight,bias,u,v}`         |
| `heads.j.0.1.{weight,bias}` (BatchNormLocal)   | `norm_in.{weight,bias}`                 |
| `heads.j.1.fn.0.*` / `heads.j.1.fn.1.*`        | `conv_res.*` / `norm_res.*`             |
| `heads.j.2.*`                                  | `conv_out.*`                            |

Conv weights keep PyTorch's (out, in, k) layout. Without spectral norm the conv key is `weight`.
"""
from __future__ import annotations

import numpy as np
from flax import nnx

from hita_jax.convert import mapping
from hita_jax.convert.dinov2 import DINOV2_RULES
from hita_jax.models.dino_discriminator import DinoDiscriminator, FrozenDino

# The fixture's DINO state also holds the normalisation buffers; Meta's file may carry a head.
_DINO_IGNORE = (r'^x_scale$', r'^x_shift$', r'^head\.')
_HEADS_FILTER = nnx.All(nnx.Any(nnx.Param, nnx.BatchStat), nnx.Not(nnx.PathContains('dino')))


def head_rules(spectral_norm: bool = True) -> list:
  sn = [(r'\.(conv_in|conv_res|conv_out)\.weight$', r'.\1.weight_orig')] if spectral_norm else []
  return sn + [
      (r'^heads\.(\d+)\.conv_in\.', r'heads.\1.0.0.'),
      (r'^heads\.(\d+)\.norm_in\.', r'heads.\1.0.1.'),
      (r'^heads\.(\d+)\.conv_res\.', r'heads.\1.1.fn.0.'),
      (r'^heads\.(\d+)\.norm_res\.', r'heads.\1.1.fn.1.'),
      (r'^heads\.(\d+)\.conv_out\.', r'heads.\1.2.'),
      (r'\.u$', '.weight_u'),
      (r'\.v$', '.weight_v'),
  ]


def zero_k_bias(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """DinoDisc zeroes the k third of every `attn.qkv.bias` of the hub state before loading it."""
  out = dict(sd)
  for k, v in sd.items():
    if k.endswith('.attn.qkv.bias'):
      v = np.array(v, np.float32)
      c = v.size // 3
      v[c:2 * c] = 0.0
      out[k] = v
  return out


def load_dino_vits(model: FrozenDino, state_dict: dict[str, np.ndarray], *, prefix: str = '') -> dict:
  """Meta's `dino_deitsmall16_pretrain.pth` names (optionally under `prefix`, e.g. the fixture's
  `dino_proxy.0.`) -> the frozen DINO, in place, k-bias zeroed."""
  sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  return mapping.import_params(model, zero_k_bias(sd), DINOV2_RULES, ignore=_DINO_IGNORE)


def load_dino_disc_heads(model: DinoDiscriminator, state_dict: dict[str, np.ndarray]) -> dict:
  """`DinoDisc.state_dict()` (the `discriminator` entry of a vq_train.py checkpoint) -> the heads
  and their spectral-norm vectors, in place."""
  sd = {k: v for k, v in state_dict.items() if k.startswith('heads.')}
  return mapping.import_params(model, sd, head_rules(model.cfg.spectral_norm), filt=_HEADS_FILTER)


def export_dino_disc_heads(model: DinoDiscriminator) -> dict[str, np.ndarray]:
  return mapping.export_params(model, head_rules(model.cfg.spectral_norm), filt=_HEADS_FILTER)


def official_heads_adam_moments(disc_sd: dict[str, np.ndarray], optimizer: dict
                                ) -> tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]]:
  """vq_train.py's `optimizer_disc` state for the DINO discriminator -> moments keyed by the heads'
  official names. Its parameters are the heads' in state-dict order (spectral norm re-registers
  `weight_orig` after `bias`; `weight_u`/`weight_v` are buffers)."""
  order = [k for k in disc_sd if k.startswith('heads.') and not k.endswith(('.weight_u', '.weight_v'))]
  return mapping.torch_adam_moments(order, optimizer)
