"""The `train_tokenizer` task: Hita tokenizer training, top to bottom (build, step, loop).

Official recipe (vq_train.py / vq_loss.py): Adam(0.9, 0.95) with linear warm-up then a constant LR,
grad clip 1.0 for the generator and the discriminator, EMA 0.9999 of the generator, bf16 compute;
loss = 2 x MSE + LPIPS (dropout on, as the official loop leaves LPIPS in train mode) + both
quantizers' vq/commit terms (+ Hita-U's VFM cosine term) + 0.5 * softplus G loss from the start
step; D loss = 0.5 * hinge from the start step. The discriminator is the PatchGAN (Hita-V) or the
DINO discriminator (Hita-U, `tokenizer_loss.disc_type='dino'`: frozen DINO ViT-S/16, trainable
heads, one crop-or-resize draw per call from the step's key). Every discriminator call runs in
training mode, in the official order (G step on the reconstruction, then D step on the
reconstruction and on the real images), updating the PatchGAN's BatchNorm statistics or the
spectral-norm vectors (`d_stats`, checkpointed and resumed with the rest).

One jitted step updates G and D from one forward pass (`train_tokenizer.step_stages=3`: the same
step as three programs compiled side by side, `StagedTrainStep`). Params, optimizer state and EMA are born
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

from hita_jax import checkpoint, config_lib, pretrained, sharding, staging, training
from hita_jax.data.images import to_uint8, to_unit
from hita_jax.data.sources import make_image_dataset
from hita_jax.models import losses
from hita_jax.models.dino_discriminator import HEADS_TRAINABLE, DinoDiscriminator, sample_augmentation
from hita_jax.models.discriminator import PatchGAN
from hita_jax.models.layers import DTYPES
from hita_jax.models.quantizer import codes_used_fraction
from hita_jax.models.tokenizer import Tokenizer, trainable_filter
from hita_jax.errors import UserError


@dataclasses.dataclass
class Parts:
  """Everything the jitted step closes over (graph definitions, optimizers, frozen towers)."""
  g_def: object
  d_def: object
  tx_g: optax.GradientTransformation
  tx_d: optax.GradientTransformation
  lpips_def: object
  cfg: object
  flat_optimizer: bool = False  # Adam moments as one vector per network (optimizer_layout)
  flat_ema: bool = False  # the generator's EMA as one vector too (flat layouts since 2026-12-05)


def optimizer_is_flat(layout: str, params) -> bool:
  """`train_tokenizer.optimizer_layout` -> whether the moments are flat: 'auto' is flat when no
  parameter is sharded (one vector of replicated gradients costs no communication; under FSDP
  or tensor sharding the per-parameter layout keeps each moment placed like its parameter)."""
  if layout == 'auto':
    return all(getattr(x, 'sharding', None) is None or x.sharding.is_fully_replicated
               for x in jax.tree.leaves(params))
  return layout == 'flat'


def generator_config(config):
  """The trained tokenizer's model config: the `tokenizer` section at the trainer's compute dtype."""
  return dataclasses.replace(config_lib.tokenizer_config_from(config.tokenizer),
                             dtype=config.train_tokenizer.compute_dtype)


def build(config, mesh, optimizer_layout: str | None = None, ema_layout: str | None = None):
  """Models, optimizers and the initial train state (born sharded). `optimizer_layout` overrides
  `train_tokenizer.optimizer_layout` (`run` passes the resumed checkpoint's); `ema_layout`
  ('flat' | 'tree', `run` passes the resumed checkpoint's) keeps a flat-moments checkpoint
  written with a per-tensor EMA in its layout; by default the EMA is flat when the moments are."""
  tcfg = generator_config(config)
  compute_dtype = DTYPES[config.train_tokenizer.compute_dtype]  # the discriminators' and LPIPS's too
  rules = config_lib.axis_rules(config)
  init = config.init
  # An official vq_train.py checkpoint resumes as vq_train.py does: generator from `model`, EMA,
  # discriminator and both Adam states each from its own entry (the run's step counter starts at 0,
  # as with its --finetune).
  ckpt = pretrained.read_training_checkpoint(init.tokenizer)
  if init.tokenizer or init.dinov2:
    sd = pretrained.entry(ckpt, 'model' if 'model' in ckpt else 'ema') if ckpt else None
    tok = pretrained.load_tokenizer(tcfg, init.tokenizer, key=init.tokenizer_key, dinov2=init.dinov2,
                                    seed=config.seed, allow_random_dinov2=init.allow_random_dinov2,
                                    state_dict=sd)
    sharding.shard_module(tok, mesh, rules)
  else:
    if not init.allow_random_dinov2:
      raise UserError('training needs the frozen DINOv2 weights: --config.init.dinov2=<Meta .pth or '
                       'Hugging Face dir> (or --config.init.allow_random_dinov2=True for experiments)')
    tok = sharding.create_sharded(
        lambda: Tokenizer(tcfg, rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1)), mesh, rules)
  tok.train()
  lc = config.tokenizer_loss
  # 'replica': batch statistics per data-parallel shard, as DDP with plain BatchNorm2d (official)
  groups = sharding.batch_shards(sharding.batch_sharding(mesh, rules, 4)) if lc.disc_batch_norm == 'replica' else 1
  disc_sd = pretrained.entry(ckpt, 'discriminator') if ckpt and 'discriminator' in ckpt else None
  if lc.disc_type == 'dino':
    disc = pretrained.load_dino_discriminator(
        config_lib.dino_disc_config(config, groups), init.dino_disc, heads_state_dict=disc_sd,
        allow_random=init.allow_random_dino_disc or not lc.disc_weight, seed=config.seed + 2,
        dtype=compute_dtype)
    sharding.shard_module(disc, mesh, rules)
  else:
    disc = sharding.create_sharded(
        lambda: PatchGAN(ndf=lc.disc_ndf, n_layers=lc.disc_layers, batch_norm_groups=groups,
                         dtype=compute_dtype,
                         rngs=nnx.Rngs(config.seed + 2)), mesh, rules)
    if disc_sd is not None:
      pretrained.load_patchgan(disc, disc_sd)
      sharding.shard_module(disc, mesh, rules)
  disc.train()
  # perceptual_weight 0 (the CPU demo): no LPIPS network, no weights to locate.
  # Both the PatchGAN's and LPIPS's convolutions in the compute dtype: the official trainer runs
  # them under the same bf16 autocast as the generator.
  lp = pretrained.load_lpips(lc.lpips_weights if lc.perceptual_weight else 'random',
                             dtype=compute_dtype)
  sharding.shard_module(lp, mesh, rules)

  tr = config.train_tokenizer
  g_def, g_params, g_rest = nnx.split(tok, trainable_filter(), ...)
  # trainable (the PatchGAN, or the DINO discriminator's heads), per-call state (BatchNorm statistics
  # or spectral-norm vectors), frozen (the DINO; empty for the PatchGAN)
  d_def, d_params, d_stats, d_frozen = nnx.split(disc, HEADS_TRAINABLE, nnx.BatchStat, ...)
  flat = optimizer_is_flat(optimizer_layout or tr.optimizer_layout, (g_params, d_params))
  flat_ema = flat and ema_layout != 'tree'
  sched = training.lr_schedule(tr.lr, tr.warmup_steps, tr.warmup_init_lr, tr.lr_decay, tr.num_steps)
  adam = lambda lr: optax.adam(lr, b1=tr.b1, b2=tr.b2, eps=tr.adam_eps)
  # flat: each network's gradients concatenated, so the clip's norm and Adam run on one vector (the
  # same arithmetic; the moments are stored as one vector per network), training.optimizer_step
  tx_g = optax.chain(optax.clip_by_global_norm(tr.grad_clip), adam(sched))
  tx_d = optax.chain(optax.clip_by_global_norm(tr.grad_clip), adam(tr.lr))

  lp_def, lp_state = nnx.split(lp)
  state = {
      'step': jnp.zeros((), jnp.int32),
      'g_params': g_params, 'g_rest': g_rest, 'd_params': d_params, 'd_stats': d_stats,
      'opt_g': training.init_optimizer_state(tx_g, g_params, mesh, flat),
      'opt_d': training.init_optimizer_state(tx_d, d_params, mesh, flat),
      # flat: one vector (the same values), so the step's EMA update is one kernel, not one per
      # parameter tensor (~3.5k of the lowered step's ops: a shorter compile)
      'ema': training.flat_copy(g_params, mesh) if flat_ema else jax.tree.map(jnp.copy, g_params),
  }
  if ckpt:
    state.update(_resumed(ckpt, tcfg, disc, state, config))
  parts = Parts(g_def, d_def, tx_g, tx_d, lp_def, tcfg, flat, flat_ema)
  state = sharding.commit_to_mesh(state, mesh)
  frozen = sharding.commit_to_mesh({'lpips': lp_state, 'disc': d_frozen}, mesh)
  return parts, state, frozen, sched


def _resumed(ckpt: dict, tcfg, disc, state: dict, config) -> dict:
  """The EMA and the two Adam states of an official vq_train.py checkpoint, placed like ours."""
  place = lambda tree, like: jax.tree.map(lambda a, p: sharding.put(jnp.asarray(a), p.sharding),
                                          tree, like)
  out = {}
  if 'ema' in ckpt:
    ema = pretrained.load_tokenizer(tcfg, state_dict=pretrained.entry(ckpt, 'ema'))
    ema = nnx.state(ema, trainable_filter())
    if isinstance(state['ema'], nnx.State):
      out['ema'] = place(ema, state['g_params'])
    else:  # a flat EMA: concatenated on the host in the parameters' leaf order
      flat = np.concatenate([np.asarray(a, state['ema'].dtype).reshape(-1) for a in jax.tree.leaves(ema)])
      out['ema'] = sharding.put(flat, state['ema'].sharding)
  adam_g = pretrained.tokenizer_adam_state(tcfg, ckpt, trainable_filter())
  if adam_g:
    out['opt_g'] = training.restore_adam(state['opt_g'], *adam_g, like=state['g_params'])
  if isinstance(disc, DinoDiscriminator):
    adam_d = pretrained.dino_disc_adam_state(
        ckpt, lambda: DinoDiscriminator(config_lib.dino_disc_config(config), rngs=nnx.Rngs(0)))
  else:
    adam_d = pretrained.patchgan_adam_state(
        ckpt, lambda: PatchGAN(ndf=disc.convs[0].out_features, n_layers=len(disc.norms), rngs=nnx.Rngs(0)))
  if adam_d:
    out['opt_d'] = training.restore_adam(state['opt_d'], *adam_d, like=state['d_params'])
  return out


def _loss_setup(parts: Parts, config, frozen, step, rng) -> dict:
  """What the generator's and the discriminator's losses share in a step: keys, weights, LPIPS."""
  lc = config.tokenizer_loss
  rng = jax.random.fold_in(rng, step)
  k_lpips, k_disc = jax.random.split(rng)
  k_g, k_dfake, k_dreal = jax.random.split(k_disc, 3)  # the DINO discriminator's draws per call
  return {'k_lpips': k_lpips, 'k_g': k_g, 'k_dfake': k_dfake, 'k_dreal': k_dreal,
          'lp': nnx.merge(parts.lpips_def, frozen['lpips'], copy=True),
          # Terms with weight 0 are not computed at all (the CPU demo trains on MSE + VQ terms only).
          'use_perc': bool(lc.perceptual_weight), 'use_disc': bool(lc.disc_weight),
          'adv_w': losses.adversarial_weight(step, lc.disc_start, lc.disc_weight)}


def _discriminate(config, disc, images, key):
  if config.tokenizer_loss.disc_type != 'dino':
    return disc(images)
  _, h, w, _ = images.shape  # one crop-or-resize draw per call, as the official forward
  return disc(images, sample_augmentation(key, h, w, disc.cfg.img_size))


def generator_outputs(parts: Parts, g_params, g_rest, x):
  """The tokenizer's forward in training mode -> (outs, aux): `outs` the outputs the generator's
  loss is differentiated through (`recon` in fp32, the quantizers' `vq` / `commit` / `entropy`
  terms, Hita-U's `vfm_prediction`), `aux` the rest (codes, DINOv2 patch features, the updated
  non-trainable state `g_rest`)."""
  tok = nnx.merge(parts.g_def, g_params, g_rest, copy=True)
  out = tok(x)
  outs = {'recon': out['recon'].astype(jnp.float32), 'vq': out['vq'], 'commit': out['commit'],
          'entropy': out['entropy']}
  aux = {'patch_codes': out['patch_codes'], 'holistic_codes': out['holistic_codes'],
         'g_rest': nnx.state(tok, nnx.Not(trainable_filter()))}
  if parts.cfg.vfm:
    outs['vfm_prediction'] = out['vfm_prediction']
    aux['dinov2_patch_features'] = out['dinov2_patch_features']
  return outs, aux


def generator_loss(parts: Parts, config, setup: dict, x, outs: dict, aux: dict, d_params, d_stats,
                   frozen):
  """The generator's loss from the tokenizer's outputs -> (loss, (metrics, new d_stats)). The
  discriminator runs in training mode (batch statistics, running stats / spectral-norm vectors
  updated, official) with its parameters held fixed."""
  lc = config.tokenizer_loss
  recon = outs['recon']
  disc = nnx.merge(parts.d_def, jax.lax.stop_gradient(d_params), d_stats, frozen['disc'], copy=True)
  rec = losses.reconstruction_loss(x, recon)
  zero = jnp.zeros((), jnp.float32)
  perc = (jnp.mean(setup['lp'](x, recon, dropout_rng=setup['k_lpips'] if lc.lpips_dropout else None))
          if setup['use_perc'] else zero)
  g_adv = (losses.G_LOSSES[lc.gen_loss](_discriminate(config, disc, recon, setup['k_g']))
           if setup['use_disc'] else zero)
  loss = (lc.reconstruction_weight * rec + lc.perceptual_weight * perc + setup['adv_w'] * g_adv
          + outs['vq'] + outs['commit'] + outs['entropy'])
  metrics = {'rec_loss': rec, 'perceptual_loss': perc, 'g_adv_loss': g_adv, 'vq_loss': outs['vq'],
             'commit_loss': outs['commit']}
  if parts.cfg.vfm:
    vfm = losses.vfm_loss(aux['dinov2_patch_features'], outs['vfm_prediction'])
    loss = loss + lc.vfm_weight * vfm
    metrics['vfm_loss'] = vfm
  metrics['g_loss'] = loss
  return loss, (metrics, nnx.state(disc, nnx.BatchStat))


def discriminator_grads(parts: Parts, config, setup: dict, x, recon, d_params, d_stats, frozen):
  """The discriminator's loss on the (fixed) reconstruction and the real images, and its gradients
  -> ((d_loss, new d_stats, mean real logit, mean fake logit), d_grads)."""
  def d_loss_fn(d_params, d_stats):
    disc = nnx.merge(parts.d_def, d_params, d_stats, frozen['disc'], copy=True)
    if not setup['use_disc']:  # a constant loss: zero gradients, so Adam leaves D unchanged
      zero = jnp.zeros((), jnp.float32)
      return zero, (nnx.state(disc, nnx.BatchStat), zero, zero)
    logits_fake = _discriminate(config, disc, jax.lax.stop_gradient(recon), setup['k_dfake'])
    logits_real = _discriminate(config, disc, x, setup['k_dreal'])
    loss = setup['adv_w'] * losses.D_LOSSES[config.tokenizer_loss.disc_loss](logits_real, logits_fake)
    return loss, (nnx.state(disc, nnx.BatchStat), jnp.mean(logits_real), jnp.mean(logits_fake))

  (d_loss, (d_stats, lr_mean, lf_mean)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(
      d_params, d_stats)
  return (d_loss, d_stats, lr_mean, lf_mean), d_grads


def apply_updates(parts: Parts, config, state, g_grads, d_grads, metrics: dict, aux: dict, d_stats,
                  d_out, adv_w):
  """Both optimizer steps and the EMA from the step's gradients -> (new state, metrics); a step with
  a non-finite loss or gradient norm applies nothing (G, D, EMA, BN statistics)."""
  d_loss, lr_mean, lf_mean = d_out
  size = parts.cfg.codebook_size
  flat = parts.flat_optimizer
  metrics = {**metrics, 'patch_codebook_usage': codes_used_fraction(aux['patch_codes'], size),
             'holistic_codebook_usage': codes_used_fraction(aux['holistic_codes'], size),
             'd_loss': d_loss, 'logits_real': lr_mean, 'logits_fake': lf_mean,
             'g_grad_norm': training.grad_norm(g_grads, flat),
             'd_grad_norm': training.grad_norm(d_grads, flat), 'adv_weight': adv_w}
  # With flat optimizers the updates themselves are zeroed and the EMA decay set to 1, so the
  # parameters and the EMA need no select per tensor (`kept`).
  finite = training.all_finite(metrics, NONFINITE_WATCH) if flat else None
  g_params, opt_g = training.optimizer_step(parts.tx_g, g_grads, state['opt_g'], state['g_params'],
                                            flat=flat, finite=finite)
  d_params, opt_d = training.optimizer_step(parts.tx_d, d_grads, state['opt_d'], state['d_params'],
                                            flat=flat, finite=finite)
  new = {'step': state['step'] + 1, 'g_params': g_params, 'g_rest': aux['g_rest'], 'd_params': d_params,
         'd_stats': d_stats, 'opt_g': opt_g, 'opt_d': opt_d,
         'ema': training.ema_update(state['ema'], g_params, config.train_tokenizer.ema_decay, finite)}
  return training.keep_if_finite(state, new, metrics, NONFINITE_WATCH,
                                 kept=('g_params', 'd_params', 'ema') if flat else ())


def train_step(parts: Parts, config, state, frozen, batch, rng):
  """One generator + discriminator update. `frozen`: the LPIPS and frozen discriminator states
  (`build`'s third result). Returns (new state, metrics)."""
  x = to_unit(batch['image'])
  setup = _loss_setup(parts, config, frozen, state['step'], rng)

  def g_loss_fn(g_params, g_rest, d_stats):
    outs, aux = generator_outputs(parts, g_params, g_rest, x)
    loss, (metrics, d_stats) = generator_loss(parts, config, setup, x, outs, aux, state['d_params'],
                                              d_stats, frozen)
    return loss, (metrics, outs['recon'], aux, d_stats)

  (_, (metrics, recon, aux, d_stats)), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(
      state['g_params'], state['g_rest'], state['d_stats'])
  (d_loss, d_stats, lr_mean, lf_mean), d_grads = discriminator_grads(
      parts, config, setup, x, recon, state['d_params'], d_stats, frozen)
  return apply_updates(parts, config, state, g_grads, d_grads, metrics, aux, d_stats,
                       (d_loss, lr_mean, lf_mean), setup['adv_w'])


class StagedTrainStep:
  """`train_step` as three programs (`train_tokenizer.step_stages=3`), compiled side by side
  (`staging`): the generator's forward, kept as a `jax.vjp` pullback; the losses on its outputs
  (LPIPS, the discriminator's G term, the VQ terms) with their gradients with respect to those
  outputs, and the discriminator's gradients; the pullback to the generator's gradients, both
  optimizer steps and the EMA. The same arithmetic as the one program; XLA fuses each part on its
  own. Called as step(state, frozen, batch, rng) -> (new state, metrics); the first call (or
  `compile`) lowers and compiles the three programs for those arguments' shapes and shardings.
  On an H100 (2026-12-07) the three compiles overlapped but each took about as long as the one
  program's (XLA serialises much of a GPU compile within a process): no shorter cold compile, a
  2.5 % slower step; opt-in (docs/PERFORMANCE.md)."""

  def __init__(self, parts: Parts, config, parallel: bool = True):
    self.parts, self.config, self.parallel = parts, config, parallel
    self.options = config_lib.gpu_compiler_options(config.train_tokenizer.get('gpu_compiler_options'))
    self.carry_g = staging.Carry()  # the pullback and the forward's aux, forward -> update
    self.carry_d = staging.Carry()  # the discriminator's statistics, losses -> update
    self.programs = None
    self.timing = {}

  def _forward(self, g_params, g_rest, batch):
    x = to_unit(batch['image'])
    outs, pullback, aux = jax.vjp(lambda p: generator_outputs(self.parts, p, g_rest, x), g_params,
                                  has_aux=True)
    return outs, aux.get('dinov2_patch_features'), self.carry_g.pack((aux, pullback), (g_params, g_rest, batch))

  def _losses(self, outs, dino, d_params, d_stats_in, step, frozen, batch, rng):
    x = to_unit(batch['image'])
    setup = _loss_setup(self.parts, self.config, frozen, step, rng)
    aux = {'dinov2_patch_features': dino}
    (_, (metrics, d_stats)), cotangents = jax.value_and_grad(
        lambda o: generator_loss(self.parts, self.config, setup, x, o, aux, d_params, d_stats_in,
                                 frozen), has_aux=True)(outs)
    d_out, d_grads = discriminator_grads(self.parts, self.config, setup, x, outs['recon'], d_params,
                                         d_stats, frozen)
    d_loss, d_stats, lr_mean, lf_mean = d_out
    # statistics the discriminator left as they were (no adversarial term) are its inputs
    carried = self.carry_d.pack(d_stats, (d_params, d_stats_in))
    return cotangents, d_grads, carried, (d_loss, lr_mean, lf_mean), metrics, setup['adv_w']

  def _update(self, state, batch, carried_g, cotangents, d_grads, carried_d, d_out, metrics, adv_w):
    aux, pullback = self.carry_g.unpack(carried_g, (state['g_params'], state['g_rest'], batch))
    d_stats = self.carry_d.unpack(carried_d, (state['d_params'], state['d_stats']))
    g_grads, = pullback(cotangents)
    return apply_updates(self.parts, self.config, state, g_grads, d_grads, metrics, aux, d_stats,
                         d_out, adv_w)

  def compile(self, state, frozen, batch, rng):
    """Lowers the three programs for these arguments (the later ones from the earlier ones'
    shapes, with `staging.leading_axis_shardings`) and compiles them together. Returns self."""
    t0 = time.perf_counter()
    mesh = next(x.sharding.mesh for x in jax.tree.leaves(state)
                if isinstance(getattr(x, 'sharding', None), jax.sharding.NamedSharding))
    batch_sh = sharding.batch_sharding(mesh, config_lib.axis_rules(self.config), 4)
    size = batch['image'].shape[0]
    shard = lambda tree: staging.leading_axis_shardings(tree, batch_sh, size)
    like = lambda tree: jax.tree.map(lambda a: a.sharding, tree)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    jit = functools.partial(jax.jit, compiler_options=self.options)
    g_args = (state['g_params'], state['g_rest'], batch)
    f_shapes = jax.eval_shape(self._forward, *g_args)
    f_sh = shard(f_shapes)
    forward = jit(self._forward, out_shardings=f_sh).lower(*g_args)
    outs, dino, carried_g = staging.with_shardings(f_shapes, f_sh)
    l_args = (outs, dino, state['d_params'], state['d_stats'], state['step'], frozen, batch, rng)
    l_shapes = jax.eval_shape(self._losses, *l_args)
    # cotangents like the outputs, D's gradients like its parameters, statistics, then scalars
    l_sh = (f_sh[0], like(state['d_params']), shard(l_shapes[2]), rep, rep, rep)
    losses_ = jit(self._losses, out_shardings=l_sh).lower(*l_args)
    l_out = staging.with_shardings(l_shapes, l_sh)
    update = jit(self._update, donate_argnums=(0,), out_shardings=(like(state), rep)).lower(
        state, batch, carried_g, *l_out)
    self.timing = {'lower_s': time.perf_counter() - t0}
    self.programs, timing = staging.compile_all([forward, losses_, update], self.parallel)
    self.timing.update(timing)
    return self

  def __call__(self, state, frozen, batch, rng):
    if self.programs is None:
      self.compile(state, frozen, batch, rng)
    forward, losses_, update = self.programs
    outs, dino, carried_g = forward(state['g_params'], state['g_rest'], batch)
    l_out = losses_(outs, dino, state['d_params'], state['d_stats'], state['step'], frozen, batch, rng)
    return update(state, batch, carried_g, *l_out)


# what `keep_if_finite` checks each step and the logger names when it stops the run
NONFINITE_WATCH = ('g_loss', 'd_loss', 'g_grad_norm', 'd_grad_norm')


def codebook_usage_window(parts, state):
  """Fraction of each codebook seen in its FIFO window of recent codes (the `codebook_used`
  buffer); the per-step figure the official trainer logs is in the step's metrics."""
  tok = nnx.merge(parts.g_def, state['g_params'], state['g_rest'], copy=True)
  return {'patch_codebook_usage_window': tok.patch_quantizer.usage_fraction(),
          'holistic_codebook_usage_window': tok.holistic_quantizer.usage_fraction()}


@functools.partial(jax.jit, static_argnums=0)
def _encode_decode(g_def, params, rest, images):
  tok = nnx.merge(g_def, params, rest, copy=True)
  tok.eval()
  hol, patch = tok.encode(to_unit(images))
  return to_uint8(tok.decode(hol, patch))


def reconstruct(parts, params, rest, images_u8):
  # The host images, replicated on the weights' mesh: with several processes a process-local array
  # cannot meet globally sharded weights in one operation.
  mesh = next(x.sharding.mesh for x in jax.tree.leaves(params)
              if isinstance(getattr(x, 'sharding', None), jax.sharding.NamedSharding))
  images = sharding.put(np.asarray(images_u8), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  # One jitted program (the graph definition is its static key), never eager op-by-op: eager ops on
  # globally sharded arrays left two processes in different collectives (a 2-process run hung here).
  return _encode_decode(parts.g_def, params, rest, images)


def ema_params(parts, state):
  """The generator's EMA weights as a parameter tree (cut out of the flat vector if flat)."""
  if parts.flat_ema:
    return training.unflatten_like(state['ema'], state['g_params'])
  return state['ema']


def export_ema(parts, state, directory):
  tok = nnx.merge(parts.g_def, ema_params(parts, state), state['g_rest'], copy=True)
  pretrained.save_tokenizer(directory, tok, overwrite=True,
                            metadata={'step': int(state['step']), 'weights': 'ema'})


def validate(config):
  """Fail early, naming the key, on values the step would only reject deep inside jit."""
  config_lib.check_paths(config)
  lc, tr = config.tokenizer_loss, config.train_tokenizer
  checks = [('tokenizer_loss.disc_loss', lc.disc_loss, sorted(losses.D_LOSSES)),
            ('tokenizer_loss.gen_loss', lc.gen_loss, sorted(losses.G_LOSSES)),
            ('tokenizer_loss.disc_batch_norm', lc.disc_batch_norm, ['replica', 'global']),
            ('tokenizer_loss.disc_type', lc.disc_type, ['patchgan', 'dino']),
            ('train_tokenizer.lr_decay', tr.lr_decay, ['constant', 'cosine']),
            ('train_tokenizer.optimizer_layout', tr.optimizer_layout, ['auto', 'flat', 'per_leaf']),
            ('train_tokenizer.compute_dtype', tr.compute_dtype, ['float32', 'bfloat16', 'float16']),
            ('train_tokenizer.step_stages', tr.get('step_stages', 1), [1, 3]),
            ('data.source', config.data.source, ['shapes', 'folder', 'tfds'])]
  for key, value, valid in checks:
    if value not in valid:
      raise UserError(f'config.{key}={value!r} is not valid; choose one of {valid}')
  for key in ('global_batch_size', 'num_steps', 'log_every', 'ckpt_every', 'image_every'):
    if tr[key] <= 0:
      raise UserError(f'config.train_tokenizer.{key} must be positive, got {tr[key]}')


def saved_optimizer_layout(mngr) -> str | None:
  """'flat' or 'per_leaf': the Adam moments' layout of the latest checkpoint under `mngr`, if any."""
  md = checkpoint.latest_state_metadata(mngr)
  try:
    mu = md['opt_g'][1][0]['mu']
  except (TypeError, KeyError, IndexError):
    return None
  return 'per_leaf' if isinstance(mu, dict) else 'flat'


def saved_ema_layout(mngr) -> str | None:
  """'flat' or 'tree': the generator EMA's layout in the latest checkpoint under `mngr`, if any
  (flat-moments checkpoints written before 2026-12-05 hold a per-tensor EMA)."""
  md = checkpoint.latest_state_metadata(mngr)
  if not md or 'ema' not in md:
    return None
  return 'tree' if isinstance(md['ema'], dict) else 'flat'


def resolve_optimizer_layout(layout: str, saved: str | None) -> str:
  """The layout a run uses: 'auto' follows the checkpoint it resumes (so a run resumes on any mesh
  whatever layout wrote it); an explicit layout must match the checkpoint's."""
  if saved is None or layout == saved:
    return layout
  if layout == 'auto':
    print(f'optimizer_layout: {saved!r}, as the checkpoint being resumed', flush=True)
    return saved
  raise UserError(f"train_tokenizer.optimizer_layout={layout!r}, but the checkpoint being resumed "
                  f"holds its Adam moments {saved!r} (checkpoints written before 2026-12-04 are "
                  f"per_leaf): resume with --config.train_tokenizer.optimizer_layout={saved} or auto")


def make_train_step(parts, config):
  """The step the trainer runs, called as step(state, frozen, batch, rng): one jitted program
  (`train_tokenizer.step_stages=1`) or `StagedTrainStep` (3)."""
  stages = config.train_tokenizer.get('step_stages', 1)
  if stages == 3:
    return StagedTrainStep(parts, config)
  return jit_train_step(parts, config)


def compile_train_step(step, state, frozen, batch, rng):
  """`make_train_step`'s step compiled ahead for these arguments -> a callable of the same
  signature (what the benchmarks time as the compile)."""
  if isinstance(step, StagedTrainStep):
    return step.compile(state, frozen, batch, rng)
  return step.lower(state, frozen, batch, rng).compile()


def jit_train_step(parts, config):
  """`train_step` jitted as the trainer runs it: state donated, the config's XLA options on GPU
  (`train_tokenizer.gpu_compiler_options`). Called as step(state, frozen, batch, rng)."""
  return jax.jit(functools.partial(train_step, parts, config), donate_argnums=(0,),
                 compiler_options=config_lib.gpu_compiler_options(
                     config.train_tokenizer.get('gpu_compiler_options')))


def run(config, workdir: str):
  validate(config)
  pretrained.require_dinov2(config.init.tokenizer, config.init.dinov2, key=config.init.tokenizer_key,
                            allow_random=config.init.allow_random_dinov2)
  if config.tokenizer_loss.disc_type == 'dino' and config.tokenizer_loss.disc_weight:
    pretrained.require_dino_disc(config.init.dino_disc, allow_random=config.init.allow_random_dino_disc)
  tr = config.train_tokenizer
  mesh = sharding.make_mesh(config_lib.mesh_spec(config, jax.device_count()))
  rules = config_lib.axis_rules(config)
  mngr = checkpoint.checkpoint_manager(os.path.join(workdir, 'checkpoints'), every=tr.ckpt_every,
                                       keep=tr.keep_checkpoints, best_metric='g_loss')
  layout = resolve_optimizer_layout(tr.optimizer_layout, saved_optimizer_layout(mngr))
  parts, state, frozen, sched = build(config, mesh, optimizer_layout=layout,
                                      ema_layout=saved_ema_layout(mngr))
  batch_sh = {'image': sharding.batch_sharding(mesh, rules, 4)}
  n_shards = sharding.batch_shards(batch_sh['image'])
  if tr.global_batch_size % n_shards:
    raise UserError(f'train_tokenizer.global_batch_size={tr.global_batch_size} must be a multiple '
                     f'of the {n_shards} batch shards of mesh {dict(mesh.shape)}')
  data_iter, _ = make_image_dataset(
      config.data, image_size=parts.cfg.image_size, global_batch=tr.global_batch_size,
      seed=config.seed, train=True, process_index=jax.process_index(),
      process_count=jax.process_count())
  state, start = checkpoint.resume(mngr, state, data_iter)
  step_fn = make_train_step(parts, config)
  logger = training.MetricLogger(workdir, total_steps=tr.num_steps, start_step=start,
                                 every=tr.log_every, images_per_step=tr.global_batch_size,
                                 line_keys=('g_loss', 'rec_loss', 'd_loss'), hparams=tr.to_dict(),
                                 watch=NONFINITE_WATCH, max_nonfinite=tr.max_nonfinite_steps)
  rng = jax.random.key(config.seed)
  fixed, skipped = None, 0
  try:
    for step in range(start + 1, tr.num_steps + 1):
      local = next(data_iter)
      skipped += int(np.sum(local.pop('skipped')))  # this process's count
      batch = training.global_batch({'image': local['image']}, batch_sh)
      if fixed is None:  # the images every reconstruction grid shows: the first of the global batch
        fixed = sharding.to_host(batch['image'])[:min(8, tr.global_batch_size)]
      state, metrics = step_fn(state, frozen, batch, rng)
      logged = logger.log(step, metrics, extra=lambda: {
          **{k: float(v) for k, v in jax.device_get(codebook_usage_window(parts, state)).items()},
          'lr': float(sched(step)), 'skipped_images': skipped})
      if logged and skipped:
        print(f'  {skipped} unreadable images skipped so far', flush=True)
      if step % tr.image_every == 0 or step == tr.num_steps:
        rec = reconstruct(parts, ema_params(parts, state) if tr.show_ema else state['g_params'],
                          state['g_rest'], fixed)
        logger.image(step, 'reconstructions', np.concatenate([fixed, sharding.to_host(rec)]), rows=2)
      if step % tr.ckpt_every == 0 or step == tr.num_steps:
        logger.check()  # stops before a save when too many steps in a row were non-finite
        checkpoint.save_train_state(mngr, step, state, data_iter,
                                    metrics={'g_loss': training.finite_or_inf(metrics['g_loss'])})
      if tr.export_every and step % tr.export_every == 0:
        export_ema(parts, state, os.path.join(workdir, 'export', 'ema'))
  finally:  # a stopped run still completes the async save in flight (a finite state)
    checkpoint.finish_saves(mngr)
  logger.close()
  export_ema(parts, state, os.path.join(workdir, 'export', 'ema'))
  summary = {'step': int(state['step']), 'skipped_images': skipped}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'train_summary.json'), 'w') as f:
      json.dump(summary, f)
  print(f'done: {summary}; EMA tokenizer exported to {os.path.join(workdir, "export", "ema")}')
  return state
