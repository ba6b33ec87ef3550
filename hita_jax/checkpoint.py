"""Params-only checkpoints (Orbax): what converters write and what later stages (training init,
sampling, evaluation) read. A directory holds `params/` (Orbax) and `config.json`.

Training-state checkpoints (optimizer, EMA, data iterator, resume) live with the trainers.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx


def _stringify(tree):
  # Orbax wants string keys; nnx list indices are ints.
  if isinstance(tree, dict):
    return {str(k): _stringify(v) for k, v in tree.items()}
  return tree


def _restore_keys(tree, like):
  if isinstance(like, dict):
    return {k: _restore_keys(tree[str(k)], v) for k, v in like.items()}
  return tree


def save_params(directory: str, module_or_state, *, config: dict | None = None,
                filt=nnx.Param, overwrite: bool = False, metadata: dict | None = None) -> str:
  """Writes the module's variables matching `filt` (default: all nnx.Param) to `directory`."""
  directory = os.path.abspath(directory)
  if os.path.exists(os.path.join(directory, 'params')):
    if not overwrite:
      raise FileExistsError(f'{directory} already holds a params checkpoint; choose another '
                            'directory or pass overwrite=True (--overwrite)')
  state = (nnx.state(module_or_state, filt) if isinstance(module_or_state, nnx.Module)
           else module_or_state)
  tree = _stringify(nnx.to_pure_dict(state))
  tree = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
  os.makedirs(directory, exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(directory, 'params'), tree, force=overwrite)
  ckptr.wait_until_finished()
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump({'config': config, 'metadata': metadata or {}}, f, indent=1, default=str)
  return directory


def read_export_config(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: {directory} is not a hita_jax params export')
  with open(path) as f:
    return json.load(f)


def load_params(directory: str, module: nnx.Module, *, filt=nnx.Param) -> nnx.Module:
  """Restores a params export into `module` in place (shapes must match its config), keeping
  each target variable's sharding."""
  path = os.path.join(os.path.abspath(directory), 'params')
  if not os.path.exists(path):
    raise FileNotFoundError(f'no params checkpoint at {path}')
  state = nnx.state(module, filt)
  like = nnx.to_pure_dict(state)
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)),
      _stringify(like))
  try:
    restored = ocp.StandardCheckpointer().restore(path, target)
  except (ValueError, KeyError) as e:
    raise ValueError(f'{directory}: checkpoint does not fit the model config ({e})') from e
  nnx.replace_by_pure_dict(state, _restore_keys(restored, like))
  nnx.update(module, state)
  return module
