"""Orbax checkpoints, both kinds:

* params exports: what converters and trainers write and what later stages (training init,
  sampling, evaluation) read; a directory holds `params/` (Orbax) and `config.json`;
* training states: the whole train state (params, optimizers, EMA) with the grain data iterator,
  async saves, latest-N + best retention, and resume from the latest step of a workdir.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm
from flax import nnx
from hita_jax.errors import ExistingPathError, SaveError, UserError, MissingPathError, read_json_object

from hita_jax import sharding


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
  """Writes the module's variables matching `filt` (default: all nnx.Param) to `directory`.
  The new export is written beside it and swapped in only once complete, so a failed or killed
  write leaves the previous export as it was (a failure raises SaveError naming the path)."""
  directory = os.path.abspath(directory)
  if os.path.exists(os.path.join(directory, 'params')):
    if not overwrite:
      raise ExistingPathError(f'{directory} already holds a params checkpoint; choose another '
                              'directory or pass overwrite=True (--overwrite)')
  sharding.sync('save_params:checked')  # no process may see another's fresh write as "existing"
  state = (nnx.state(module_or_state, filt) if isinstance(module_or_state, nnx.Module)
           else module_or_state)
  tree = _stringify(nnx.to_pure_dict(state))
  # Arrays spread over several processes stay jax.Arrays: every process writes its shards (Orbax's
  # multi-process save); the rest are written once, as numpy.
  tree = jax.tree.map(lambda x: x if isinstance(x, jax.Array) and not x.is_fully_addressable
                      else np.asarray(jax.device_get(x)), tree)
  tmp, old = directory + '.writing', directory + '.old'
  entries = ('params', 'config.json')  # only these are replaced: other files in `directory` stay
  main = sharding.is_main_process()  # process 0 moves files; every process writes its shards
  try:
    if main:
      _recover_export(directory)
      shutil.rmtree(tmp, ignore_errors=True)
      os.makedirs(tmp)
    sharding.sync('save_params:tmp_ready')
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(tmp, 'params'), tree)
    ckptr.wait_until_finished()
    if main:
      with open(os.path.join(tmp, 'config.json'), 'w') as f:
        json.dump({'config': config, 'metadata': metadata or {}}, f, indent=1, default=str)
      open(os.path.join(tmp, 'COMPLETE'), 'w').close()  # from here a killed write is finished, not undone
      os.makedirs(directory, exist_ok=True)
      if os.path.exists(os.path.join(directory, 'params')):  # the previous export aside, then the new in
        os.makedirs(old)
        for e in entries:
          if os.path.exists(os.path.join(directory, e)):
            os.rename(os.path.join(directory, e), os.path.join(old, e))
      _recover_export(directory)  # moves the new entries in, drops the old
  except Exception as e:
    if main:
      if os.path.exists(os.path.join(tmp, 'COMPLETE')):
        os.remove(os.path.join(tmp, 'COMPLETE'))  # a failed write is undone
      _recover_export(directory)
    raise SaveError(f'cannot write the params export {directory}: {e} (free space or make the '
                    'directory writable; the previous export is unchanged)') from e
  sharding.sync('save_params:done')
  return directory


def _recover_export(directory: str) -> None:
  """Finishes or undoes an export write that was killed or failed: a complete new export (its
  `COMPLETE` marker written) is moved in, otherwise the previous one is put back."""
  tmp, old = directory + '.writing', directory + '.old'
  if os.path.exists(os.path.join(tmp, 'COMPLETE')):  # roll forward
    os.makedirs(directory, exist_ok=True)
    for e in os.listdir(tmp):
      if e != 'COMPLETE':
        dst = os.path.join(directory, e)
        if os.path.isdir(dst):
          shutil.rmtree(dst)
        os.replace(os.path.join(tmp, e), dst)
  elif os.path.exists(old):  # roll back
    for e in os.listdir(old):
      if not os.path.exists(os.path.join(directory, e)):
        os.rename(os.path.join(old, e), os.path.join(directory, e))
  shutil.rmtree(tmp, ignore_errors=True)
  shutil.rmtree(old, ignore_errors=True)


def read_export_config(directory: str) -> dict[str, Any]:
  return read_json_object(os.path.join(directory, 'config.json'),
                          f': {directory} is not a hita_jax params export')


def _check_shapes(directory: str, metadata, target) -> None:
  """One line naming the first parameter whose saved shape differs from the model's, both shapes."""
  meta = getattr(metadata, 'item_metadata', metadata)
  meta = getattr(meta, 'tree', meta)
  saved = {jax.tree_util.keystr(p): getattr(m, 'shape', None)
           for p, m in jax.tree_util.tree_flatten_with_path(meta)[0]}
  for p, t in jax.tree_util.tree_flatten_with_path(target)[0]:
    name = jax.tree_util.keystr(p)
    if name not in saved:
      raise UserError(f'{directory}: parameter {name} of the model config is missing from the '
                      'checkpoint (was it written for another model config?)')
    if saved[name] is not None and tuple(saved[name]) != tuple(t.shape):
      raise UserError(f'{directory}: parameter {name} has shape {tuple(saved[name])} in the checkpoint '
                      f'but {tuple(t.shape)} in the model config; set the config to match the '
                      'checkpoint (e.g. --config.gpt.num_classes, the model size)')


def load_params(directory: str, module: nnx.Module, *, filt=nnx.Param) -> nnx.Module:
  """Restores a params export into `module` in place (shapes must match its config), keeping
  each target variable's sharding."""
  path = os.path.join(os.path.abspath(directory), 'params')
  if not os.path.exists(path):
    raise MissingPathError(f'no params checkpoint at {path}')
  state = nnx.state(module, filt)
  like = nnx.to_pure_dict(state)
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)),
      _stringify(like))
  ckptr = ocp.StandardCheckpointer()
  _check_shapes(directory, ckptr.metadata(path), target)
  try:
    restored = ckptr.restore(path, target)
  except (ValueError, KeyError) as e:
    raise UserError(f'{directory}: checkpoint does not fit the model config ({e})') from e
  nnx.replace_by_pure_dict(state, _restore_keys(restored, like))
  nnx.update(module, state)
  return module


# -- training states ------------------------------------------------------------------------------

def checkpoint_manager(directory: str, *, every: int, keep: int, best_metric: str | None = None,
                       async_save: bool = True) -> ocp.CheckpointManager:
  """Latest `keep` steps (+ the one with the smallest `best_metric`), the state and the data iterator
  of each."""
  import grain  # grain's checkpoint handler: only where training states are written, not on load
  policies = [cm.LatestN(keep)]
  if best_metric:  # keeps the step with the smallest metric (BestN sorts ascending)
    policies.append(cm.BestN(get_metric_fn=lambda m: m[best_metric], reverse=True, n=1))
  options = ocp.CheckpointManagerOptions(
      enable_async_checkpointing=async_save,
      save_decision_policy=cm.save_decision_policy.FixedIntervalPolicy(every),
      preservation_policy=cm.AnyPreservationPolicy(policies),
      best_fn=(lambda m: m[best_metric]) if best_metric else None, best_mode='min')
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'data': grain.checkpoint.CheckpointHandler()},
      options=options)


def _save_failed(mngr, step: int | None, e: Exception) -> SaveError:
  latest = mngr.latest_step()
  what = 'the checkpoint in flight' if step is None else f'the checkpoint of step {step}'
  keep = f'the checkpoint of step {latest} is intact and a rerun resumes from it' if latest is not None \
      else 'no earlier checkpoint exists'
  return SaveError(f'cannot write {what} under {mngr.directory}: {e} '
                   f'(free space or make the workdir writable; {keep})')


def save_train_state(mngr, step: int, state, data_iter, metrics: dict | None = None):
  """Starts an async save (finishing the previous one first). Orbax writes into a temporary
  directory and renames it when complete, so a failed or killed save never replaces a good one;
  a failure raises SaveError naming the directory."""
  import grain  # as in checkpoint_manager
  try:
    return mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=grain.checkpoint.CheckpointSave(data_iter)),
                     metrics=metrics, force=True)
  except UserError:
    raise
  except Exception as e:  # OSError (disk full, read-only), or Orbax's wrapper of it
    raise _save_failed(mngr, step, e) from e


def finish_saves(mngr):
  """Waits for the async save in flight; its failure raises SaveError as `save_train_state`."""
  try:
    mngr.wait_until_finished()
  except UserError:
    raise
  except Exception as e:
    raise _save_failed(mngr, None, e) from e


def _is_grain(it) -> bool:
  import grain
  return isinstance(it, grain.DatasetIterator)


def abstract_like(state):
  """The restore target of a train state: shapes, dtypes and the *current* shardings, so a
  checkpoint written on another mesh or device/process count is resharded onto this one as read."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def latest_state_metadata(mngr) -> dict | None:
  """The tree metadata (ArrayMetadata leaves: shapes, dtypes) of the latest step's train state, or
  None without a checkpoint (or one whose metadata cannot be read). Cheap: reads no array."""
  step = mngr.latest_step()
  if step is None:
    return None
  try:
    md = ocp.StandardCheckpointer().metadata(os.path.join(str(mngr.directory), str(step), 'state'))
  except (OSError, ValueError, KeyError):
    return None
  md = getattr(md, 'item_metadata', md)
  md = getattr(md, 'tree', md)
  return md if isinstance(md, dict) else None


def resume(mngr, state, data_iter):
  """Restores the latest training state of `mngr` (and the data iterator, in place), if any;
  returns (state, step). The state lands on `state`'s shardings whatever mesh wrote it. A data
  position written by another number of processes is read from process 0's file: the pipelines
  (`data.sources.process_slice`) count global batches alike for any process count."""
  import grain  # as in checkpoint_manager
  if mngr.latest_step() is None:
    return state, 0
  start = int(mngr.latest_step())
  target = abstract_like(state)
  data_dir = os.path.join(str(mngr.directory), str(start), 'data')
  own = os.path.join(data_dir, f'process_{jax.process_index()}-of-{jax.process_count()}.json')
  if os.path.exists(own) or data_iter is None:
    args = {'state': ocp.args.StandardRestore(target)}
    if data_iter is not None:
      args['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    out = mngr.restore(start, args=ocp.args.Composite(**args))
  else:
    out = mngr.restore(start, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    written = sorted(f for f in os.listdir(data_dir) if f.startswith('process_0-of-'))
    if not written:
      raise FileNotFoundError(f'{data_dir} holds no data iterator state (process_0-of-N.json)')
    with open(os.path.join(data_dir, written[0])) as f:
      text = f.read()
    # grain iterators take the parsed JSON; others (SyntheticCodes) the text, as grain's handler
    data_iter.set_state(json.loads(text) if _is_grain(data_iter) else text.encode())
    print(f'data position of {written[0]} applied to process {jax.process_index()} of '
          f'{jax.process_count()}', flush=True)
  print(f'resumed from step {start} ({mngr.directory})', flush=True)
  return out['state'], start
