"""Untrusted files: a .pt whose pickle runs a command, a zip bomb, an .npz with object arrays and a
safetensors file with a lying header are each refused with a clear message; the command never runs."""
import io
import json
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest

from hita_jax.convert import torch_files
from hita_jax.convert.torch_files import CheckpointFormatError, load_state_dict_file
from hita_jax.errors import UserError


class _RunsACommand:
  """Unpickling this calls os.system (what a malicious checkpoint does)."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f'touch {self.marker}',)


def _torch_zip(path, payload: bytes, members=()):
  """A torch.save-style zip: archive/data.pkl (+ extra members)."""
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as z:
    z.writestr('archive/data.pkl', payload)
    z.writestr('archive/version', '3\n')
    for name, data, method in members:
      z.writestr(zipfile.ZipInfo(name), data, compress_type=method)
  return str(path)


@pytest.mark.parametrize('use_torch', [True, False])
@pytest.mark.parametrize('layout', ['zip', 'legacy'])
def test_pickle_that_runs_a_command_is_refused(tmp_path, use_torch, layout, torch):
  marker = tmp_path / 'pwned'
  payload = pickle.dumps({'ema': {'w': _RunsACommand(marker)}}, protocol=2)
  path = tmp_path / 'evil.pt'
  if layout == 'zip':
    _torch_zip(path, payload)
  else:
    path.write_bytes(payload)
  with pytest.raises(CheckpointFormatError, match=r'evil\.pt: cannot read as a torch checkpoint'):
    load_state_dict_file(str(path), use_torch=use_torch)
  assert not marker.exists()
  assert issubclass(CheckpointFormatError, UserError)  # main prints it as one line


@pytest.mark.parametrize('use_torch', [True, False])
def test_zip_bomb_is_refused_before_reading(tmp_path, use_torch, torch, monkeypatch):
  # 256 MiB of zeros deflate to ~256 KiB; the check reads only the zip directory
  monkeypatch.setattr(torch_files, '_BOMB_SIZE', 1 << 20)  # a 4 MiB bomb is enough to test the rule
  bomb = b'\0' * (4 << 20)
  path = _torch_zip(tmp_path / 'bomb.pt', pickle.dumps({}, protocol=2),
                    [('archive/data/0', bomb, zipfile.ZIP_DEFLATED)])
  with pytest.raises(CheckpointFormatError, match=r'archive/data/0 would decompress to 4194304 bytes.*zip bomb'):
    load_state_dict_file(path, use_torch=use_torch)
  npz = tmp_path / 'bomb.npz'
  with zipfile.ZipFile(npz, 'w') as z:
    z.writestr(zipfile.ZipInfo('w.npy'), bomb, compress_type=zipfile.ZIP_DEFLATED)
  with pytest.raises(CheckpointFormatError, match=r'zip bomb'):
    load_state_dict_file(str(npz))


def test_default_bomb_limit_passes_real_checkpoints(tmp_path):
  np.savez(tmp_path / 'ok.npz', w=np.ones((64, 64), np.float32))
  assert load_state_dict_file(str(tmp_path / 'ok.npz'))['w'].shape == (64, 64)


def test_npz_with_object_arrays_is_refused(tmp_path):
  marker = tmp_path / 'pwned'
  np.savez(tmp_path / 'obj.npz', w=np.array([_RunsACommand(marker)], dtype=object))
  with pytest.raises(CheckpointFormatError, match=r'obj\.npz: cannot read as npz \(Object arrays cannot be loaded'):
    load_state_dict_file(str(tmp_path / 'obj.npz'))
  assert not marker.exists()


def _safetensors(path, header: dict, data: bytes, header_len=None):
  h = json.dumps(header).encode()
  path.write_bytes(struct.pack('<Q', len(h) if header_len is None else header_len) + h + data)
  return str(path)


@pytest.mark.parametrize('case', ['offsets_past_the_end', 'shape_not_matching_offsets', 'header_length'])
def test_safetensors_with_a_lying_header_is_refused(tmp_path, case):
  data = np.arange(4, dtype=np.float32).tobytes()
  header = {'w': {'dtype': 'F32', 'shape': [4], 'data_offsets': [0, 16]}}
  if case == 'offsets_past_the_end':
    header['w'].update(shape=[1 << 28], data_offsets=[0, 1 << 30])
  elif case == 'shape_not_matching_offsets':
    header['w'].update(shape=[1000])
  path = _safetensors(tmp_path / 'lie.safetensors', header, data,
                      header_len=(1 << 40) if case == 'header_length' else None)
  with pytest.raises(CheckpointFormatError, match=r'lie\.safetensors: cannot read as safetensors'):
    load_state_dict_file(path)
  # the honest header reads
  good = _safetensors(tmp_path / 'ok.safetensors', {'w': {'dtype': 'F32', 'shape': [4],
                                                          'data_offsets': [0, 16]}}, data)
  np.testing.assert_array_equal(load_state_dict_file(good)['w'], np.arange(4, dtype=np.float32))


def test_unsafe_pickle_reports_the_class(tmp_path):
  payload = pickle.dumps({'ema': {'w': io.BytesIO(b'')}}, protocol=2)
  path = _torch_zip(tmp_path / 'cls.pt', payload)
  with pytest.raises(CheckpointFormatError, match=r'refusing to unpickle _io.BytesIO'):
    load_state_dict_file(path, use_torch=False)
