"""DINOv2 weights: Meta's torch.hub files (`dinov2_vitl14_reg4_pretrain.pth`) and the Hugging Face
layout (`facebook/dinov2-with-registers-large`: config.json + model.safetensors) -> `DinoV2`.

| torch.hub key                         | Hugging Face key                                            | hita_jax            |
|---------------------------------------|-------------------------------------------------------------|---------------------|
| `cls_token` (1,1,C)                   | `embeddings.cls_token`                                      | `cls_token` (C,)    |
| `pos_embed` (1,1+G*G,C)               | `embeddings.position_embeddings`                            | `pos_embed`         |
| `register_tokens` (1,R,C)             | `embeddings.register_tokens`                                | `register_tokens`   |
| `mask_token` (1,C)                    | `embeddings.mask_token`                                     | `mask_token` (C,)   |
| `patch_embed.proj.*`                  | `embeddings.patch_embeddings.projection.*`                  | `patch_embed.*`     |
| `blocks.i.norm{1,2}.*`                | `encoder.layer.i.norm{1,2}.*`                               | `blocks.i.norm{1,2}`|
| `blocks.i.attn.qkv.*` (fused q;k;v)   | `encoder.layer.i.attention.attention.{query,key,value}.*`   | `blocks.i.qkv`      |
| `blocks.i.attn.proj.*`                | `encoder.layer.i.attention.output.dense.*`                  | `blocks.i.proj`     |
| `blocks.i.ls{1,2}.gamma`              | `encoder.layer.i.layer_scale{1,2}.lambda1`                  | `blocks.i.ls{1,2}`  |
| `blocks.i.mlp.fc{1,2}.*`              | `encoder.layer.i.mlp.fc{1,2}.*`                             | `blocks.i.fc{1,2}`  |
| `norm.*`                              | `layernorm.*`                                               | `norm`              |
"""
from __future__ import annotations

import json
import os
import re

import numpy as np
from safetensors.numpy import load_file

from hita_jax.convert import mapping
from hita_jax.errors import MissingPathError, UserError
from hita_jax.models.dinov2 import DinoV2, DinoV2Config

DINOV2_RULES = [
    (r'^patch_embed\.', 'patch_embed.proj.'),
    (r'^blocks\.(\d+)\.(qkv|proj)\.', r'blocks.\1.attn.\2.'),
    (r'^blocks\.(\d+)\.(fc1|fc2)\.', r'blocks.\1.mlp.\2.'),
    (r'^blocks\.(\d+)\.(ls1|ls2)$', r'blocks.\1.\2.gamma'),
] + mapping.COMMON_RULES

# Where the official tokenizer's training checkpoints keep their frozen DINOv2.
OFFICIAL_PREFIX = 'encode_transformer.backbone.pretrained_encoder.'

_EXPORT_TRANSFORMS = {
    r'^(cls_token)$': lambda a: a[None, None],
    r'^(pos_embed|register_tokens|mask_token)$': lambda a: a[None],
}


def load_dinov2(model: DinoV2, state_dict: dict[str, np.ndarray], *, prefix: str = '',
                strict: bool = True) -> dict:
  """Loads torch.hub-named DINOv2 weights (optionally under `prefix`, e.g. the official
  `encode_transformer.backbone.pretrained_encoder.`) into `model` in place."""
  sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  if 'embeddings.patch_embeddings.projection.weight' in sd:
    sd = hf_to_hub(sd)
  return mapping.import_params(model, sd, DINOV2_RULES, strict=strict)


def export_dinov2(model: DinoV2) -> dict[str, np.ndarray]:
  return mapping.export_params(model, DINOV2_RULES, transforms=_EXPORT_TRANSFORMS)


def hf_to_hub(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Hugging Face `Dinov2(WithRegisters)Model` keys -> Meta torch.hub keys (q, k, v fused)."""
  out = {}
  simple = [
      (r'^embeddings\.cls_token$', 'cls_token'),
      (r'^embeddings\.mask_token$', 'mask_token'),
      (r'^embeddings\.position_embeddings$', 'pos_embed'),
      (r'^embeddings\.register_tokens$', 'register_tokens'),
      (r'^embeddings\.patch_embeddings\.projection\.', 'patch_embed.proj.'),
      (r'^encoder\.layer\.(\d+)\.norm(\d)\.', r'blocks.\1.norm\2.'),
      (r'^encoder\.layer\.(\d+)\.attention\.output\.dense\.', r'blocks.\1.attn.proj.'),
      (r'^encoder\.layer\.(\d+)\.layer_scale(\d)\.lambda1$', r'blocks.\1.ls\2.gamma'),
      (r'^encoder\.layer\.(\d+)\.mlp\.', r'blocks.\1.mlp.'),
      (r'^layernorm\.', 'norm.'),
  ]
  qkv = {}
  for k, v in sd.items():
    m = re.match(r'^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$', k)
    if m:
      qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = v
      continue
    nk = k
    for pat, rep in simple:
      nk = re.sub(pat, rep, nk)
    if nk.startswith('embeddings.') or nk.startswith('encoder.') or nk.startswith('pooler'):
      raise KeyError(f'unrecognised Hugging Face DINOv2 key {k!r}')
    out[nk] = v
  for (i, kind), parts in qkv.items():
    out[f'blocks.{i}.attn.qkv.{kind}'] = np.concatenate([parts['query'], parts['key'], parts['value']])
  return out


def config_from_hf(path: str) -> DinoV2Config:
  """DinoV2Config from a Hugging Face `config.json` (read through transformers' config classes)."""
  import transformers  # heavy: only for Hugging Face directories
  cfg_file = os.path.join(path, 'config.json') if os.path.isdir(path) else path
  try:
    with open(cfg_file) as f:
      model_type = json.load(f).get('model_type', 'dinov2')
  except (ValueError, AttributeError) as e:  # not JSON or not UTF-8 (ValueErrors), not an object
    raise UserError(f'{cfg_file} is not a Hugging Face config.json ({e})') from e
  cls = (transformers.Dinov2WithRegistersConfig if model_type == 'dinov2_with_registers'
         else transformers.Dinov2Config)
  c = cls.from_pretrained(os.path.dirname(cfg_file))
  regs = getattr(c, 'num_register_tokens', 0)
  if c.hidden_act not in ('gelu',):
    raise UserError(f'{cfg_file}: unsupported DINOv2 activation {c.hidden_act!r} (only exact GELU)')
  if getattr(c, 'use_swiglu_ffn', False):
    raise UserError(f'{cfg_file}: SwiGLU DINOv2 variants (ViT-g) are not supported')
  return DinoV2Config(embed_dim=c.hidden_size, depth=c.num_hidden_layers,
                      num_heads=c.num_attention_heads, mlp_ratio=c.mlp_ratio,
                      patch_size=c.patch_size, img_size=c.image_size, num_register_tokens=regs,
                      layer_norm_eps=c.layer_norm_eps, qkv_bias=c.qkv_bias,
                      interpolate_antialias=bool(regs), interpolate_offset=0.0 if regs else 0.1)


def load_hf_dinov2_dir(path: str) -> tuple[DinoV2Config, dict[str, np.ndarray]]:
  """A Hugging Face model directory -> (config, torch.hub-named state dict)."""
  weights = os.path.join(path, 'model.safetensors')
  if not os.path.exists(weights):
    raise MissingPathError(f'{weights} not found (expected a Hugging Face DINOv2 directory)')
  return config_from_hf(path), hf_to_hub(dict(load_file(weights)))


if __name__ == '__main__':  # the old command line (--src): say what replaced it
  from hita_jax import cli
  cli.moved('hita_jax.convert.dinov2', 'hita_jax.tools.convert dinov2 import', {'--src': '--checkpoint'})
