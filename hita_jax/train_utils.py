"""Plumbing shared by the trainers: LR schedules, EMA, global batches, Orbax checkpointing with the
grain iterator, CLU writers, image grids."""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from PIL import Image


def lr_schedule(lr: float, warmup_steps: int, warmup_init: float = 1e-7, decay: str = 'constant',
                total_steps: int | None = None, min_lr: float = 0.0):
  """Linear warm-up from `warmup_init` to `lr`, then constant (official: timm cosine with
  lr_min = lr) or cosine to `min_lr` over the remaining steps."""
  warm = optax.linear_schedule(warmup_init, lr, max(warmup_steps, 1))
  if decay == 'constant':
    after = optax.constant_schedule(lr)
  elif decay == 'cosine':
    if not total_steps:
      raise ValueError('a cosine schedule needs the total number of steps')
    after = optax.cosine_decay_schedule(lr, max(total_steps - warmup_steps, 1), alpha=min_lr / lr)
  else:
    raise ValueError(f"lr decay must be 'constant' or 'cosine', got {decay!r}")
  return optax.join_schedules([warm, after], [warmup_steps])


def ema_update(ema, params, decay):
  return jax.tree.map(lambda e, p: e * decay + p.astype(e.dtype) * (1.0 - decay), ema, params)


def global_batch(local: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """Per-process numpy batch -> global jax.Arrays sharded over the mesh's batch axes."""
  return {k: jax.make_array_from_process_local_data(
      sharding if np.ndim(v) >= 1 else jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()),
      np.asarray(v)) for k, v in local.items()}


def checkpoint_manager(directory: str, *, every: int, keep: int, best_metric: str | None = None,
                       async_save: bool = True) -> ocp.CheckpointManager:
  import grain
  from orbax.checkpoint import checkpoint_managers as cm
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


def save_checkpoint(mngr, step: int, state, data_iter, metrics: dict | None = None, force=False):
  import grain
  return mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 data=grain.checkpoint.CheckpointSave(data_iter)),
                   metrics=metrics, force=force)


def restore_checkpoint(mngr, step: int, abstract_state, data_iter):
  import grain
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        abstract_state)
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                   data=grain.checkpoint.CheckpointRestore(data_iter)))
  return out['state']


def image_grid(images: np.ndarray, rows: int | None = None) -> np.ndarray:
  """(N, H, W, 3) uint8 -> one (rows*H, cols*W, 3) grid."""
  n, h, w, c = images.shape
  rows = rows or int(np.ceil(np.sqrt(n)))
  cols = int(np.ceil(n / rows))
  grid = np.zeros((rows * h, cols * w, c), np.uint8)
  for i, img in enumerate(images):
    r, q = divmod(i, cols)
    grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
  return grid


def save_png(path: str, image: np.ndarray):
  Image.fromarray(np.asarray(image, np.uint8)).save(path)


def to_uint8(x) -> np.ndarray:
  return np.asarray(jnp.clip(127.5 * jnp.asarray(x, jnp.float32) + 128.0, 0, 255)).astype(np.uint8)


class Progress:
  """A progress line with throughput and ETA, every `every` steps (process 0 only)."""

  def __init__(self, total: int, start: int, every: int, unit_per_step: int, unit: str = 'img'):
    self.total, self.every, self.per_step, self.unit = total, every, unit_per_step, unit
    self.t0, self.s0 = time.time(), start

  def __call__(self, step: int, extra: str = ''):
    if step % self.every and step != self.total:
      return
    el = time.time() - self.t0
    done = step - self.s0
    rate = done / max(el, 1e-9)
    eta = (self.total - step) / max(rate, 1e-9)
    if jax.process_index() == 0:
      print(f'step {step}/{self.total}  {rate * self.per_step:.1f} {self.unit}/s  '
            f'ETA {eta / 60:.1f} min  {extra}', flush=True)


def resume(mngr, state, data_iter, workdir: str):
  """Restores the latest checkpoint of this workdir (state and data iterator), if any."""
  if mngr.latest_step() is None:
    return state, 0
  start = int(mngr.latest_step())
  state = restore_checkpoint(mngr, start, state, data_iter)
  print(f'resumed from step {start} ({os.path.join(workdir, "checkpoints")})', flush=True)
  return state, start


def mean_metrics(acc: list, step: int) -> dict[str, float]:
  """Averages the per-step metric dicts gathered since the last log; stops on NaN/Inf."""
  m = jax.device_get(acc)
  scalars = {k: float(np.mean([x[k] for x in m])) for k in m[0]}
  if not all(np.isfinite(v) for v in scalars.values()):
    raise FloatingPointError(f'non-finite metrics at step {step}: {scalars}')
  return scalars


def log_jsonl(workdir: str, step: int, scalars: dict):
  """Machine-readable metrics next to the TensorBoard events (process 0)."""
  import json
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
      f.write(json.dumps({'step': step, **scalars}) + '\n')
