"""Name/layout translation between hita_jax parameter paths and official PyTorch state-dict keys.

A model's mapping is an ordered list of regex substitutions applied to our dotted parameter path
(e.g. `holistic_encoder.e_trans.layers.0.q.kernel`) to obtain the official key
(`encode_transformer.transformer1.layers.0.attn1.to_q.weight`), plus a list of layout rules. Import
and export both walk our own parameter tree, so every parameter is accounted for in both
directions and the round trip is exact (only transposes and reshapes).
"""
from __future__ import annotations

import os
import re
from typing import Iterable, Sequence

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from hita_jax.errors import ExistingPathError, MissingEntryError, UserError

# Suffix rules shared by all models: our fp32 norm wrappers hold an inner `norm`.
COMMON_RULES = [
    (r'\.norm\.scale$', '.weight'),
    (r'\.norm\.bias$', '.bias'),
    (r'\.kernel$', '.weight'),
    (r'\.scale$', '.weight'),
]


def path_str(path: Sequence) -> str:
  return '.'.join(str(p) for p in path)


def translate(path: str, rules: Iterable[tuple[str, str]]) -> str:
  for pat, rep in rules:
    path = re.sub(pat, rep, path)
  return path


def flat_variables(module: nnx.Module, filt=nnx.Variable) -> dict[str, nnx.Variable]:
  """{dotted path: Variable} for the module's variables that match `filt`."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(module, filt)):
    out[path_str(path)] = var
  return out


def to_ours(arr: np.ndarray, our_shape: tuple, our_dtype, *, key: str, kernel: bool) -> np.ndarray:
  """Official tensor -> our layout: conv kernels OIHW -> HWIO, linear kernels (out, in) -> (in, out),
  tables stored with extra singleton dims reshaped."""
  arr = np.asarray(arr)
  if kernel:
    arr = arr.transpose(2, 3, 1, 0) if arr.ndim == 4 else arr.T if arr.ndim == 2 else arr
  if arr.shape != tuple(our_shape):
    if _strip_ones(arr.shape) != _strip_ones(our_shape):
      raise UserError(f'{key}: shape {arr.shape} does not fit our {tuple(our_shape)}')
    arr = arr.reshape(our_shape)
  return arr.astype(our_dtype)


def _strip_ones(shape):
  return tuple(s for s in shape if s != 1)


def kernel_to_official(arr: np.ndarray) -> np.ndarray:
  if arr.ndim == 4:
    return arr.transpose(3, 2, 0, 1)
  if arr.ndim == 2:
    return arr.T
  return arr


def import_params(module: nnx.Module, state_dict: dict[str, np.ndarray], rules, *,
                  filt=nnx.Variable, transforms: dict | None = None, strict: bool = True,
                  ignore: Sequence[str] = ()) -> dict[str, list[str]]:
  """Loads an official state dict into `module` in place. Returns {'missing': [...],
  'unexpected': [...]} (official key names); with strict=True either one raises."""
  transforms = transforms or {}
  variables = flat_variables(module, filt)
  used, missing = set(), []
  for ours, var in variables.items():
    key = translate(ours, rules)
    if key not in state_dict:
      missing.append(key)
      continue
    arr = state_dict[key]
    for pat, fn in transforms.items():
      if re.search(pat, ours):
        arr = fn(arr)
    var[...] = to_ours(arr, var.shape, var.dtype, key=key, kernel=ours.endswith('kernel'))
    used.add(key)
  unexpected = sorted(k for k in state_dict if k not in used
                      and not any(re.search(p, k) for p in ignore))
  report = {'missing': sorted(missing), 'unexpected': unexpected}
  if strict and (missing or unexpected):
    raise MissingEntryError(f'checkpoint does not match the model: missing {missing[:8]}'
                            f'{"..." if len(missing) > 8 else ""} ({len(missing)}), unexpected '
                            f'{unexpected[:8]}{"..." if len(unexpected) > 8 else ""} ({len(unexpected)})')
  return report


def export_params(module: nnx.Module, rules, *, filt=nnx.Variable,
                  official_shapes: dict[str, tuple] | None = None,
                  transforms: dict | None = None) -> dict[str, np.ndarray]:
  """Our parameters -> official {key: array}. `official_shapes` (key -> shape) restores singleton
  dims the official layout has; patterns in `transforms` map our path -> fn(array) -> array."""
  transforms = transforms or {}
  out = {}
  for ours, var in flat_variables(module, filt).items():
    key = translate(ours, rules)
    arr = np.asarray(var[...])
    if ours.endswith('kernel'):
      arr = kernel_to_official(arr)
    for pat, fn in transforms.items():
      if re.search(pat, ours):
        arr = fn(arr)
    if official_shapes and key in official_shapes:
      arr = arr.reshape(official_shapes[key])
    out[key] = np.ascontiguousarray(arr)  # writers such as safetensors need C order
  return out


def write_state_dict(path: str, sd: dict[str, np.ndarray], *, overwrite: bool = False) -> None:
  """Writes an official-layout state dict as .safetensors or .npz (never over an existing file
  unless asked)."""
  if os.path.exists(path) and not overwrite:
    raise ExistingPathError(f'{path} exists; pass --overwrite to replace it')
  if path.endswith('.safetensors'):
    save_file(sd, path)
  elif path.endswith('.npz'):
    np.savez(path, **sd)
  else:
    raise UserError(f'{path}: the output must end in .safetensors or .npz (fix --out)')


def torch_adam_moments(order: Sequence[str | None], optimizer: dict
                       ) -> tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]]:
  """A PyTorch Adam/AdamW `state_dict()` -> (step, {key: exp_avg}, {key: exp_avg_sq}). `order` names
  the optimizer's parameters in its index order (its groups concatenated); None marks a frozen
  parameter, which has no state."""
  indices = [i for g in optimizer['param_groups'] for i in g['params']]
  if len(indices) != len(order):
    raise ValueError(f'optimizer state covers {len(indices)} parameters, the model has {len(order)}')
  exp_avg, exp_avg_sq, steps = {}, {}, set()
  state = optimizer['state']
  for i, key in zip(indices, order):
    st = state.get(i, state.get(str(i)))
    if key is None:
      continue
    if st is None:
      raise ValueError(f'optimizer state has no entry for parameter {i} ({key})')
    exp_avg[key], exp_avg_sq[key] = np.asarray(st['exp_avg']), np.asarray(st['exp_avg_sq'])
    steps.add(int(np.asarray(st['step'])))
  if len(steps) > 1:
    raise ValueError(f'optimizer state has differing step counts {sorted(steps)}')
  return (steps.pop() if steps else 0), exp_avg, exp_avg_sq
