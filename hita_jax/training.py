"""Plumbing the training tasks share: LR schedules, EMA, a classifier's optimizer step, global
batches from per-process data, and one metric logger (CLU scalars and images for TensorBoard,
`metrics.jsonl`, a progress line with throughput and ETA), so that each trainer loop reads
step -> log -> save.

The logger follows flax's `periodic_actions.ReportProgress` (rate and ETA since the run's start,
written every `every` steps) and MaxText's `MetricLogger` (per-step metrics stay on device until a
log step, then are averaged on the host once, written to the event files and to a JSON-lines file).
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from hita_jax import sharding
from hita_jax.data.images import image_grid, save_png
from hita_jax.errors import NonFiniteError


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


def ema_update(ema, params, decay: float, finite=None):
  """ema * decay + params * (1 - decay), the weight 1 - decay taken in double precision as the
  official `ema.mul_(decay).add_(p, alpha=1 - decay)`. `finite` (a traced bool): on a non-finite
  step the weights become (1, 0), which returns the EMA's values (params are finite then; only a
  -0.0 may come back as +0.0), so `keep_if_finite` need not select it. `ema` is a tree like
  `params`, or one vector of them (`flat_vector`'s order): then the update is one fused kernel
  instead of one per parameter tensor (a smaller program for XLA to fuse and compile)."""
  keep, take = decay, 1.0 - decay
  if finite is not None:
    keep, take = jnp.where(finite, keep, 1.0), jnp.where(finite, take, 0.0)
  if jax.tree.structure(ema) != jax.tree.structure(params):
    if not hasattr(ema, 'ndim') or ema.ndim != 1:
      raise ValueError('ema_update: the EMA is neither shaped like the parameters nor one vector')
    return ema * keep + flat_vector(params).astype(ema.dtype) * take
  return jax.tree.map(lambda e, p: e * keep + p.astype(e.dtype) * take, ema, params)


@nnx.jit
def classifier_step(model: nnx.Module, opt: nnx.Optimizer, x, y):
  """One optimizer step of a classifier (`model(x)` -> logits) on integer labels `y`: mean softmax
  cross-entropy, gradients of `opt`'s variables, `opt.update` in place; returns the loss. The
  demo's shape judge and the linear probe train with it."""
  def loss_fn(m):
    return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  opt.update(model, grads)
  return loss


def global_batch(local: dict[str, np.ndarray], shardings: dict) -> dict[str, jax.Array]:
  """Per-process numpy batch -> global jax.Arrays, each key with its sharding (`shardings[key]`)."""
  return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
          for k, v in local.items()}


# At most this many leaves per concatenate in `flat_vector`, and per cut in `_cut` (0, the
# default: one concatenate of every leaf, one cut into every leaf). Each group is materialised
# behind an optimization barrier, because XLA merges nested concatenates (and slices of slices)
# back into one. An opt-in for compile A/Bs: with groups of 23, XLA GPU's priority fusion made
# 28,717 fusions in the Hita-V step against 33,424 (H200, 2026-12-06), but the flat optimizer's
# pattern alone compiles in time linear in the leaf count either way (`bench fanin_compile`), and
# the step's A/B is not settled (docs/PERFORMANCE.md, session 28). Same values either way.
FLAT_CONCAT_GROUP = 0


def _groups(n: int, group: int) -> list[tuple[int, int]]:
  return [(i, min(i + group, n)) for i in range(0, n, group)] if group and n > group else [(0, n)]


def flat_vector(tree, group: int | None = None):
  """The leaves of `tree` raveled and concatenated in tree order (as `optax.flatten` does);
  `group`: `FLAT_CONCAT_GROUP` unless given."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    raise ValueError('flat_vector: the tree has no arrays (no parameters to optimize?)')
  pieces = [jnp.reshape(x, [-1]) for x in leaves]
  spans = _groups(len(pieces), FLAT_CONCAT_GROUP if group is None else group)
  if len(spans) > 1:
    pieces = [jax.lax.optimization_barrier(jnp.concatenate(pieces[a:b])) for a, b in spans]
  return jnp.concatenate(pieces)


def flat_copy(tree, mesh):
  """`flat_vector(tree)` born replicated on `mesh` (a flat EMA's initial value)."""
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(flat_vector, out_shardings=rep)(tree)


def _cut(vector, leaves, group: int | None = None):
  """`vector` cut into pieces shaped like `leaves`, in order (the inverse of `flat_vector`);
  `group` as there."""
  sizes = [x.size for x in leaves]
  spans = _groups(len(leaves), FLAT_CONCAT_GROUP if group is None else group)
  if len(spans) > 1:  # one cut into groups, each group materialised, then each cut into leaves
    ends = np.cumsum([sum(sizes[a:b]) for a, b in spans])[:-1]
    chunks = [jax.lax.optimization_barrier(c) for c in jnp.split(vector, ends)]
  else:
    chunks = [vector]
  parts = []
  for chunk, (a, b) in zip(chunks, spans):
    parts += jnp.split(chunk, np.cumsum(sizes[a:b])[:-1])
  return [p.reshape(x.shape) for p, x in zip(parts, leaves)]


def unflatten_like(vector, like):
  """The inverse of `flat_vector`: `vector` cut into `like`'s leaves (their shapes and dtypes, in
  tree order), jitted and placed like them (one program, never eager ops on global arrays)."""
  leaves, treedef = jax.tree.flatten(like)
  n = sum(x.size for x in leaves)
  if vector.shape != (n,):
    raise ValueError(f'unflatten_like: a vector of {vector.shape} for {n} parameter values')
  cut = lambda v: jax.tree.unflatten(treedef, [p.astype(x.dtype) for p, x in zip(_cut(v, leaves), leaves)])
  shardings = [getattr(x, 'sharding', None) for x in leaves]
  if all(isinstance(sh, jax.sharding.Sharding) for sh in shardings):
    return jax.jit(cut, out_shardings=jax.tree.unflatten(treedef, shardings))(vector)
  return jax.jit(cut)(vector)


def grad_norm(grads, flat: bool):
  """The gradients' global norm as the step's clip sees it: with a flat optimizer the norm of the
  same concatenated vector (XLA shares it with the clip's), so the metric adds no per-tensor
  reductions."""
  return optax.global_norm(flat_vector(grads) if flat else grads)


def init_optimizer_state(tx, params, mesh, flat: bool):
  """`tx`'s state for `params`, born sharded: per parameter, or (flat) for their concatenation
  (one replicated vector per moment; for replicated parameters)."""
  if flat:
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(lambda p: tx.init(flat_vector(p)), out_shardings=rep)(params)
  return sharding.init_optimizer(tx, params, mesh)


def optimizer_step(tx, grads, opt_state, params, *, flat: bool, finite=None):
  """One step of `tx` -> (new params, new optimizer state).

  flat: `tx` updates the concatenated gradients (one vector: its clip norm, Adam moments and
  update are a few fused kernels instead of several per parameter tensor), and each parameter
  takes its slice of the update; `tx.update` gets no parameters there (a transformation that
  needs them, e.g. weight decay, is not for this layout). `finite` (a traced bool, flat only)
  replaces the update of a non-finite step by -0.0, so the parameters come back bit for bit
  (p + -0.0 == p, signed zeros included) and `keep_if_finite` need not select them (`kept=`); the
  optimizer state still has to be selected."""
  if not flat:
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  update, opt_state = tx.update(flat_vector(grads), opt_state)
  if finite is not None:
    update = jnp.where(finite, update, -0.0)
  leaves, treedef = jax.tree.flatten(params)
  new = [(p + u).astype(p.dtype) for p, u in zip(leaves, _cut(update, leaves))]
  return jax.tree.unflatten(treedef, new), opt_state


def restore_adam(opt_state, count: int, mu, nu, like):
  """`opt_state` with its Adam moments and bias-correction count replaced (a PyTorch Adam/AdamW
  state converted to our parameter layout); `mu`/`nu` are placed like the arrays of `like` (the
  parameters), or, when the state's moments are one flat vector (`optimizer_step(flat=True)`),
  concatenated in `like`'s leaf order (`flat_vector`'s) and placed like that vector. Other
  counters, e.g. an LR schedule's, are left as they are."""
  place = lambda tree: jax.tree.map(lambda a, p: sharding.put(np.asarray(a, p.dtype), p.sharding),
                                    tree, like)

  def place_like(tree, old):
    if not isinstance(old, jax.Array) or isinstance(like, jax.Array):  # per-parameter moments
      return place(tree)
    leaves = jax.tree.leaves(tree)
    if jax.tree.structure(tree) != jax.tree.structure(like):
      raise ValueError('restore_adam: the moments do not have the parameters\' structure')
    flat = np.concatenate([np.asarray(a, old.dtype).reshape(-1) for a in leaves])
    if flat.shape != old.shape:
      raise ValueError(f'restore_adam: {flat.shape[0]} moment values for a flat state of {old.shape[0]}')
    return sharding.put(flat, old.sharding)

  def swap(s):
    if isinstance(s, optax.ScaleByAdamState):
      return s._replace(count=jnp.asarray(count, s.count.dtype), mu=place_like(mu, s.mu),
                        nu=place_like(nu, s.nu))
    return s
  return jax.tree.map(swap, opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))


class _NoEventWriter:
  """Stands in for CLU's writer where TensorFlow is absent: metrics.jsonl and the progress lines
  still carry every scalar; only TensorBoard event files are not written."""

  def write_hparams(self, hparams):
    del hparams

  def write_scalars(self, step, scalars):
    del step, scalars

  def write_images(self, step, images):
    del step, images

  def flush(self):
    pass

  def close(self):
    pass


def _event_writer(workdir: str, main: bool):
  try:
    from clu import metric_writers  # imports TensorFlow: only where a run writes event files
  except ImportError as e:  # e.g. a GPU image without TensorFlow
    if main:
      print(f'warning: no TensorBoard event files ({e}); install tensorflow for them. '
            'Metrics go to metrics.jsonl.', flush=True)
    return _NoEventWriter()
  return metric_writers.create_default_writer(workdir, just_logging=not main)


def all_finite(metrics: dict, watch: tuple[str, ...]):
  """Whether every `watch` metric (losses, gradient norms) is finite: the step's guard."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(metrics[k])) for k in watch]))


def keep_if_finite(old_state: dict, new_state: dict, metrics: dict, watch: tuple[str, ...],
                   kept: tuple[str, ...] = ()):
  """Inside the jitted step: `new_state` if every `watch` metric (losses, gradient norms) is
  finite, else `old_state` with only its step advanced (the batch is consumed, nothing is
  applied). Adds `nonfinite` (0/1) to the metrics. A select per array, not `lax.cond`: XLA fuses
  the select into the update that produces each new array, whereas the conditional copied the whole
  new state into its outputs every step (1,627 copies and 428 copy fusions in the tokenizer step's
  2026-12-04 H200 program: the bulk of the "copies" share, ~5 %, of its 2026-12-03 profile).
  `kept`: state keys the caller already returns unchanged on a non-finite step (e.g. parameters
  updated by `optimizer_step(..., finite=)`); they are taken as they are, without a select each."""
  finite = all_finite(metrics, watch)

  def select(new, old):  # lax.select: shapes and dtypes must agree, as they had to for the cond
    return jax.lax.select(jnp.broadcast_to(finite, new.shape), new, old)

  def pick(new, old):
    if jax.dtypes.issubdtype(new.dtype, jax.dtypes.prng_key):  # PRNG keys select as their data
      return jax.random.wrap_key_data(select(jax.random.key_data(new), jax.random.key_data(old)),
                                      impl=jax.random.key_impl(new))
    return select(new, old)
  state = jax.tree.map(pick, {k: v for k, v in new_state.items() if k not in kept},
                       {k: v for k, v in old_state.items() if k not in kept})
  state = {**state, **{k: new_state[k] for k in kept}, 'step': new_state['step']}
  return state, {**metrics, 'nonfinite': jnp.logical_not(finite).astype(jnp.int32)}


def finite_or_inf(x) -> float:
  """A checkpoint's best-metric value: a skipped (non-finite) step is never the best."""
  v = float(x)
  return v if np.isfinite(v) else float('inf')


class MetricLogger:
  """Reports a training run. `log(step, metrics)` is called every step with the step's device
  metrics; every `every` steps (and at the last) it averages them, adds throughput and the
  `extra()` scalars, writes CLU scalars and `metrics.jsonl`, and prints
  `step s/N  rate img/s  ETA  k1 v1 k2 v2 ...` for `line_keys`. Process 0 writes; all compute.

  Steps the jitted step skipped as non-finite (`nonfinite` = 1, see `keep_if_finite`) are left out
  of the averages and counted (`nonfinite_steps`); `max_nonfinite` of them in a row stop the run
  with a NonFiniteError naming the metric and the step (`check()` looks before every save).

  `lag=True`: a due period is fetched and written at the next `log` call, i.e. after the caller has
  dispatched the next step, so the device keeps working while the host fetches, writes and prints
  (fetching at once drains the device queue every `every` steps: ~2 ms a GPT-B step at every=10 on
  an H200). The last step, `check()` and `close()` write a waiting period at once; `extra()` is then
  called one step later, so it must not read the training state (train_ar's throughput does not)."""

  def __init__(self, workdir: str, *, total_steps: int, start_step: int, every: int,
               images_per_step: int, line_keys: tuple[str, ...],
               hparams: dict | None = None, watch: tuple[str, ...] = (), max_nonfinite: int = 0,
               lag: bool = False):
    self.workdir, self.total, self.every = workdir, total_steps, every
    self.items, self.line_keys = images_per_step, line_keys
    self.main = jax.process_index() == 0
    self.writer = _event_writer(workdir, self.main)
    if self.main:
      self._truncate_jsonl(start_step)
    if start_step == 0 and hparams:
      self.writer.write_hparams({k: v for k, v in hparams.items() if isinstance(v, (int, float, str, bool))})
    self._acc: list = []
    self._steps: list[int] = []
    self._checked = 0  # entries of _acc already looked at by check()
    self.watch, self.max_nonfinite = watch, max_nonfinite
    self.nonfinite_total, self.nonfinite_run = 0, 0
    self.last_step_time = float('nan')  # mean seconds per step over the last logging period
    self._t0 = self._t_last = time.time()
    self._s0 = start_step
    self.lag = lag
    self._waiting = None  # (step, extra) of a due period not yet written (lag=True)

  def _truncate_jsonl(self, start_step: int):
    """A resumed run repeats the steps after its checkpoint: their records (and a line cut by a
    kill) are dropped, so `metrics.jsonl` holds each step once, from the run that counts."""
    path = os.path.join(self.workdir, 'metrics.jsonl')
    if not os.path.exists(path):
      return
    keep = []
    with open(path) as f:
      for line in f:
        try:
          if json.loads(line)['step'] <= start_step:
            keep.append(line if line.endswith('\n') else line + '\n')
        except (ValueError, KeyError):
          pass  # a line cut short by a kill
    with open(path + '.tmp', 'w') as f:
      f.writelines(keep)
    os.replace(path + '.tmp', path)

  def due(self, step: int) -> bool:
    return step % self.every == 0 or step == self.total

  def check(self):
    """Counts the skipped (non-finite) steps not yet looked at; raises NonFiniteError once
    `max_nonfinite` come in a row. Fetches only the flags and watched metrics of those steps.
    A period waiting to be written (`lag`) is written first (before a save: none is lost)."""
    self.flush()
    self._check(len(self._acc))

  def flush(self) -> dict | None:
    """Writes the due period waiting since the last `log` call (`lag`), if any."""
    if self._waiting is None:
      return None
    (step, extra), self._waiting = self._waiting, None
    return self._write(step, extra, self._steps.index(step) + 1)

  def _check(self, upto: int):
    pending = [{k: m[k] for k in ('nonfinite', *self.watch) if k in m}
               for m in self._acc[self._checked:upto]]
    for s, m in zip(self._steps[self._checked:upto], jax.device_get(pending)):
      if not int(m.get('nonfinite', 0)):
        self.nonfinite_run = 0
        continue
      self.nonfinite_run += 1
      self.nonfinite_total += 1
      bad = [k for k in self.watch if k in m and not np.all(np.isfinite(m[k]))] or ['a watched metric']
      print(f'step {s}: non-finite {", ".join(bad)}; update skipped '
            f'({self.nonfinite_run} in a row, {self.nonfinite_total} in this run)', flush=True)
      if self.max_nonfinite and self.nonfinite_run >= self.max_nonfinite:
        raise NonFiniteError(
            f'{", ".join(bad)} not finite for {self.nonfinite_run} steps in a row, the last at step {s}; '
            'the run stops (the last checkpoint holds finite weights: lower the learning rate or check '
            'the data, then rerun to resume)')
    self._checked = max(self._checked, upto)

  def log(self, step: int, metrics: dict, extra: Callable[[], dict] | None = None) -> dict | None:
    """Returns the scalars written in this call (with `lag`, those of the previous due step; at
    the last step, the last period's), else None."""
    self._acc.append(metrics)
    self._steps.append(step)
    written = self.flush()
    if not self.due(step):
      return written
    if self.lag and step != self.total:
      self._waiting = (step, extra)
      return written
    return self._write(step, extra, len(self._acc))

  def _write(self, step: int, extra, upto: int) -> dict:
    """Averages, times and writes the first `upto` entries (the period ending at `step`)."""
    self._check(upto)
    host = jax.device_get(self._acc[:upto])
    good = [m for m in host if not int(m.get('nonfinite', 0))]
    scalars = {k: float(np.mean([m[k] for m in good])) for k in host[0] if k != 'nonfinite'} if good else {}
    if not all(np.isfinite(v) for v in scalars.values()):
      raise FloatingPointError(f'non-finite metrics at step {step}: {scalars}')
    if self.watch:
      scalars['nonfinite_steps'] = self.nonfinite_total
    now = time.time()
    step_time = self.last_step_time = (now - self._t_last) / len(host)
    self._acc, self._steps, self._t_last = self._acc[upto:], self._steps[upto:], now
    self._checked = max(0, self._checked - upto)
    scalars.update(step_time_s=step_time, images_per_s=self.items / step_time)
    if extra:
      scalars.update(extra())
    self.writer.write_scalars(step, scalars)
    if self.main:
      with open(os.path.join(self.workdir, 'metrics.jsonl'), 'a') as f:
        f.write(json.dumps({'step': step, **scalars}) + '\n')
      rate = (step - self._s0) / max(now - self._t0, 1e-9)
      eta = (self.total - step) / max(rate, 1e-9)
      line = '  '.join(f'{k} {scalars[k]:.4f}' for k in self.line_keys if k in scalars)
      print(f'step {step}/{self.total}  {rate * self.items:.1f} img/s  ETA {eta / 60:.1f} min  '
            f'{line}', flush=True)
    return scalars

  def image(self, step: int, name: str, images: np.ndarray, rows: int):
    """A grid of uint8 images: TensorBoard and `<name>_<step>.png` in the workdir."""
    grid = image_grid(images, rows=rows)
    if self.main:
      save_png(os.path.join(self.workdir, f'{name}_{step:07d}.png'), grid)
    self.writer.write_images(step, {name: grid[None]})

  def close(self):
    self.flush()
    self.writer.flush()
    self.writer.close()
