"""Reading PyTorch checkpoints safely, with or without torch.

* `.safetensors` and `.npz` are read with numpy only.
* `.pt`/`.pth`/`.bin` are read with `torch.load(weights_only=True)` when torch is installed, or with
  our own numpy reader otherwise (zip format and the legacy pre-1.6 format). Both unpickle data only:
  tensors, containers, numbers and exactly one class, `argparse.Namespace` (official checkpoints keep
  their training `args` in it). Anything else is refused with a message naming it.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import io
import os
import pickle
import struct
import zipfile
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from hita_jax.errors import MissingPathError, UserError

try:  # bfloat16 storages (optional: numpy has no bf16)
  import ml_dtypes
  _BF16 = ml_dtypes.bfloat16
except ImportError:  # pragma: no cover
  _BF16 = None

_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': _BF16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_ALLOWED_CLASSES = {('argparse', 'Namespace'): argparse.Namespace,
                    ('collections', 'OrderedDict'): collections.OrderedDict}


class CheckpointFormatError(UserError):
  """A checkpoint file that cannot be read (corrupt, unsupported or unsafe content)."""


# Zip members larger than this and compressed more than _MAX_RATIO times are refused as zip bombs:
# torch.save and np.savez write members uncompressed, so a real checkpoint never comes near either.
_BOMB_SIZE = 64 << 20
_MAX_RATIO = 100


def check_zip(path: str) -> None:
  """Refuses a zip (torch checkpoint, .npz) whose members would decompress to far more than the
  file holds, before anything is read."""
  try:
    with zipfile.ZipFile(path) as z:
      infos = z.infolist()
  except zipfile.BadZipFile as e:
    raise CheckpointFormatError(f'{path}: corrupt zip archive ({e})') from e
  total = 0
  for info in infos:
    total += info.file_size
    if info.file_size > _BOMB_SIZE and info.file_size > _MAX_RATIO * max(info.compress_size, 1):
      raise CheckpointFormatError(
          f'{path}: member {info.filename} would decompress to {info.file_size} bytes from '
          f'{info.compress_size} (a zip bomb?); refusing to read it')
  if total > _BOMB_SIZE and total > _MAX_RATIO * max(os.path.getsize(path), 1):
    raise CheckpointFormatError(f'{path}: members would decompress to {total} bytes from a '
                                f'{os.path.getsize(path)}-byte file (a zip bomb?); refusing to read it')


def _rebuild_tensor(storage, offset, size, stride, *unused):
  arr, = storage if isinstance(storage, tuple) else (storage,)
  if not size:
    return arr[offset:offset + 1].reshape(()).copy()
  item = arr.itemsize
  # A view, not a copy: the legacy format fills storages only after the object is unpickled.
  return np.lib.stride_tricks.as_strided(arr[offset:], tuple(size), [s * item for s in stride])


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *unused):
  return data


class _Storage:
  def __init__(self, name):
    self.name = name


class _RestrictedUnpickler(pickle.Unpickler):

  def __init__(self, file, load_storage):
    super().__init__(file)
    self._load_storage = load_storage

  def find_class(self, module, name):
    if (module, name) in _ALLOWED_CLASSES:
      return _ALLOWED_CLASSES[(module, name)]
    if module == 'torch._utils' and name in ('_rebuild_tensor_v2', '_rebuild_tensor'):
      return _rebuild_tensor
    if module == 'torch._utils' and name == '_rebuild_parameter':
      return _rebuild_parameter
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _Storage(name)
    raise pickle.UnpicklingError(
        f'refusing to unpickle {module}.{name}: only tensors, containers and argparse.Namespace '
        'are allowed in a checkpoint')

  def persistent_load(self, pid):
    # ('storage', storage_type, key, location, numel[, view_metadata])
    if not isinstance(pid, tuple) or pid[0] != 'storage':
      raise pickle.UnpicklingError(f'unsupported persistent id {pid!r}')
    st = pid[1]
    name = st.name if isinstance(st, _Storage) else str(st)
    dtype = _STORAGE_DTYPES.get(name)
    if dtype is None:
      raise pickle.UnpicklingError(f'unsupported storage type {name}')
    return self._load_storage(str(pid[2]), dtype, int(pid[4]))


def _load_zip(path: str):
  with zipfile.ZipFile(path) as z:
    names = z.namelist()
    pkl = next((n for n in names if n.endswith('data.pkl')), None)
    if pkl is None:
      raise CheckpointFormatError(f'{path}: zip file without data.pkl, not a torch checkpoint')
    prefix = pkl[:-len('data.pkl')]
    cache = {}

    def load_storage(key, dtype, numel):
      if key not in cache:
        raw = z.read(f'{prefix}data/{key}')
        cache[key] = np.frombuffer(raw, dtype=dtype)[:numel]
      return cache[key]

    return _RestrictedUnpickler(io.BytesIO(z.read(pkl)), load_storage).load()


def _load_legacy(path: str):
  """Pre-1.6 `torch.save` format: magic, protocol, sys info, the object, its storage keys, then each
  storage as an int64 element count followed by raw little-endian data."""
  with open(path, 'rb') as f:
    def plain():
      return _RestrictedUnpickler(f, lambda *a: None).load()
    if plain() != _LEGACY_MAGIC:
      raise CheckpointFormatError(f'{path}: not a torch checkpoint (bad magic number)')
    plain()  # protocol version
    plain()  # sys info
    storages = {}

    def load_storage(key, dtype, numel):
      return storages.setdefault(key, np.empty(numel, dtype))

    obj = _RestrictedUnpickler(f, load_storage).load()
    for key in plain():
      (n,) = struct.unpack('<q', f.read(8))
      arr = storages[key]
      data = np.frombuffer(f.read(n * arr.itemsize), dtype=arr.dtype)
      if data.size != n:
        raise CheckpointFormatError(f'{path}: truncated storage {key}')
      arr[:n] = data
  return obj


def _torch_load(path: str):
  import torch  # optional
  with torch.serialization.safe_globals([argparse.Namespace]):
    obj = torch.load(path, map_location='cpu', weights_only=True)

  def conv(x):
    if isinstance(x, torch.Tensor):
      x = x.detach().cpu()
      if x.dtype == torch.bfloat16:
        return x.float().numpy().astype(_BF16)
      return x.numpy()
    if isinstance(x, dict):
      return type(x)((k, conv(v)) for k, v in x.items()) if isinstance(x, collections.OrderedDict) \
          else {k: conv(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return type(x)(conv(v) for v in x)
    return x
  return conv(obj)


def load_torch_checkpoint(path: str, *, use_torch: bool | None = None) -> Any:
  """Loads a `.pt`/`.pth` file into numpy arrays with data-only unpickling."""
  if not os.path.exists(path):
    raise MissingPathError(f'checkpoint not found: {path}')
  if use_torch is None:
    use_torch = importlib.util.find_spec('torch') is not None
  if zipfile.is_zipfile(path):
    check_zip(path)
  try:
    if use_torch:
      return _torch_load(path)
    if zipfile.is_zipfile(path):
      return _load_zip(path)
    return _load_legacy(path)
  except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, KeyError, struct.error) as e:
    raise CheckpointFormatError(f'{path}: cannot read as a torch checkpoint ({_reason(e)})') from e
  except Exception as e:  # torch raises its own error types for unsafe or corrupt files
    if type(e).__module__.startswith('torch') or 'Weights only load failed' in str(e):
      raise CheckpointFormatError(f'{path}: cannot read as a torch checkpoint ({_reason(e)})') from e
    raise


def _reason(e: BaseException) -> str:
  """The cause of a failed read on one line: of torch's weights-only message (a paragraph about
  PyTorch 2.6's defaults and a documentation link) only what its unpickler found."""
  text = str(e)
  if 'WeightsUnpickler error:' in text:
    text = text.split('WeightsUnpickler error:', 1)[1]
    text = text.split('Check the documentation of torch.load', 1)[0]
  return ' '.join(text.split())


def load_state_dict_file(path: str, *, key: str | None = 'ema', use_torch: bool | None = None
                         ) -> dict[str, np.ndarray]:
  """Any supported file -> flat {name: array}. For training checkpoints (dicts holding `ema`,
  `model`, ...) `key` picks the entry (default `ema`, as the official downstream code)."""
  if not os.path.exists(path):
    raise MissingPathError(f'checkpoint not found: {path}')
  if path.endswith('.safetensors'):
    try:
      return dict(load_file(path))
    except Exception as e:
      raise CheckpointFormatError(f'{path}: cannot read as safetensors ({e})') from e
  if path.endswith('.npz'):
    check_zip(path)
    try:
      with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
    except Exception as e:
      raise CheckpointFormatError(f'{path}: cannot read as npz ({e})') from e
  obj = load_torch_checkpoint(path, use_torch=use_torch)
  return pick_state_dict(obj, key=key, path=path)


def pick_state_dict(obj: Any, *, key: str | None = 'ema', path: str = '<checkpoint>'):
  if not isinstance(obj, dict):
    raise CheckpointFormatError(f'{path}: expected a dict, found {type(obj).__name__}')
  if all(isinstance(v, np.ndarray) for v in obj.values()):
    sd = obj
  else:
    candidates = [key] if key else []
    candidates += [k for k in ('ema', 'model', 'state_dict', 'module') if k not in candidates]
    found = next((k for k in candidates if k in obj and isinstance(obj[k], dict)), None)
    if found is None:
      raise CheckpointFormatError(f'{path}: no state dict under {candidates}; top-level keys: '
                                  f'{sorted(obj)}')
    if key and found != key:
      print(f'note: {path} has no {key!r} entry; using {found!r}')
    sd = obj[found]
  out = {}
  for k, v in sd.items():
    for p in ('module.', '_orig_mod.'):  # DDP / torch.compile prefixes
      if k.startswith(p):
        k = k[len(p):]
    out[k] = np.array(v)  # own the memory (readers return views of storages)
  return out


class _ScriptObject:
  """Inert stand-in for a TorchScript module object: it only records its pickled state."""

  def __init__(self, *args):
    self.state = None

  def __setstate__(self, state):
    self.state = state


class _TorchScriptUnpickler(_RestrictedUnpickler):
  """TorchScript archives pickle module objects of `__torch__.*` classes; they become inert data
  holders (their code is never imported or run). Everything else is as restricted as above."""

  def find_class(self, module, name):
    if module == '__torch__' or module.startswith('__torch__.'):
      return type(name, (_ScriptObject,), {})
    if module == 'torch.jit._pickle' and name.startswith('build_'):
      return lambda x: x
    return super().find_class(module, name)


def load_torchscript_arrays(path: str) -> dict[str, np.ndarray]:
  """All tensors held by a TorchScript file's modules, as {dotted attribute path: array}."""
  if not os.path.exists(path):
    raise MissingPathError(f'TorchScript file not found: {path}')
  try:
    with zipfile.ZipFile(path) as z:
      pkl = next((n for n in z.namelist() if n.endswith('/data.pkl')), None)
      if pkl is None:
        raise CheckpointFormatError(f'{path}: no data.pkl; not a TorchScript archive')
      prefix = pkl[:-len('data.pkl')]

      def load_storage(key, dtype, numel):
        return np.frombuffer(z.read(f'{prefix}data/{key}'), dtype=dtype)[:numel]

      root = _TorchScriptUnpickler(io.BytesIO(z.read(pkl)), load_storage).load()
  except (pickle.UnpicklingError, zipfile.BadZipFile, KeyError, EOFError) as e:
    raise CheckpointFormatError(f'{path}: cannot read as TorchScript ({e})') from e
  out: dict[str, np.ndarray] = {}

  def walk(obj, prefix):
    state = obj.state if isinstance(obj, _ScriptObject) else obj
    if isinstance(state, dict):
      for k, v in state.items():
        if isinstance(v, np.ndarray):
          out[prefix + str(k)] = np.array(v)
        elif isinstance(v, (_ScriptObject, dict)):
          walk(v, f'{prefix}{k}.')
  walk(root, '')
  return out
