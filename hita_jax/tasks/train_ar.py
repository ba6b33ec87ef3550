"""The `train_ar` task: AR generator training, top to bottom (build, step, loop).

Official recipe (train_c2i.py): AdamW(0.9, 0.95), weight decay 0.05 on >= 2-D parameters only,
constant LR 1e-4, clip 1.0, EMA 0.9999, bf16 compute, class dropout 0.1, token/resid/FFN dropout
0.1; loss = CE(holistic) + CE(patch). Codes come either from pre-extracted ArrayRecord shards
(`extract_codes`, the fast path: `train_ar.codes_dir`) or are computed inside the jitted step by the frozen
tokenizer on augmented images (the official behaviour). Meshes, remat and scan come from the config.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from hita_jax import checkpoint, config_lib, pretrained, sharding, training
from hita_jax.data.codes import SyntheticCodes, check_code_batch, make_codes_dataset
from hita_jax.data.images import codes_to_images, to_unit
from hita_jax.data.sources import make_image_dataset
from hita_jax.metrics import flops
from hita_jax.models.gpt import GPT, gpt_config_from
from hita_jax.models.sampler import generate
from hita_jax.errors import MissingPathError, UserError


@dataclasses.dataclass
class Parts:
  gpt_def: object
  tx: optax.GradientTransformation
  tok_def: object | None
  cfg: object


def decay_mask(params):
  """True for the parameters train_c2i.py decays: those >= 2-D in the official, unstacked layout
  (matrices and embedding tables), never the RMSNorm gains. Our layers are stacked along a leading
  layer axis under `blocks`, which does not count."""
  def decays(path, p):
    stacked = any(getattr(k, 'key', None) == 'blocks' for k in path)
    return p.ndim - int(stacked) >= 2
  return jax.tree_util.tree_map_with_path(decays, params)


def learning_rate(ar):
  """The official constant LR, or a linear warm-up and/or a cosine decay to 0 at the last step
  (`train_ar.warmup_steps`, `train_ar.lr_decay`). The demo keeps the constant LR: with its short
  runs a cosine decay gave worse samples (docs/PERFORMANCE.md, 2026-11-30)."""
  if ar.lr_decay == 'constant' and not ar.warmup_steps:
    return ar.lr
  return training.lr_schedule(ar.lr, ar.warmup_steps, 0.0, ar.lr_decay, config_lib.ar_num_steps(ar))


def adamw(lr, b1, b2, wd, clip, eps=1e-8):
  return optax.chain(optax.clip_by_global_norm(clip),
                     optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=decay_mask))


def build(config, mesh):
  ar = config.train_ar
  rules = config_lib.axis_rules(config)
  gcfg = dataclasses.replace(gpt_config_from(config.gpt), dtype=ar.compute_dtype,
                             class_dropout_prob=ar.class_dropout_prob, token_dropout=ar.token_dropout)
  ckpt = None
  if pretrained.is_training_checkpoint(config.init.gpt):
    # as train_c2i.py resumes: model, EMA and AdamW moments each from its own entry
    ckpt = pretrained.load_gpt_training_checkpoint(gcfg, config.init.gpt)
    gpt = ckpt['model']
    sharding.shard_module(gpt, mesh, rules)
  elif config.init.gpt:
    gpt = pretrained.load_gpt(gcfg, config.init.gpt, key=config.init.gpt_key)
    sharding.shard_module(gpt, mesh, rules)
  else:
    gpt = sharding.create_sharded(lambda: GPT(gcfg, rngs=nnx.Rngs(config.seed)), mesh, rules)
  gpt_def, params = nnx.split(gpt, nnx.Param)
  tx = adamw(learning_rate(ar), ar.b1, ar.b2, ar.weight_decay, ar.grad_clip, ar.adam_eps)
  opt = sharding.init_optimizer(tx, params, mesh)
  ema = jax.tree.map(jnp.copy, params)
  if ckpt is not None:
    ema = jax.tree.map(lambda a, p: sharding.put(jnp.asarray(a), p.sharding),
                       nnx.state(ckpt['ema'], nnx.Param), params)
    if ckpt['adam'] is not None:
      opt = training.restore_adam(opt, *ckpt['adam'], like=params)
    print(f"init.gpt: model, EMA{' and AdamW state' if ckpt['adam'] else ''} of a training checkpoint "
          f"at step {ckpt['steps']}", flush=True)
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt': opt, 'ema': ema}
  tok_def, tok_state = None, None
  if not ar.codes_dir:  # codes on the fly, inside the step (official)
    tcfg = config_lib.tokenizer_config_from(config.tokenizer)
    tok = pretrained.load_tokenizer(tcfg, config.init.tokenizer, key=config.init.tokenizer_key,
                                    dinov2=config.init.dinov2,
                                    allow_random_dinov2=config.init.allow_random_dinov2)
    tok.eval()
    sharding.shard_module(tok, mesh, rules)
    tok_def, tok_state = nnx.split(tok)
  state = sharding.commit_to_mesh(state, mesh)
  tok_state = None if tok_state is None else sharding.commit_to_mesh(tok_state, mesh)
  return Parts(gpt_def, tx, tok_def, gcfg), state, tok_state


def codes_from_batch(parts: Parts, tok_state, batch):
  """(labels, holistic codes, patch codes) of a batch: pre-extracted, or encoded by the frozen
  tokenizer from uint8 images (no gradient)."""
  if 'image' in batch:
    tok = nnx.merge(parts.tok_def, tok_state, copy=True)
    hol, patch = tok.encode(to_unit(batch['image']))
    return batch['label'], jax.lax.stop_gradient(hol), jax.lax.stop_gradient(patch)
  return batch['label'], batch['holistic_codes'], batch['patch_codes']


def train_step(parts: Parts, config, state, tok_state, batch, rng):
  step = state['step']
  labels, hol, patch = codes_from_batch(parts, tok_state, batch)
  key = jax.random.fold_in(rng, step)

  def loss_fn(params):
    gpt = nnx.merge(parts.gpt_def, params, copy=True)
    lh, lp = gpt.loss(labels, hol, patch, rng=key)
    return lh + lp, (lh, lp)

  (loss, (lh, lp)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
  updates, opt = parts.tx.update(grads, state['opt'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  new = {'step': step + 1, 'params': params, 'opt': opt,
         'ema': training.ema_update(state['ema'], params, config.train_ar.ema_decay)}
  lr = learning_rate(config.train_ar)
  metrics = {'loss': loss, 'loss_holistic': lh, 'loss_patch': lp, 'lr': lr(step) if callable(lr) else lr,
             'grad_norm': optax.global_norm(grads), 'param_norm': optax.global_norm(params)}
  # a non-finite loss or gradient norm: params, AdamW state and EMA stay as they were
  return training.keep_if_finite(state, new, metrics, NONFINITE_WATCH)


NONFINITE_WATCH = ('loss', 'grad_norm')  # checked each step; named when the run stops


def make_data(config, parts: Parts, process_index=0, process_count=1):
  """Per-process batches: synthetic codes, pre-extracted codes, or images to encode in the step."""
  ar = config.train_ar
  local = ar.global_batch_size // process_count
  if ar.codes_dir == 'synthetic':
    return SyntheticCodes(parts.cfg, ar.global_batch_size, config.seed, process_index, process_count)
  if ar.codes_dir:
    return make_codes_dataset(ar.codes_dir, local_batch=local, seed=config.seed,
                              process_index=process_index, process_count=process_count)
  it, _ = make_image_dataset(config.data, image_size=config.tokenizer.image_size,
                             global_batch=ar.global_batch_size, seed=config.seed, train=True,
                             process_index=process_index, process_count=process_count)
  return it


def sample_grid(parts: Parts, params, config, tok_state, key):
  """One row per class of EMA samples with the config's CFG, as uint8 images (needs a tokenizer)."""
  gpt = nnx.merge(parts.gpt_def, params, copy=True)
  gpt.eval()
  ar, sc = config.train_ar, config.sample
  labels = jnp.repeat(jnp.arange(min(parts.cfg.num_classes, ar.grid_classes)), ar.grid_per_class)
  codes = generate(gpt, labels, key, cfg_scale=sc.cfg_scale, top_k=sc.top_k, top_p=sc.top_p,
                   temperature=sc.temperature)
  if tok_state is not None:
    tok = nnx.merge(parts.tok_def, tok_state, copy=True)
  else:
    tok = pretrained.load_tokenizer(config_lib.tokenizer_config_from(config.tokenizer),
                                    config.init.tokenizer, key=config.init.tokenizer_key,
                                    allow_random_dinov2=True)  # decoding only: DINOv2 is unused
    sharding.shard_module(tok, jax.tree.leaves(params)[0].sharding.mesh,
                          config_lib.axis_rules(config))
  tok.eval()
  return sharding.to_host(codes_to_images(tok, codes, eval_size=None))


def validate(config):
  """Everything that can be checked before a model is allocated: paths, the code source, the
  tokenizer's DINOv2, the batch and the steps (one line naming the key otherwise)."""
  ar = config.train_ar
  config_lib.check_paths(config)
  if not ar.codes_dir and not config.init.tokenizer:
    raise UserError('train_ar without train_ar.codes_dir computes codes on the fly and needs '
                    '--config.init.tokenizer=<tokenizer export or official file> '
                    '(or --config.train_ar.codes_dir=<an extract_codes output>)')
  for key in ('global_batch_size', 'log_every', 'ckpt_every'):
    if ar[key] <= 0:
      raise UserError(f'config.train_ar.{key} must be positive, got {ar[key]}')
  if ar.lr_decay not in ('constant', 'cosine'):
    raise UserError(f"config.train_ar.lr_decay={ar.lr_decay!r} is not valid; choose one of "
                    "['constant', 'cosine']")
  if ar.warmup_steps < 0:
    raise UserError(f'config.train_ar.warmup_steps must be >= 0, got {ar.warmup_steps}')
  if ar.codes_dir and ar.codes_dir != 'synthetic':
    import json
    manifest = os.path.join(ar.codes_dir, 'manifest.json')
    if not os.path.exists(manifest):
      raise MissingPathError(f'{manifest} not found: {ar.codes_dir} is not an extract_codes output '
                             '(fix --config.train_ar.codes_dir)')
    with open(manifest) as f:
      m = json.load(f)
    g = config.gpt
    if m.get('num_holistic') != g.num_holistic or m.get('num_patches', g.grid ** 2) != g.grid ** 2:
      raise UserError(f'{ar.codes_dir} holds codes of {m.get("num_holistic")} holistic + '
                      f'{m.get("num_patches")} patch tokens, the GPT config expects {g.num_holistic} + '
                      f'{g.grid ** 2}: extract with the tokenizer config this GPT is built for')


def jit_train_step(parts, config):
  """`train_step` jitted as the trainer runs it: state donated, the config's XLA options on GPU
  (`train_ar.gpu_compiler_options`). Called as step(state, tok_state, batch, rng)."""
  return jax.jit(functools.partial(train_step, parts, config), donate_argnums=(0,),
                 compiler_options=config_lib.gpu_compiler_options(
                     config.train_ar.get('gpu_compiler_options')))


def run(config, workdir: str):
  ar = config.train_ar
  validate(config)
  if not ar.codes_dir:  # the frozen tokenizer encodes: it needs its DINOv2 (checked before allocating)
    pretrained.require_dinov2(config.init.tokenizer, config.init.dinov2, key=config.init.tokenizer_key,
                              allow_random=config.init.allow_random_dinov2)
  num_steps = config_lib.ar_num_steps(ar)
  print(f'train_ar: {num_steps} steps of {ar.global_batch_size} sequences'
        + ('' if ar.num_steps else f' ({ar.epochs} epochs of {ar.dataset_size} images)'), flush=True)
  mesh = sharding.make_mesh(config_lib.mesh_spec(config, jax.device_count()))
  rules = config_lib.axis_rules(config)
  parts, state, tok_state = build(config, mesh)
  it = make_data(config, parts, jax.process_index(), jax.process_count())
  mngr = checkpoint.checkpoint_manager(os.path.join(workdir, 'checkpoints'), every=ar.ckpt_every,
                                       keep=ar.keep_checkpoints, best_metric='loss')
  state, start = checkpoint.resume(mngr, state, it)
  step_fn = jit_train_step(parts, config)
  ndim = {'image': 4, 'label': 1, 'holistic_codes': 2, 'patch_codes': 2}
  shardings = {k: sharding.batch_sharding(mesh, rules, n) for k, n in ndim.items()}
  tokens = parts.cfg.seq_len
  flops_per_token = flops.gpt_train_flops_per_token(parts.cfg, tokens)
  peak = flops.device_peak_flops()
  logger = training.MetricLogger(workdir, total_steps=num_steps, start_step=start,
                                 every=ar.log_every, images_per_step=ar.global_batch_size,
                                 line_keys=('loss', 'loss_holistic', 'loss_patch'),
                                 watch=NONFINITE_WATCH, max_nonfinite=ar.max_nonfinite_steps,
                                 lag=True)  # the device runs the next step while a period is written

  def throughput():
    step_s = logger.last_step_time
    out = {'tokens_per_s': ar.global_batch_size * tokens / step_s}
    if peak:
      out['mfu'] = flops.mfu(out['tokens_per_s'] / jax.device_count(), flops_per_token, peak)
    return out

  rng = jax.random.key(config.seed)
  try:
    for step in range(start + 1, num_steps + 1):
      local = {k: v for k, v in next(it).items() if k in shardings}
      check_code_batch(local, parts.cfg.num_classes, parts.cfg.vocab_size)
      batch = training.global_batch(local, shardings)
      state, metrics = step_fn(state, tok_state, batch, rng)
      logger.log(step, metrics, extra=throughput)
      if ar.sample_every and (step % ar.sample_every == 0 or step == num_steps):
        images = sample_grid(parts, state['ema'], config, tok_state,
                             jax.random.fold_in(jax.random.fold_in(rng, 2**31 - 1), step))  # apart from training keys
        logger.image(step, 'samples', images, rows=min(parts.cfg.num_classes, ar.grid_classes))
      if step % ar.ckpt_every == 0 or step == num_steps:
        logger.check()  # stops before a save when too many steps in a row were non-finite
        checkpoint.save_train_state(mngr, step, state, it,
                                    metrics={'loss': training.finite_or_inf(metrics['loss'])})
  finally:  # a stopped run still completes the async save in flight (a finite state)
    try:  # and still writes a logging period that waits for the next step (lag)
      logger.flush()
    except Exception:  # never hide the error that stopped the run
      pass
    checkpoint.finish_saves(mngr)
  logger.close()
  export = os.path.join(workdir, 'export', 'ema')
  pretrained.save_gpt(export, nnx.merge(parts.gpt_def, state['ema'], copy=True), overwrite=True,
                      legacy_pos128_embedding=False,
                      metadata={'step': int(state['step']), 'weights': 'ema'})
  print(f"done: step {int(state['step'])}; EMA GPT exported to {export}")
  return state
