"""Weight import/export: official layout round trip, safe checkpoint reading with and without torch."""
import argparse
import os
import pickle

import numpy as np
import pytest
from flax import nnx

from hita_jax.convert import torch_files
from hita_jax.convert.dinov2 import export_dinov2, load_dinov2
from hita_jax.convert.tokenizer import (export_official_tokenizer, load_official_tokenizer,
                                        tokenizer_filter)
from tests.utils import param_leaves, tiny_tokenizer


@pytest.mark.parametrize('variant', ['V', 'U'])
def test_tokenizer_export_import_is_bit_exact(variant):
  src = tiny_tokenizer(variant, seed=1)
  src.train()
  src(np.random.RandomState(0).uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32))  # fill usage
  sd = export_official_tokenizer(src)
  assert 'encode_transformer.carrier_tokens' in sd and sd['encode_transformer.carrier_tokens'].ndim == 3
  assert sd['encoder.conv_in.weight'].shape == (32, 3, 3, 3)  # OIHW
  assert ('decode_transformer.mask_embedding' in sd) == (variant == 'U')
  assert not any('backbone' in k or 'dinov2' in k for k in sd)
  dst = tiny_tokenizer(variant, seed=2)
  report = load_official_tokenizer(dst, sd)
  assert report == {'missing': [], 'unexpected': []}
  for a, b in zip(param_leaves(src, tokenizer_filter()), param_leaves(dst, tokenizer_filter())):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  sd2 = export_official_tokenizer(dst)
  assert sd2.keys() == sd.keys()
  for k in sd:
    assert sd2[k].dtype == sd[k].dtype and np.array_equal(sd2[k], sd[k]), k


def test_official_fixture_round_trip(official_fixtures):
  from safetensors.numpy import load_file
  from hita_jax.tools.fixtures import tokenizer_from_fixture as build_tokenizer
  model, _ = build_tokenizer(official_fixtures, 'tokenizer_v')
  sd = load_file(os.path.join(official_fixtures, 'tokenizer_v.safetensors'))
  out = export_official_tokenizer(model)
  assert out.keys() == sd.keys()
  for k in sd:
    assert out[k].dtype == sd[k].dtype and np.array_equal(out[k], sd[k]), k
  dsd = load_file(os.path.join(official_fixtures, 'dinov2.safetensors'))
  dout = export_dinov2(model.dinov2)
  assert dout.keys() == dsd.keys()
  for k in dsd:
    assert np.array_equal(dout[k], dsd[k]), k


def test_mismatched_checkpoint_is_explained():
  sd = export_official_tokenizer(tiny_tokenizer('U'))
  with pytest.raises(KeyError, match='unexpected.*mask_embedding'):
    load_official_tokenizer(tiny_tokenizer('V'), sd)
  del sd['encoder.conv_in.weight']
  with pytest.raises(KeyError, match='missing.*encoder.conv_in.weight'):
    load_official_tokenizer(tiny_tokenizer('U'), sd)


def test_npz_and_safetensors_files(tmp_path):
  from safetensors.numpy import save_file
  sd = export_official_tokenizer(tiny_tokenizer('V'))
  save_file(sd, str(tmp_path / 'tok.safetensors'))
  np.savez(tmp_path / 'tok.npz', **sd)
  for name in ('tok.safetensors', 'tok.npz'):
    got = torch_files.load_state_dict_file(str(tmp_path / name))
    assert all(np.array_equal(got[k], sd[k]) for k in sd)
  (tmp_path / 'bad.safetensors').write_bytes(b'not a safetensors file')
  with pytest.raises(torch_files.CheckpointFormatError, match='bad.safetensors'):
    torch_files.load_state_dict_file(str(tmp_path / 'bad.safetensors'))
  with pytest.raises(FileNotFoundError, match='nothere.pt'):
    torch_files.load_state_dict_file(str(tmp_path / 'nothere.pt'))


class _Evil:
  def __reduce__(self):
    return (os.system, ('echo pwned',))


def test_numpy_reader_refuses_code(tmp_path):
  path = tmp_path / 'evil.pt'
  with open(path, 'wb') as f:  # a legacy-format header followed by a malicious object
    for obj in (torch_files._LEGACY_MAGIC, 1001, {}):
      pickle.dump(obj, f)
    pickle.dump({'ema': _Evil()}, f)
  with pytest.raises(torch_files.CheckpointFormatError, match='refusing to unpickle'):
    torch_files.load_torch_checkpoint(str(path), use_torch=False)


def _official_like_checkpoint(torch, sd):
  t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
  return {'model': {k: v * 0 for k, v in t.items()}, 'ema': t, 'steps': 5,
          'optimizer': {'state': {}, 'param_groups': [{'lr': 1e-4}]},
          'args': argparse.Namespace(image_size=336, codebook_slots_embed_dim=12)}


@pytest.mark.parametrize('zip_format', [True, False])
@pytest.mark.parametrize('use_torch', [True, False])
def test_pt_checkpoints_with_namespace(torch, tmp_path, zip_format, use_torch):
  sd = export_official_tokenizer(tiny_tokenizer('V', seed=3))
  path = str(tmp_path / 'hita-tok.pt')
  torch.save(_official_like_checkpoint(torch, sd), path, _use_new_zipfile_serialization=zip_format)
  got = torch_files.load_state_dict_file(path, use_torch=use_torch)  # 'ema' by default
  assert got.keys() == sd.keys()
  for k in sd:
    np.testing.assert_array_equal(got[k], sd[k])
  model = torch_files.load_state_dict_file(path, key='model', use_torch=use_torch)
  assert all(not np.any(v) for v in model.values())
  raw = torch_files.load_torch_checkpoint(path, use_torch=use_torch)
  assert isinstance(raw['args'], argparse.Namespace) and raw['args'].image_size == 336


@pytest.mark.parametrize('use_torch', [True, False])
def test_pt_with_other_classes_is_refused(torch, tmp_path, use_torch):
  path = str(tmp_path / 'evil.pt')
  torch.save({'ema': {}, 'x': _Evil()}, path)
  with pytest.raises(torch_files.CheckpointFormatError):
    torch_files.load_torch_checkpoint(path, use_torch=use_torch)


def test_bf16_and_views(torch, tmp_path):
  a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
  sd = {'t': a.t(), 'b': a.to(torch.bfloat16), 's': a[1:, 2:]}
  path = str(tmp_path / 'v.pt')
  torch.save(sd, path)
  got = torch_files.load_state_dict_file(path, use_torch=False)
  np.testing.assert_array_equal(got['t'], a.t().numpy())
  np.testing.assert_array_equal(got['b'].astype(np.float32), a.numpy())
  np.testing.assert_array_equal(got['s'], a[1:, 2:].numpy())


def test_dinov2_hub_pth_round_trip(torch, tmp_path):
  from hita_jax.models.dinov2 import DinoV2, DinoV2Config
  cfg = DinoV2Config(embed_dim=24, depth=2, num_heads=2, img_size=28)
  src = DinoV2(cfg, rngs=nnx.Rngs(0))
  sd = export_dinov2(src)
  assert sd['blocks.0.attn.qkv.weight'].shape == (72, 24) and sd['cls_token'].shape == (1, 1, 24)
  path = str(tmp_path / 'dinov2_vits14_reg4_pretrain.pth')
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
  dst = DinoV2(cfg, rngs=nnx.Rngs(1))
  load_dinov2(dst, torch_files.load_state_dict_file(path, key=None, use_torch=False))
  for a, b in zip(param_leaves(src), param_leaves(dst)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
