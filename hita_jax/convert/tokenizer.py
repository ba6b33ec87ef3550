"""Official Hita tokenizer checkpoints <-> hita_jax `Tokenizer` parameters.

Name table (official -> ours), applied as regex substitutions to our parameter paths:

| official (`VQModel` state dict)                         | hita_jax                                  |
|---------------------------------------------------------|-------------------------------------------|
| `encoder.*`, `decoder.*` (CNN)                          | `cnn_encoder.*`, `cnn_decoder.*`          |
| `{en,de}coder.conv_blocks.L.*`                          | `cnn_{en,de}coder.levels.L.*`             |
| `encoder.conv_blocks.L.downsample.conv` / `upsample`    | `levels.L.resample.conv`                  |
| `{en,de}coder.mid.{0,1,2}`                              | `mid.{res1,attn,res2}`                    |
| `encode_transformer.carrier_tokens` (1,S,C)             | `holistic_encoder.holistic_tokens` (S,C)  |
| `encode_transformer.pos_embed` (1,N,C)                  | `holistic_encoder.pos_embed` (N,C)        |
| `encode_transformer.proj.mlp.{0,1,3,4}`                 | `holistic_encoder.dino_proj.{fc1,norm1,fc2,norm2}` |
| `encode_transformer.transformer1.layers.i.attn1.to_{q,k,v}`, `to_out.0` | `holistic_encoder.e_trans.layers.i.{q,k,v,out}` |
| `encode_transformer.transformer2.layers.i.attn1.{q,k,v,out}_proj` | `holistic_encoder.e_causal.layers.i.{q,k,v,out}` |
| `*.ffnet.{w12,w3}`                                      | `*.ffn.{w12,w3}`                          |
| `decode_transformer.position_embedding` (1,N,C)         | `fusion_decoder.position_embedding` (N,C) |
| `decode_transformer.slot_position_embedding` (1,S,C)    | `fusion_decoder.holistic_position_embedding` |
| `decode_transformer.transformer.layers.i.attn1.*_proj`  | `fusion_decoder.transformer.layers.i.*`   |
| `decode_transformer.{mask_embedding,norm_vfm,proj}` (U) | `fusion_decoder.{mask_embedding,norm_vfm,vfm_proj}` |
| `quantize.embedding.weight`, `quantize.codebook_used`   | `patch_quantizer.codebook`, `patch_quantizer.usage` |
| `slot_quantize.*`                                       | `holistic_quantizer.*`                    |
| `quant_conv`, `post_quant_conv`                         | `quant_conv`, `post_quant_conv`           |
| `pre_slots_quant`, `post_slots_quant`                   | `pre_holistic_quant`, `post_holistic_quant` |
| `encode_transformer.backbone.pretrained_encoder.*`      | `dinov2.*` (see `convert/dinov2.py`; not in official tokenizer checkpoints) |

Linear kernels are transposed, conv kernels go OIHW <-> HWIO, LayerNorm/GroupNorm `weight` is our
`scale`, `codebook_used` (float ids) is our int32 `usage`.
"""
from __future__ import annotations

import numpy as np
from flax import nnx

from hita_jax.convert import mapping
from hita_jax.errors import MissingEntryError
from hita_jax.models.tokenizer import Tokenizer

TOKENIZER_RULES = [
    (r'^cnn_encoder\.levels\.(\d+)\.resample\.', r'encoder.conv_blocks.\1.downsample.'),
    (r'^cnn_decoder\.levels\.(\d+)\.resample\.', r'decoder.conv_blocks.\1.upsample.'),
    (r'^cnn_encoder\.', 'encoder.'),
    (r'^cnn_decoder\.', 'decoder.'),
    (r'\.levels\.', '.conv_blocks.'),
    (r'\.mid\.res1\.', '.mid.0.'),
    (r'\.mid\.attn\.', '.mid.1.'),
    (r'\.mid\.res2\.', '.mid.2.'),
    (r'^holistic_encoder\.dino_proj\.fc1\.', 'encode_transformer.proj.mlp.0.'),
    (r'^holistic_encoder\.dino_proj\.norm1\.', 'encode_transformer.proj.mlp.1.'),
    (r'^holistic_encoder\.dino_proj\.fc2\.', 'encode_transformer.proj.mlp.3.'),
    (r'^holistic_encoder\.dino_proj\.norm2\.', 'encode_transformer.proj.mlp.4.'),
    (r'^holistic_encoder\.holistic_tokens$', 'encode_transformer.carrier_tokens'),
    (r'^holistic_encoder\.e_trans\.layers\.(\d+)\.(q|k|v)\.', r'encode_transformer.transformer1.layers.\1.attn1.to_\2.'),
    (r'^holistic_encoder\.e_trans\.layers\.(\d+)\.out\.', r'encode_transformer.transformer1.layers.\1.attn1.to_out.0.'),
    (r'^holistic_encoder\.e_trans\.', 'encode_transformer.transformer1.'),
    (r'^holistic_encoder\.e_causal\.layers\.(\d+)\.(q|k|v|out)\.', r'encode_transformer.transformer2.layers.\1.attn1.\2_proj.'),
    (r'^holistic_encoder\.e_causal\.', 'encode_transformer.transformer2.'),
    (r'^holistic_encoder\.', 'encode_transformer.'),
    (r'^fusion_decoder\.transformer\.layers\.(\d+)\.(q|k|v|out)\.', r'decode_transformer.transformer.layers.\1.attn1.\2_proj.'),
    (r'^fusion_decoder\.holistic_position_embedding$', 'decode_transformer.slot_position_embedding'),
    (r'^fusion_decoder\.vfm_proj\.', 'decode_transformer.proj.'),
    (r'^fusion_decoder\.', 'decode_transformer.'),
    (r'\.ffn\.', '.ffnet.'),
    (r'^patch_quantizer\.codebook$', 'quantize.embedding.weight'),
    (r'^patch_quantizer\.usage$', 'quantize.codebook_used'),
    (r'^holistic_quantizer\.codebook$', 'slot_quantize.embedding.weight'),
    (r'^holistic_quantizer\.usage$', 'slot_quantize.codebook_used'),
    (r'^pre_holistic_quant\.', 'pre_slots_quant.'),
    (r'^post_holistic_quant\.', 'post_slots_quant.'),
] + mapping.COMMON_RULES

# Official layouts that keep leading singleton dims.
_EXPORT_TRANSFORMS = {
    r'(holistic_tokens|pos_embed|position_embedding)$': lambda a: a[None],
    r'mask_embedding$': lambda a: a[None, None],
    r'\.usage$': lambda a: a.astype(np.float32),
}


def tokenizer_filter():
  """Everything an official tokenizer checkpoint holds: parameters and code-usage buffers, no DINOv2."""
  return nnx.All(nnx.Any(nnx.Param, nnx.PathContains('usage')), nnx.Not(nnx.PathContains('dinov2')))


def load_official_tokenizer(model: Tokenizer, state_dict: dict[str, np.ndarray], *,
                            strict: bool = True) -> dict:
  """Loads an official tokenizer state dict (no `backbone` keys needed) into `model` in place.
  `codebook_used` buffers are optional (usage statistics only)."""
  sd = {k: v for k, v in state_dict.items() if '.backbone.' not in k}
  report = mapping.import_params(model, sd, TOKENIZER_RULES, filt=tokenizer_filter(), strict=False)
  report['missing'] = [k for k in report['missing'] if not k.endswith('codebook_used')]
  if strict and (report['missing'] or report['unexpected']):
    raise MissingEntryError(f'tokenizer checkpoint does not match the config: missing '
                            f"{report['missing'][:10]} ({len(report['missing'])}), unexpected "
                            f"{report['unexpected'][:10]} ({len(report['unexpected'])}). Check the "
                            'config (sizes, Hita-V vs Hita-U).')
  return report


def export_official_tokenizer(model: Tokenizer) -> dict[str, np.ndarray]:
  """hita_jax tokenizer -> official state dict (without DINOv2, as `vq_train.py` saves it)."""
  return mapping.export_params(model, TOKENIZER_RULES, filt=tokenizer_filter(),
                               transforms=_EXPORT_TRANSFORMS)


def official_adam_moments(model_sd: dict[str, np.ndarray], optimizer: dict, num_dinov2_params: int
                          ) -> tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]]:
  """vq_train.py's generator Adam `state_dict()` -> moments keyed by official names. The optimizer
  covers `vq_model.parameters()`: the checkpoint's `model` order without the `codebook_used`
  buffers, plus the frozen DINOv2 (removed from the saved state dict; no state, as it gets no
  gradients), whose parameters follow `encode_transformer.pos_embed` (the encoder's own parameters
  come before its `backbone` child)."""
  order: list[str | None] = []
  for k in model_sd:
    if k.endswith('codebook_used') or '.backbone.' in k:
      continue
    order.append(k)
    if k == 'encode_transformer.pos_embed':
      order += [None] * num_dinov2_params
  return mapping.torch_adam_moments(order, optimizer)


if __name__ == '__main__':  # the old command line: say what replaced it
  from hita_jax import cli
  cli.moved('hita_jax.convert.tokenizer', 'hita_jax.tools.convert tokenizer')
