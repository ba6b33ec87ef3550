"""Reading a golden-fixture directory in the format of `shared/fixtures/official/`: model configs
from its JSON files, weights through the loading module (`hita_jax.pretrained`), per-array
tolerances from its README. A fixture file that cannot be read, or a JSON lacking an entry a model
description needs, raises a UserError naming the file (and the entry)."""
from __future__ import annotations

import contextlib
import glob
import os

import numpy as np
import math

from flax import nnx

from hita_jax import pretrained
from hita_jax.convert.torch_files import load_state_dict_file
from hita_jax.errors import MissingEntryError, UserError, read_json_object
from hita_jax.models.dino_discriminator import DinoDiscConfig, DinoDiscriminator
from hita_jax.models.dinov2 import DinoV2, DinoV2Config
from hita_jax.models.gpt import GPT, GPTConfig
from hita_jax.models.tokenizer import Tokenizer, TokenizerConfig


def dinov2_config_from_json(d: dict) -> DinoV2Config:
  if str(d.get('act', 'GELU(erf)')).lower() not in ('gelu(erf)', 'gelu'):
    raise UserError(f"unsupported DINOv2 activation {d.get('act')}")
  if d.get('ffn_layer', 'mlp') != 'mlp':
    raise UserError(f"unsupported DINOv2 ffn_layer {d.get('ffn_layer')}")
  return DinoV2Config(
      embed_dim=d['embed_dim'], depth=d['depth'], num_heads=d['num_heads'],
      mlp_ratio=d.get('mlp_ratio', 4.0), patch_size=d.get('patch_size', 14),
      img_size=d.get('img_size', 518), num_register_tokens=d.get('num_register_tokens', 0),
      layer_norm_eps=d.get('layer_norm_eps', 1e-6),
      interpolate_antialias=d.get('interpolate_antialias', False),
      interpolate_offset=d.get('interpolate_offset', 0.1), qkv_bias=d.get('qkv_bias', True))


def tokenizer_config_from_json(j: dict) -> TokenizerConfig:
  """Official VQModel description (fixture JSON) -> TokenizerConfig."""
  vq, cnn = j['vq_model_args'], j.get('cnn', {})
  enc = j['transformer_config']['encoder_config']['params']
  dec = j['transformer_config']['decoder_config']['params']
  der = j.get('derived', {})
  if enc.get('layer_type', 'normal') != 'normal':
    raise UserError(f"unsupported layer_type {enc.get('layer_type')}")
  if not vq.get('codebook_l2_norm', True):
    raise UserError('only l2-normalised codebooks are supported (as the official models)')
  dino = dinov2_config_from_json(j['dinov2'])
  vfm = bool(dec.get('enable_vfm_recon', False))
  return TokenizerConfig(
      image_size=der.get('input_size', enc['image_size']),
      pos_grid=enc['image_size'] // enc['patch_size'],
      ch=cnn.get('ch', 128), ch_mult=tuple(cnn.get('ch_mult', vq['encoder_ch_mult'])),
      encoder_res_blocks=cnn.get('encoder_num_res_blocks', 2),
      decoder_res_blocks=cnn.get('decoder_num_res_blocks', 3),
      cnn_dropout=vq.get('dropout_p', 0.0), dim=vq['z_channels'],
      codebook_size=vq['codebook_size'], patch_code_dim=vq['codebook_embed_dim'],
      holistic_code_dim=vq['codebook_slots_embed_dim'], num_holistic=enc['n_carrier'],
      depth=enc['depth'], num_heads=enc['num_head'], head_dim=enc.get('dim_head', 64),
      mlp_dim=enc['mlp_dim'], dropout=enc.get('dropout', 0.0), shift_k=dec.get('shift_k', 4),
      vfm=vfm, vfm_out_dim=der.get('vfm_out_dim') or 1024, vfm_grid=der.get('vfm_grid') or 16,
      beta=vq.get('commit_loss_beta', 0.25), entropy_loss_ratio=vq.get('entropy_loss_ratio', 0.0),
      dinov2=dino, dinov2_input_size=der.get('dinov2_input_size', 224))


def _read_json(fixtures: str, name: str) -> dict:
  return read_json_object(os.path.join(fixtures, f'{name}.json'), ' (a golden-fixture file)')


@contextlib.contextmanager
def _entries_of(fixtures: str, name: str):
  """Inside: building a model description from `<name>.json`; a missing entry (or one of the
  wrong type) or an unsupported value raises a UserError naming the file (and the entry)."""
  path = os.path.join(fixtures, f'{name}.json')
  try:
    yield
  except UserError as e:
    e.args = (f'{path}: {e.args[0] if e.args else e}',) + e.args[1:]
    raise
  except (KeyError, TypeError) as e:
    what = f'no entry {e.args[0]!r}' if isinstance(e, KeyError) else f'an entry of the wrong type ({e})'
    raise MissingEntryError(f'{path} has {what}; it is not in the format of '
                            'shared/fixtures/official') from e


def tokenizer_from_fixture(fixtures: str, name: str) -> tuple[Tokenizer, dict]:
  """The official tokenizer `name` (e.g. `tokenizer_v`) with its fixture weights and DINOv2."""
  j = _read_json(fixtures, name)
  with _entries_of(fixtures, name):
    cfg = tokenizer_config_from_json(j)
  model = pretrained.load_tokenizer(
      cfg, os.path.join(fixtures, j.get('weights', f'{name}.safetensors')),
      dinov2=os.path.join(fixtures, j.get('dinov2_weights', 'dinov2.safetensors')))
  model.eval()
  return model, j


def dinov2_from_fixture(fixtures: str) -> tuple[DinoV2, dict]:
  j = _read_json(fixtures, 'dinov2')
  with _entries_of(fixtures, 'dinov2'):
    cfg = dinov2_config_from_json(j)
  model = DinoV2(cfg, rngs=nnx.Rngs(0))
  pretrained.load_dinov2(model, os.path.join(fixtures, j.get('weights', 'dinov2.safetensors')))
  model.eval()
  return model, j


def readme_tolerances(fixtures: str) -> dict[str, dict[str, float]]:
  """{array: {'stage': atol, 'end-to-end': atol}} from the README's array tables."""
  path = os.path.join(fixtures, 'README.md')
  if not os.path.exists(path):
    return {}
  out: dict[str, dict[str, float]] = {}
  header = None
  for line in open(path):
    if not line.startswith('|'):
      header = None
      continue
    cells = [c.strip() for c in line.strip().strip('|').split('|')]
    if 'atol (stage)' in cells:
      header = cells
      continue
    if header is None or not cells or not cells[0].startswith('`'):
      continue
    name = cells[0].strip('`')
    row = dict(zip(header, cells))
    tol = {}
    for kind in ('stage', 'end-to-end'):
      v = row.get(f'atol ({kind})', '')
      try:
        tol[kind] = float(v.replace('+-', '').replace('±', ''))
      except ValueError:
        pass  # 'exact where margin >= 1e-3' and similar rules are applied by the checker
    out[name] = tol
  return out


def tokenizer_names(fixtures: str) -> list[str]:
  return sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(fixtures, 'tokenizer_*.json')))


def load_npz(path: str) -> dict[str, np.ndarray]:
  """The arrays of an .npz (a corrupt or unsafe file raises CheckpointFormatError naming it)."""
  return load_state_dict_file(path, key=None)


def gpt_config_from_json(j: dict) -> GPTConfig:
  """Official ModelArgs (fixture JSON) -> GPTConfig (dropouts off: fixtures are deterministic)."""
  a = j['model_args']
  if a.get('n_kv_head') not in (None, a['n_head']):
    raise UserError('grouped-query attention is not part of the official Hita GPT')
  if a.get('model_type', 'c2i') != 'c2i':
    raise UserError(f"only class-conditional models are supported, got {a.get('model_type')}")
  grid = math.isqrt(a['block_size'])
  if grid * grid != a['block_size']:
    raise UserError(f"block_size {a['block_size']} is not a square grid")
  return GPTConfig(
      dim=a['dim'], n_layer=a['n_layer'], n_head=a['n_head'], multiple_of=a.get('multiple_of', 256),
      ffn_dim_multiplier=a.get('ffn_dim_multiplier'), rope_base=a.get('rope_base', 10000),
      norm_eps=a.get('norm_eps', 1e-5), vocab_size=a['vocab_size'], num_holistic=a['num_slots'],
      grid=grid, num_classes=a['num_classes'], class_dropout_prob=a.get('class_dropout_prob', 0.1),
      cls_token_num=a.get('cls_token_num', 1), token_dropout=0.0, attn_dropout=0.0,
      resid_dropout=0.0, ffn_dropout=0.0, drop_path_rate=0.0)


def gpt_from_fixture(fixtures: str) -> tuple[GPT, dict]:
  j = _read_json(fixtures, 'gpt')
  with _entries_of(fixtures, 'gpt'):
    cfg = gpt_config_from_json(j)
  model = pretrained.load_gpt(cfg, os.path.join(fixtures, j.get('weights', 'gpt.safetensors')))
  model.eval()
  return model, j


def unpack_bits(raw: dict[str, np.ndarray], packing: dict) -> dict[str, np.ndarray]:
  """A bit-packed fixture state dict -> float32 arrays: w = (2 * bit - 1) * scale (README)."""
  out = {}
  for k, v in raw.items():
    m = packing.get(k)
    if m:
      bits = np.unpackbits(v, bitorder=m.get('bitorder', 'little'), count=m['numel'])
      v = ((bits.astype(np.float32) * 2 - 1) * np.float32(m['scale'])).reshape(m['shape'])
    out[k] = v
  return out


def dino_disc_config_from_json(j: dict, batch_norm_groups: int = 1) -> DinoDiscConfig:
  """Official DinoDisc description (`dino_disc.json`) -> DinoDiscConfig."""
  a, f = j['constructor_args'], j.get('fixed', {})
  if str(a.get('norm_type', 'bn')) != 'bn':
    raise UserError(f"only norm_type 'bn' (BatchNormLocal, as VQLoss builds it) is supported, "
                    f"got {a.get('norm_type')}")
  if str(f.get('mlp_act', "GELU(approximate='tanh')")) != "GELU(approximate='tanh')":
    raise UserError(f"unsupported DINO activation {f.get('mlp_act')}")
  return DinoDiscConfig(
      embed_dim=f.get('embed_dim', 384), depth=a.get('depth', 12), num_heads=f.get('num_heads', 6),
      mlp_ratio=f.get('mlp_ratio', 4.0), patch_size=f.get('patch_size', 16),
      img_size=f.get('img_size', 224), key_depths=tuple(a.get('key_depths', (2, 5, 8, 11))),
      kernel_size=a.get('ks', 9), norm_eps=a.get('norm_eps', 1e-6),
      virtual_batch_size=f.get('virtual_bs', 8), batch_norm_groups=batch_norm_groups,
      spectral_norm=bool(a.get('using_spec_norm', True)))


def dino_disc_state_dict(fixtures: str) -> tuple[dict[str, np.ndarray], dict]:
  j = _read_json(fixtures, 'dino_disc')
  raw = load_state_dict_file(os.path.join(fixtures, j.get('weights', 'dino_disc.safetensors')), key=None)
  with _entries_of(fixtures, 'dino_disc'):
    return unpack_bits(raw, j.get('packing', {})), j


def dino_disc_from_fixture(fixtures: str) -> tuple[DinoDiscriminator, dict]:
  """The official DINO discriminator of the fixtures (frozen DINO + heads), in eval mode."""
  sd, j = dino_disc_state_dict(fixtures)
  with _entries_of(fixtures, 'dino_disc'):
    cfg = dino_disc_config_from_json(j)
  model = pretrained.load_dino_discriminator(
      cfg, {k: v for k, v in sd.items() if k.startswith('dino_proxy.0.')},
      heads_state_dict=sd)
  model.eval()
  return model, j
