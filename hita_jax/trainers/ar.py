"""AR generator training (`task = train_ar`), top to bottom.

Official recipe (train_c2i.py): AdamW(0.9, 0.95), weight decay 0.05 on >= 2-D parameters only,
constant LR 1e-4, clip 1.0, EMA 0.9999, bf16 compute, class dropout 0.1, token/resid/FFN dropout
0.1; loss = CE(holistic) + CE(patch). Codes come either from pre-extracted ArrayRecord shards
(`extract_codes`, the fast path: `ar.codes_dir`) or are computed inside the jitted step by the frozen
tokenizer on augmented images (the official behaviour). Meshes, remat and scan come from the config.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from hita_jax import config_lib, flops, sharding, train_utils
from hita_jax.checkpoint import save_params
from hita_jax.models.gpt import GPT, gpt_config_from


@dataclasses.dataclass
class Parts:
  gpt_def: object
  tx: optax.GradientTransformation
  tok_def: object | None
  cfg: object


def adamw(lr, b1, b2, wd, clip, eps=1e-8):
  mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(optax.clip_by_global_norm(clip),
                     optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=mask))


def build(config, mesh):
  ar = config.ar
  rules = [tuple(r) for r in config.logical_axis_rules]
  gcfg = dataclasses.replace(gpt_config_from(config.gpt), dtype=ar.compute_dtype,
                             class_dropout_prob=ar.class_dropout_prob, token_dropout=ar.token_dropout)
  if config.init.gpt:
    from hita_jax.convert.gpt import build_gpt
    gpt = build_gpt(gcfg, config.init.gpt, key=config.init.gpt_key)
    sharding.shard_module(gpt, mesh, rules)
  else:
    gpt = sharding.create_sharded(lambda: GPT(gcfg, rngs=nnx.Rngs(config.seed)), mesh, rules)
  gpt_def, params = nnx.split(gpt, nnx.Param)
  tx = adamw(ar.lr, ar.b1, ar.b2, ar.weight_decay, ar.grad_clip, ar.get('adam_eps', 1e-8))
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt': jax.jit(tx.init)(params),
           'ema': jax.tree.map(jnp.copy, params)}
  tok_def, tok_state = None, None
  if not ar.codes_dir:  # codes on the fly, inside the step (official)
    from hita_jax.convert.tokenizer import build_tokenizer
    tcfg = config_lib.tokenizer_config_from(config.tokenizer)
    if not config.init.tokenizer:
      raise ValueError('train_ar without ar.codes_dir computes codes on the fly and needs '
                       '--config.init.tokenizer=<tokenizer export or official file>')
    tok = build_tokenizer(tcfg, tokenizer_ckpt=config.init.tokenizer, key=config.init.tokenizer_key,
                          dinov2=config.init.dinov2)
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
    hol, patch = tok.encode(batch['image'].astype(jnp.float32) / 127.5 - 1.0)
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
         'ema': train_utils.ema_update(state['ema'], params, config.ar.ema_decay)}
  return new, {'loss': loss, 'loss_holistic': lh, 'loss_patch': lp,
               'grad_norm': optax.global_norm(grads), 'param_norm': optax.global_norm(params)}


class SyntheticCodes:
  """Uniformly random codes and labels (throughput runs; `ar.codes_dir='synthetic'`)."""

  def __init__(self, cfg, batch: int, seed: int):
    self.cfg, self.batch, self.rng = cfg, batch, np.random.default_rng(seed)

  def __iter__(self):
    return self

  def __next__(self):
    c, b = self.cfg, self.batch
    return {'label': self.rng.integers(0, c.num_classes, b).astype(np.int32),
            'holistic_codes': self.rng.integers(0, c.vocab_size, (b, c.num_holistic)).astype(np.int32),
            'patch_codes': self.rng.integers(0, c.vocab_size, (b, c.num_patches)).astype(np.int32)}


def make_data(config, parts: Parts, process_index=0, process_count=1):
  ar = config.ar
  local = ar.global_batch_size // process_count
  if ar.codes_dir == 'synthetic':
    return SyntheticCodes(parts.cfg, local, config.seed + process_index)
  import grain
  from hita_jax import data
  if ar.codes_dir:
    from hita_jax.extract import CodesSource, pick_view
    src = CodesSource(ar.codes_dir)
    ds = grain.MapDataset.source(src).shuffle(seed=config.seed).repeat()[process_index::process_count]
    ds = ds.seed(config.seed + process_index).random_map(pick_view)  # one view (crop/flip) per read
    ds = ds.batch(local, drop_remainder=True)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))
  it, _ = data.make_image_dataset(config.data, image_size=config.tokenizer.image_size,
                                  global_batch=ar.global_batch_size, seed=config.seed, train=True,
                                  process_index=process_index, process_count=process_count)
  return it


def sample_grid(parts: Parts, params, config, tok_state, key):
  """One row per class of EMA samples with the config's CFG, as a uint8 grid (needs a tokenizer)."""
  from hita_jax.convert.tokenizer import build_tokenizer
  from hita_jax.sample import codes_to_images, generate
  gpt = nnx.merge(parts.gpt_def, params, copy=True)
  gpt.eval()
  n_cls = min(parts.cfg.num_classes, config.ar.grid_classes)
  per = config.ar.grid_per_class
  labels = jnp.repeat(jnp.arange(n_cls), per)
  codes = generate(gpt, labels, key, cfg_scale=config.sample.cfg_scale, top_k=config.sample.top_k,
                   top_p=config.sample.top_p, temperature=config.sample.temperature)
  if tok_state is not None:
    tok = nnx.merge(parts.tok_def, tok_state, copy=True)
  else:
    tok = build_tokenizer(config_lib.tokenizer_config_from(config.tokenizer),
                          tokenizer_ckpt=config.init.tokenizer)
  tok.eval()
  imgs = np.asarray(codes_to_images(tok, codes, eval_size=None))
  return train_utils.image_grid(imgs, rows=n_cls)


def run(config, workdir: str):
  ar = config.ar
  mesh = sharding.make_mesh(config.mesh)
  rules = [tuple(r) for r in config.logical_axis_rules]
  parts, state, tok_state = build(config, mesh)
  it = make_data(config, parts, jax.process_index(), jax.process_count())
  mngr = train_utils.checkpoint_manager(os.path.join(workdir, 'checkpoints'), every=ar.ckpt_every,
                                        keep=ar.keep_checkpoints, best_metric='loss')
  state, start = train_utils.resume(mngr, state, it, workdir)
  step_fn = jax.jit(functools.partial(train_step, parts, config), donate_argnums=(0,))
  nd = lambda k: 4 if k == 'image' else 2 if k in ('holistic_codes', 'patch_codes') else 1
  shardings = {k: sharding.batch_sharding(mesh, rules, nd(k))
               for k in ('image', 'label', 'holistic_codes', 'patch_codes')}
  from clu import metric_writers
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  tokens = parts.cfg.seq_len
  fl = flops.gpt_train_flops_per_token(parts.cfg, tokens)
  peak = flops.device_peak_flops()
  rng = jax.random.key(config.seed)
  progress = train_utils.Progress(ar.num_steps, start, ar.log_every, ar.global_batch_size)
  acc, t_last = [], time.time()
  with metric_writers.ensure_flushes(writer):
    for step in range(start + 1, ar.num_steps + 1):
      local = next(it)
      local = {k: v for k, v in local.items() if k in shardings}
      batch = {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
               for k, v in local.items()}
      state, metrics = step_fn(state, tok_state, batch, rng)
      acc.append(metrics)
      if step % ar.log_every == 0 or step == ar.num_steps:
        n = len(acc)
        scalars = train_utils.mean_metrics(acc, step)
        acc = []
        dt = (time.time() - t_last) / n
        t_last = time.time()
        tok_s = ar.global_batch_size * tokens / dt
        scalars.update(step_time_s=dt, tokens_per_s=tok_s, images_per_s=ar.global_batch_size / dt)
        if peak:
          scalars['mfu'] = flops.mfu(tok_s / jax.device_count(), fl, peak)
        writer.write_scalars(step, scalars)
        train_utils.log_jsonl(workdir, step, scalars)
        progress(step, f"loss {scalars['loss']:.4f} (holistic {scalars['loss_holistic']:.3f}, "
                       f"patch {scalars['loss_patch']:.3f})")
      if ar.sample_every and (step % ar.sample_every == 0 or step == ar.num_steps):
        grid = sample_grid(parts, state['ema'], config, tok_state, jax.random.fold_in(rng, -step))
        if jax.process_index() == 0:
          train_utils.save_png(os.path.join(workdir, f'samples_{step:07d}.png'), grid)
        writer.write_images(step, {'samples': grid[None]})
      if step % ar.ckpt_every == 0 or step == ar.num_steps:
        train_utils.save_checkpoint(mngr, step, state, it, metrics={'loss': float(metrics['loss'])},
                                    force=True)
  mngr.wait_until_finished()
  gpt = nnx.merge(parts.gpt_def, state['ema'], copy=True)
  save_params(os.path.join(workdir, 'export', 'ema'), gpt, overwrite=True,
              config={'gpt': dataclasses.asdict(parts.cfg), 'sample': {'legacy_pos128_embedding': False}},
              metadata={'step': int(state['step']), 'weights': 'ema'})
  print(f"done: step {int(state['step'])}; EMA GPT exported to {os.path.join(workdir, 'export', 'ema')}")
  return state
