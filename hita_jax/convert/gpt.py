"""Official Hita GPT checkpoints (`autoregressive/models/gpt.py` Transformer) <-> hita_jax `GPT`.

| official key (plain state dict, `checkpoint['ema']`) | hita_jax                         |
|------------------------------------------------------|----------------------------------|
| `cls_embedding.embedding_table.weight` (C+1, d)       | `class_embedding` (row C = null) |
| `tok_embeddings.weight` (V, d)                        | `patch_embedding`                |
| `slot_embeddings.weight` (V, d)                       | `holistic_embedding`             |
| `slot_pos.weight` (S, d)                              | `holistic_pos`                   |
| `layers.i.attention.wqkv.weight` (3d, d)              | `blocks.wqkv[i]` (d, 3d)         |
| `layers.i.attention.wo.weight`                        | `blocks.wo[i]` (transposed)      |
| `layers.i.feed_forward.{w1,w3,w2}.weight`             | `blocks.{w1,w3,w2}[i]` (transposed) |
| `layers.i.{attention_norm,ffn_norm}.weight`           | `blocks.{attention_norm,ffn_norm}.weight[i]` |
| `norm.weight`                                         | `norm.weight`                    |
| `output.weight` (2V, d): [holistic head; patch head]  | `head` (d, 2V)                   |

Layer weights are stacked along a leading layer axis on our side.
"""
from __future__ import annotations

import re

import numpy as np

from hita_jax.convert import mapping
from hita_jax.errors import MissingEntryError, UserError
from hita_jax.models.gpt import GPT

# official key -> our variable: top level, and per layer (`layers.i.<key>` -> `blocks.<ours>[i]`)
_TOP = {'cls_embedding.embedding_table.weight': 'class_embedding', 'tok_embeddings.weight': 'patch_embedding',
        'slot_embeddings.weight': 'holistic_embedding', 'slot_pos.weight': 'holistic_pos',
        'norm.weight': 'norm.weight', 'output.weight': 'head'}
_LAYER = {'attention.wqkv.weight': 'wqkv', 'attention.wo.weight': 'wo', 'feed_forward.w1.weight': 'w1',
          'feed_forward.w3.weight': 'w3', 'feed_forward.w2.weight': 'w2',
          'attention_norm.weight': 'attention_norm.weight', 'ffn_norm.weight': 'ffn_norm.weight'}
# Linear weights are (out, in) officially, (in, out) here.
_TRANSPOSED = {'head', 'wqkv', 'wo', 'w1', 'w3', 'w2'}
# Buffers some official code paths leave in a state dict; never parameters.
_IGNORED = re.compile(r'(^|\.)(freqs_cis|causal_mask|kv_cache\.[kv]_cache)$')


def _var(module, dotted):
  obj = module
  for part in dotted.split('.'):
    obj = getattr(obj, part)
  return obj


def load_official_gpt(model: GPT, sd: dict[str, np.ndarray], *, strict: bool = True) -> dict:
  """Loads an official GPT state dict into `model` in place."""
  used, missing = set(), []
  for key, ours in _TOP.items():
    transpose = ours in _TRANSPOSED
    if key not in sd:
      missing.append(key)
      continue
    var = _var(model, ours)
    arr = np.asarray(sd[key], np.float32)
    arr = arr.T if transpose else arr
    if arr.shape != var.shape:
      raise UserError(f'{key}: shape {sd[key].shape} does not fit the config ({var.shape})')
    var[...] = arr
    used.add(key)
  n = model.cfg.n_layer
  for suffix, ours in _LAYER.items():
    transpose = ours in _TRANSPOSED
    var = _var(model.blocks, ours)
    stacked = np.zeros(var.shape, np.float32)
    for i in range(n):
      key = f'layers.{i}.{suffix}'
      if key not in sd:
        missing.append(key)
        continue
      arr = np.asarray(sd[key], np.float32)
      arr = arr.T if transpose else arr
      if arr.shape != stacked.shape[1:]:
        raise UserError(f'{key}: shape {sd[key].shape} does not fit the config ({stacked.shape[1:]})')
      stacked[i] = arr
      used.add(key)
    var[...] = stacked
  unexpected = sorted(k for k in sd if k not in used and not _IGNORED.search(k))
  if strict and (missing or unexpected):
    raise MissingEntryError(f'GPT checkpoint does not match the config: missing {missing[:8]} '
                            f'({len(missing)}), unexpected {unexpected[:8]} ({len(unexpected)}). '
                            'Check the model size and the tokenizer-dependent sizes (vocab, '
                            'holistic tokens, classes).')
  return {'missing': missing, 'unexpected': unexpected}


def export_official_gpt(model: GPT) -> dict[str, np.ndarray]:
  out = {}
  for key, ours in _TOP.items():
    transpose = ours in _TRANSPOSED
    arr = np.asarray(_var(model, ours)[...])
    out[key] = np.ascontiguousarray(arr.T if transpose else arr)
  for suffix, ours in _LAYER.items():
    transpose = ours in _TRANSPOSED
    stacked = np.asarray(_var(model.blocks, ours)[...])
    for i in range(model.cfg.n_layer):
      out[f'layers.{i}.{suffix}'] = np.ascontiguousarray(stacked[i].T if transpose else stacked[i])
  return out


def official_adamw_moments(model_sd: dict[str, np.ndarray], optimizer: dict
                           ) -> tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]]:
  """train_c2i.py's AdamW `state_dict()` -> (step, {key: exp_avg}, {key: exp_avg_sq}), keyed by the
  official parameter names. Its two groups hold the >= 2-D parameters, then the others, each in
  `named_parameters()` order, which is the order of the checkpoint's `model` state dict."""
  keys = [k for k in model_sd if not _IGNORED.search(k)]
  order = [k for k in keys if np.ndim(model_sd[k]) >= 2] + [k for k in keys if np.ndim(model_sd[k]) < 2]
  return mapping.torch_adam_moments(order, optimizer)


if __name__ == '__main__':  # the old command line: say what replaced it
  from hita_jax import cli
  cli.moved('hita_jax.convert.gpt', 'hita_jax.tools.convert gpt')
