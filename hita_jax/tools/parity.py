"""Checks hita_jax against golden outputs of the official PyTorch code.

    python -m hita_jax.tools.parity --fixtures ../shared/fixtures/official

Works on any directory in the format of `shared/fixtures/official/`: every model it describes is
rebuilt from its JSON, loaded through the converters and run on the saved inputs. One line per
compared array (max abs / max relative error, or code-index agreement), then `PASS` or `FAIL`.
Files the directory lacks are skipped and reported; the exit status is non-zero on failure. A
missing directory or an unreadable fixture file prints one line `error: ...` (exit status 2).

Tolerances: where the fixture README gives an atol for an array, |got - ref| <= atol + 1e-5 |ref|
(its suggested rule); otherwise the max error relative to the array's max magnitude must be <= 1e-4.
Decoded images must also be within 1e-3 max abs, uint8 images within +-1.
Code ids must match where the recorded margin is >= 1e-3 and be the best or runner-up below it.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import json
import re

from flax import nnx
from safetensors.numpy import load_file

from hita_jax import cli
from hita_jax.convert.dino_disc import export_dino_disc_heads
from hita_jax.convert.losses import load_official_lpips, load_official_patchgan
from hita_jax.data.images import codes_to_images, to_uint8
from hita_jax.models import losses
from hita_jax.models.dino_discriminator import dino_input, replay_augmentation
from hita_jax.models.dinov2 import preprocess_for_dinov2
from hita_jax.models.discriminator import PatchGAN
from hita_jax.models.holistic import pos_table_for_grid
from hita_jax.models.lpips import LPIPS
from hita_jax.models.quantizer import VectorQuantizer
from hita_jax.models.resize import torch_bicubic_resize
from hita_jax.models.sampler import generate
from hita_jax.tools import fixtures as fx

REL_TOL = 1e-4
README_RTOL = 1e-5
IMAGE_ATOL = 1e-3
MARGIN = 1e-3
VFM_ALIASES = ('recon_latent', 'vfm_recon', 'vfm_prediction', 'recon_vfm', 'vfm_pred', 'vfm_out')
LATENT_ALIASES = ('latent', 'dinov2_latent', 'dinov2_patch_tokens', 'dinov2_patch_features')


class Report:

  def __init__(self, tolerances):
    self.tol = tolerances
    self.failed = []
    self.n = 0

  def line(self, text, ok):
    self.n += 1
    print(('  ok   ' if ok else '  FAIL ') + text, flush=True)
    if not ok:
      self.failed.append(text.split()[0])

  def skip(self, what, why):
    print(f'  skip {what}: {why}', flush=True)

  def array(self, name, got, ref, *, kind='end-to-end', image=False, label=None):
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    label = label or name
    if got.shape != ref.shape:
      self.line(f'{label} shape {got.shape} != reference {ref.shape}', False)
      return
    err = np.abs(got - ref)
    max_abs = float(err.max()) if err.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    rel = max_abs / scale if scale else max_abs
    atol = self.tol.get(name, {}).get(kind)
    if atol is not None:  # the README's per-array tolerance replaces the generic one
      ok = bool(np.all(err <= atol + README_RTOL * np.abs(ref)))
      crit = f'abs<={atol:g}+{README_RTOL:g}*|ref| (README)'
    else:
      ok = rel <= REL_TOL
      crit = f'rel<={REL_TOL:g}'
    if image:
      ok = ok and max_abs <= IMAGE_ATOL
      crit += f', max_abs<={IMAGE_ATOL:g}'
    self.line(f'{label:34s} {str(ref.shape):18s} max_abs={max_abs:.2e} max_rel={rel:.2e} [{crit}]', ok)

  def uint8(self, name, got, ref, tol=1):
    diff = np.abs(np.asarray(got, np.int32) - np.asarray(ref, np.int32))
    self.line(f'{name:34s} {str(ref.shape):18s} max_int_diff={int(diff.max())} '
              f'n_diff={int((diff > 0).sum())} [<= {tol}]', bool(diff.max() <= tol))

  def indices(self, name, got, ref, margin=None, second=None):
    got, ref = np.asarray(got).reshape(ref.shape), np.asarray(ref)
    if margin is None:
      ok = bool(np.array_equal(got, ref))
      self.line(f'{name:34s} {str(ref.shape):18s} equal={int((got == ref).sum())}/{ref.size} '
                f'[exact]', ok)
      return
    hi = margin >= MARGIN
    exact_hi = bool(np.all(got[hi] == ref[hi]))
    lo_ok = np.all((got[~hi] == ref[~hi]) | (second is not None and (got[~hi] == second[~hi])))
    self.line(f'{name:34s} {str(ref.shape):18s} equal={int((got == ref).sum())}/{ref.size} '
              f'(margin>=1e-3: {int((got[hi] == ref[hi]).sum())}/{int(hi.sum())} equal; '
              f'{int((~hi).sum())} low-margin best-or-runner-up: {bool(lo_ok)})',
              exact_hi and bool(lo_ok))


def nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


def _fixture_io(d: str, name: str, rep: Report, needs: str | None = None) -> dict | None:
  """`<name>_io.npz` of the fixture directory, or None (reported as skipped) when it or the file
  `needs` (default `<name>.json`) is missing."""
  needs = needs or f'{name}.json'
  path = os.path.join(d, f'{name}_io.npz')
  if not os.path.exists(os.path.join(d, needs)) or not os.path.exists(path):
    rep.skip(name, f'{name}_io.npz or {needs} missing')
    return None
  print(f'[{name}]')
  return fx.load_npz(path)


def check_dinov2(d: str, rep: Report):
  io = _fixture_io(d, 'dinov2', rep)
  if io is None:
    return
  model, _ = fx.dinov2_from_fixture(d)
  if 'dinov2_input' in io:
    x_in = jnp.asarray(io['dinov2_input']).transpose(0, 2, 3, 1)
    if os.path.exists(os.path.join(d, 'inputs.npz')):
      images = jnp.asarray(fx.load_npz(os.path.join(d, 'inputs.npz'))['images']).transpose(0, 2, 3, 1)
      rep.array('dinov2_input', nchw(preprocess_for_dinov2(images, x_in.shape[1])),
                io['dinov2_input'])
    gh = x_in.shape[1] // model.cfg.patch_size
    gw = x_in.shape[2] // model.cfg.patch_size
    if 'dinov2_pos_embed_interp' in io:
      rep.array('dinov2_pos_embed_interp', model.interpolated_pos_embed(gh, gw)[None],
                io['dinov2_pos_embed_interp'])
    if 'dinov2_features' in io:
      rep.array('dinov2_features', model.features(x_in), io['dinov2_features'], kind='stage',
                label='dinov2_features (stage)')
      if os.path.exists(os.path.join(d, 'inputs.npz')):
        rep.array('dinov2_features', model.features(preprocess_for_dinov2(images, x_in.shape[1])),
                  io['dinov2_features'], label='dinov2_features (end-to-end)')


def check_tokenizer(d: str, name: str, rep: Report):
  in_path = os.path.join(d, 'inputs.npz')
  ref = _fixture_io(d, name, rep, needs='inputs.npz')
  if ref is None:
    return
  model, _ = fx.tokenizer_from_fixture(d, name)
  images = jnp.asarray(fx.load_npz(in_path)['images']).transpose(0, 2, 3, 1)
  b = images.shape[0]
  known = set()

  def have(*names):
    known.update(names)
    return all(n in ref for n in names)

  # Encoder side, end to end from the images.
  # Jitted as a user's model runs (and one compile instead of op-by-op dispatch: ~3x faster on CPU).
  encode = nnx.jit(lambda m, x: m.encode_pre_quant(x, return_intermediates=True))
  pre_hol, pre_patch, aux = encode(model, images)
  gh, gw = aux['cnn_encoder_out'].shape[1:3]
  enc = {
      'cnn_encoder_out': nchw(aux['cnn_encoder_out']),
      'proj_features': aux['proj_features'],
      'e_trans_out': aux['e_trans_out'],
      'e_causal_holistic': aux['e_causal_holistic'],
      'e_causal_patch': np.asarray(aux['e_causal_patch']).reshape(b, gh * gw, -1),
      'prequant_patch': nchw(pre_patch),
      'prequant_holistic': pre_hol,
      'enc_pos_embed_interp': model.holistic_encoder.patch_pos_embed(gh, gw)[None],
      'dec_pos_embed_interp': model.fusion_decoder.patch_pos_embed(gh, gw)[None],
  }
  for k, v in enc.items():
    if have(k):
      rep.array(k, v, ref[k])
  for alias in LATENT_ALIASES:
    if have(alias):
      rep.array(alias, aux['dinov2_features'][:, 1:], ref[alias])
  _, hol_idx, _ = model.holistic_quantizer(pre_hol)
  _, patch_idx, _ = model.patch_quantizer(pre_patch)
  for kind, idx in (('patch', patch_idx), ('holistic', hol_idx)):
    if have(f'{kind}_indices'):
      known.update({f'{kind}_index_margin', f'{kind}_index_second'})
      rep.indices(f'{kind}_indices', idx, ref[f'{kind}_indices'], ref.get(f'{kind}_index_margin'),
                  ref.get(f'{kind}_index_second'))

  # Decoder side, stage by stage from the saved code ids (a flipped id changes everything after).
  if not have('patch_indices', 'holistic_indices'):
    rep.skip(f'{name} decoder', 'no saved code ids')
    return
  hol_ids = jnp.asarray(ref['holistic_indices'], jnp.int32)
  patch_ids = jnp.asarray(ref['patch_indices'], jnp.int32).reshape(b, gh, gw)
  hol_q = model.holistic_quantizer.lookup(hol_ids)
  patch_q = model.patch_quantizer.lookup(patch_ids)
  recon, inter = nnx.jit(lambda m, h, p: m.decode_latents(h, p, return_intermediates=True))(
      model, hol_q, patch_q)
  dec = {
      'dequant_patch': nchw(patch_q), 'dequant_holistic': hol_q,
      'postquant_patch': nchw(inter['postquant_patch']),
      'postquant_holistic': inter['postquant_holistic'],
      'fusion_out': inter['fusion_out'], 'decoder_cnn_input': nchw(inter['decoder_cnn_input']),
  }
  for k, v in dec.items():
    if have(k):
      rep.array(k, v, ref[k], kind='stage')
  if have('recon'):
    rep.array('recon', nchw(recon), ref['recon'], kind='stage', image=True,
              label='recon (from saved code ids)')
    if 'decoder_cnn_input' in ref:
      cnn_decode = nnx.jit(lambda m, z: m.cnn_decoder(z))
      rep.array('recon', nchw(cnn_decode(model, jnp.asarray(ref['decoder_cnn_input']).transpose(0, 2, 3, 1))),
                ref['recon'], kind='stage', image=True, label='recon (CNN decoder stage)')
  if have('recon_eval_resized'):
    size = ref['recon_eval_resized'].shape[-2:]
    rep.array('recon_eval_resized', nchw(torch_bicubic_resize(recon, size)),
              ref['recon_eval_resized'], kind='stage', image=True)
  if have('recon_eval_uint8'):
    size = ref['recon_eval_uint8'].shape[1:3]
    rep.uint8('recon_eval_uint8', to_uint8(torch_bicubic_resize(recon, size)),
              ref['recon_eval_uint8'])
  if model.cfg.vfm:
    fd = model.fusion_decoder
    for alias in ('vfm_pos_embed_interp', 'vfm_position_embedding'):
      if have(alias):
        rep.array(alias, pos_table_for_grid(fd.position_embedding[...], fd.pos_grid,
                                            (fd.vfm_grid, fd.vfm_grid))[None], ref[alias])
    for alias in VFM_ALIASES:
      if have(alias):
        rep.array(alias, model.vfm_prediction(hol_q), ref[alias], kind='stage')
  for k in sorted(set(ref) - known):
    rep.skip(f'{name}_io.npz:{k}', 'array not known to this tool')


def check_gpt(d: str, rep: Report):
  ref = _fixture_io(d, 'gpt', rep)
  if ref is None:
    return
  model, j = fx.gpt_from_fixture(d)
  known = {'labels', 'holistic_codes', 'patch_codes'}
  labels = jnp.asarray(ref['labels'], jnp.int32)
  q = jnp.asarray(ref['holistic_codes'], jnp.int32)
  z = jnp.asarray(ref['patch_codes'], jnp.int32)
  seq = jnp.concatenate([q, z], axis=1)
  if 'train_logits' in ref:
    known.add('train_logits')
    rep.array('train_logits', model(labels, q, z), ref['train_logits'])
  lh, lp = model.loss(labels, q, z)
  for k, v in (('train_loss_holistic', lh), ('train_loss_patch', lp)):
    if k in ref:
      known.add(k)
      rep.array(k, v, ref[k])
  gen = j.get('generate_kwargs', {})
  scale = float(j.get('cfg_scale', 1.5))
  forced = np.ones(seq.shape, bool)
  teacher = {'kv_logits': (1.0, True), 'kv_logits_fixed': (1.0, False), 'cfg_logits': (scale, True)}
  for k, (s, legacy) in teacher.items():
    if k in ref:
      known.add(k)
      _, logits = generate(model, labels, jax.random.key(0), cfg_scale=s, legacy_pos128_embedding=legacy,
                           prefix_codes=seq, prefix_mask=forced, return_logits=True)
      rep.array(k, logits, ref[k])
  sampled = {}
  for k in sorted(ref):
    m = re.fullmatch(r'greedy_cfg([0-9.]+)(_fixed)?', k)
    if not m:
      continue
    known.add(k)
    out = generate(model, labels, jax.random.key(0), cfg_scale=float(m.group(1)),
                   cfg_interval=int(gen.get('cfg_interval', -1)),
                   temperature=float(gen.get('temperature', 1.0)), top_k=int(gen.get('top_k', 1)),
                   top_p=float(gen.get('top_p', 1.0)), legacy_pos128_embedding=not m.group(2))
    sampled[k] = out
    rep.indices(k, out, ref[k])
  for k in sorted(ref):
    m = re.fullmatch(r'(greedy_cfg[0-9.]+(?:_fixed)?)_decoded_eval_uint8', k)
    if not m:
      continue
    known.add(k)
    names = fx.tokenizer_names(d)
    if not names:
      rep.skip(k, 'no tokenizer in the fixtures to decode with')
      continue
    name = 'tokenizer_v' if 'tokenizer_v' in names else names[0]
    tok, _ = fx.tokenizer_from_fixture(d, name)
    # decode the official generation (a flipped code would change the whole image)
    codes = jnp.asarray(ref[m.group(1)], jnp.int32)
    rep.uint8(k, codes_to_images(tok, codes, eval_size=ref[k].shape[1]), ref[k])
  for k in sorted(set(ref) - known):
    rep.skip(f'gpt_io.npz:{k}', 'array not known to this tool')


def check_losses(d: str, rep: Report):
  need = ('losses.json', 'losses_io.npz', 'inputs.npz', 'tokenizer_v_io.npz')
  missing = [f for f in need if not os.path.exists(os.path.join(d, f))]
  if missing:
    rep.skip('losses', f'{", ".join(missing)} missing')
    return
  print('[losses]')
  with open(os.path.join(d, 'losses.json')) as f:
    j = json.load(f)
  ref = fx.load_npz(os.path.join(d, 'losses_io.npz'))
  vals = j.get('values', {})
  images = jnp.asarray(fx.load_npz(os.path.join(d, 'inputs.npz'))['images']).transpose(0, 2, 3, 1)
  tok_io = fx.load_npz(os.path.join(d, 'tokenizer_v_io.npz'))
  recon = jnp.asarray(tok_io['recon']).transpose(0, 2, 3, 1)
  # LPIPS (eval mode: dropout off); random VGG16 stored bit-packed, real linear heads
  raw = load_file(os.path.join(d, j['lpips'].get('weights', 'lpips.safetensors')))
  sd = {}
  for k, v in raw.items():
    pk = j['lpips'].get('vgg16_packing', {}).get(k)
    if pk:
      bits = np.unpackbits(v, bitorder=pk.get('bitorder', 'little'), count=pk['numel'])
      v = ((bits.astype(np.float32) * 2 - 1) * np.float32(pk['scale'])).reshape(pk['shape'])
    sd[k] = v
  lp = load_official_lpips(LPIPS(rngs=nnx.Rngs(0)), sd)
  total, per = lp(images, recon, per_layer=True)
  if 'lpips' in ref:
    rep.array('lpips', np.asarray(total).reshape(ref['lpips'].shape), ref['lpips'], kind='stage')
  if 'lpips_per_layer' in ref:
    rep.array('lpips_per_layer', per, ref['lpips_per_layer'], kind='stage')
  # PatchGAN: eval logits, then one train-mode call disc(recon, images) (fake first, then real)
  pg = j['patchgan']
  disc = PatchGAN(in_channels=pg.get('input_nc', 3), ndf=pg['ndf'], n_layers=pg['n_layers'],
                  rngs=nnx.Rngs(0))
  load_official_patchgan(disc, load_file(os.path.join(d, pg.get('weights', 'patchgan.safetensors'))))
  disc.eval()
  fake_e, real_e = disc(recon), disc(images)
  disc.train()
  fake_t, real_t = disc(recon), disc(images)
  out = {'disc_logits_fake_eval': fake_e, 'disc_logits_real_eval': real_e,
         'disc_logits_fake_train': fake_t, 'disc_logits_real_train': real_t}
  for k, v in out.items():
    if k in ref:
      rep.array(k, nchw(v), ref[k], kind='stage')
  for i, norm in enumerate(disc.norms):
    for ours, theirs in (('mean', 'running_mean'), ('var', 'running_var')):
      k = f'disc_after_train_step.main.{3 + 3 * i}.{theirs}'
      if k in ref:
        rep.array(k, getattr(norm, ours)[...], ref[k], kind='stage')
  # Scalar losses (per-quantizer losses from the saved pre-quant vectors, training formulas)
  kw = j.get('vqloss_kwargs', {})
  dw = kw.get('disc_weight', 0.5)
  w_adv = float(losses.adversarial_weight(j.get('global_step', 0), kw.get('disc_start', 0), dw))
  scalars = {
      'lpips_mean': jnp.mean(total),
      'hinge_d_loss_eval': losses.hinge_d_loss(real_e, fake_e),
      'softplus_g_loss_eval': losses.softplus_g_loss(fake_e),
      'hinge_d_loss_train': losses.hinge_d_loss(real_t, fake_t),
      'softplus_g_loss_train': losses.softplus_g_loss(fake_t),
      'rec_loss_2xmse': losses.reconstruction_loss(images, recon),
  }
  beta = 0.25
  for kind, key, shape in (('patch', 'prequant_patch', None), ('holistic', 'prequant_holistic', None)):
    if key not in tok_io:
      continue
    z = jnp.asarray(tok_io[key])
    z = z.transpose(0, 2, 3, 1) if z.ndim == 4 else z
    codebook = load_file(os.path.join(d, 'tokenizer_v.safetensors'))[
        ('quantize' if kind == 'patch' else 'slot_quantize') + '.embedding.weight']
    q = VectorQuantizer(codebook.shape[0], codebook.shape[1], beta=beta, rngs=nnx.Rngs(0))
    q.codebook[...] = codebook
    _, _, l = q(z)
    scalars[f'{kind}_vq_loss'] = l['vq']
    scalars[f'{kind}_commit_loss'] = l['commit']
  if all(k in scalars for k in ('patch_vq_loss', 'holistic_vq_loss')):
    scalars['vqloss_generator_total_eval'] = (
        scalars['rec_loss_2xmse'] + scalars['lpips_mean'] + w_adv * scalars['softplus_g_loss_eval']
        + scalars['patch_vq_loss'] + scalars['holistic_vq_loss'] + scalars['patch_commit_loss']
        + scalars['holistic_commit_loss'])
  scalars['vqloss_discriminator_total_eval'] = w_adv * scalars['hinge_d_loss_eval']
  for k, v in scalars.items():
    if k in vals:
      rep.array(k, np.float32(v), np.float32(vals[k]))


def _dino_call_input(call: dict) -> str:
  return 'images' if call.get('input', 'images') in ('images', 'real') else 'fake'


def check_dino_disc(d: str, rep: Report):
  """Official DinoDisc: DINO inputs and readouts, logits of every recorded call (its draws replayed,
  eval or train mode, a fresh discriminator per group of calls as recorded), spectral-norm vectors
  after the train-mode call, and the VQLoss values of the G and D steps."""
  if not os.path.exists(os.path.join(d, 'inputs.npz')):
    rep.skip('dino_disc', 'inputs.npz missing')
    return
  io = _fixture_io(d, 'dino_disc', rep)
  if io is None:
    return
  model, j = fx.dino_disc_from_fixture(d)
  cfg = model.cfg
  batch = {'images': jnp.asarray(fx.load_npz(os.path.join(d, 'inputs.npz'))['images']).transpose(0, 2, 3, 1),
           'fake': jnp.asarray(io['fake_images']).transpose(0, 2, 3, 1)}
  known = {'fake_images', 'draws_coin', 'draws_branch', 'draws_crop_top_left'}
  graphdef, saved = nnx.split(model)

  @functools.partial(jax.jit, static_argnums=(3,))
  def run(state, x, aug, train):
    m = nnx.merge(graphdef, state, copy=True)
    m.train() if train else m.eval()
    r = m.readouts(x, aug)
    return m.logits_from_readouts(r), r, dino_input(x, aug, cfg.img_size), nnx.state(m)

  @functools.partial(jax.jit, static_argnums=(2,))
  def run_heads(state, readouts, train):
    m = nnx.merge(graphdef, state, copy=True)
    m.train() if train else m.eval()
    return m.logits_from_readouts(readouts), nnx.state(m)

  def sn_vectors(state, label, kind):
    m = nnx.merge(graphdef, state, copy=True)
    for k, v in export_dino_disc_heads(m).items():
      name = f'sn_after_train.{k}'
      if k.endswith(('.weight_u', '.weight_v')) and name in io:
        known.add(name)
        rep.array(name, v, io[name], kind=kind, label=f'{name} ({label})')

  act_names = ['dino_act_embed'] + [f'dino_act_block{k}' for k in cfg.effective_key_depths]
  logits, state = {}, saved
  for i, call in enumerate(j['calls']):
    name = call['name']
    in_sequence = name.startswith(('gstep', 'dstep'))  # VQLoss G then D step: one discriminator
    if not in_sequence or not any(c['name'].startswith(('gstep', 'dstep')) for c in j['calls'][:i]):
      state = saved
    crop = bool(io['draws_branch'][i]) if 'draws_branch' in io else call['branch'] == 'crop'
    top, left = (io['draws_crop_top_left'][i] if 'draws_crop_top_left' in io else call['crop_top_left'])
    aug = replay_augmentation(crop, int(top), int(left))
    train = call['disc_mode'] == 'train'
    out, readouts, x_in, state = run(state, batch[_dino_call_input(call)], aug, train)
    logits[name] = out
    branch_input = f'dino_input_{"crop" if crop else "area"}'
    if branch_input in io and branch_input not in known and _dino_call_input(call) == 'images':
      known.add(branch_input)
      rep.array(branch_input, nchw(x_in), io[branch_input])
    if i == 0:
      for k, r in zip(act_names, readouts):
        if k in io:
          known.add(k)
          rep.array(k, np.asarray(r).transpose(0, 2, 1), io[k])
    if f'logits_{name}' in io:
      known.add(f'logits_{name}')
      rep.array(f'logits_{name}', out, io[f'logits_{name}'], label=f'logits_{name} (end-to-end)')
      if i == 0 or (train and not in_sequence):  # stage: the heads on the saved activations
        if all(k in io for k in act_names):
          saved_acts = [jnp.asarray(io[k]).transpose(0, 2, 1) for k in act_names]
          st_out, st_state = run_heads(saved, saved_acts, train)
          rep.array(f'logits_{name}', st_out, io[f'logits_{name}'], kind='stage',
                    label=f'logits_{name} (stage)')
          if train:
            sn_vectors(st_state, 'stage', 'stage')
    if train and not in_sequence:
      sn_vectors(state, 'end-to-end', 'end-to-end')
  vq = j.get('vqloss', {})
  w = float(losses.adversarial_weight(vq.get('global_step', 0), vq.get('disc_start', 0),
                                      vq.get('disc_weight', 0.5)))
  d_loss = losses.D_LOSSES[vq.get('disc_loss', 'hinge')]
  g_loss = losses.G_LOSSES[vq.get('gen_adv_loss', 'softplus_g_loss')]
  values = {}
  if {'eval_area_real', 'eval_area_fake'} <= set(logits):
    values['eval_hinge_d_loss'] = d_loss(logits['eval_area_real'], logits['eval_area_fake'])
    values['eval_softplus_g_loss'] = g_loss(logits['eval_area_fake'])
  if 'gstep_fake' in logits:
    values['gstep_softplus_g_loss'] = g_loss(logits['gstep_fake'])
    values['gstep_generator_adv_term'] = w * values['gstep_softplus_g_loss']
  if {'dstep_real', 'dstep_fake'} <= set(logits):
    values['dstep_hinge_d_loss'] = d_loss(logits['dstep_real'], logits['dstep_fake'])
    values['dstep_d_adversarial_loss'] = w * values['dstep_hinge_d_loss']
  ref_values = j.get('values', {})
  for k, v in values.items():
    if k in ref_values:
      rep.array(k, np.float32(v), np.float32(ref_values[k]))
  for k in sorted(set(ref_values) - set(values)):
    rep.skip(f'dino_disc.json:values.{k}', 'value not known to this tool')
  for k in sorted(set(io) - known):
    rep.skip(f'dino_disc_io.npz:{k}', 'array not known to this tool')


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=cli.VERBOSITY_HELP)
  p.add_argument('--fixtures', required=True, help='directory in the format of shared/fixtures/official')
  args = p.parse_args(argv)
  d = args.fixtures
  if not os.path.isdir(d):
    print(f'error: fixture directory not found: {d} (fix --fixtures=<a directory in the format of '
          'shared/fixtures/official>)', file=sys.stderr)
    return 2
  with cli.blame({'--fixtures': d}):  # a missing or unreadable fixture file: one line naming it
    return _check_all(d)


def _check_all(d: str) -> int:
  rep = Report(fx.readme_tolerances(d))
  with jax.default_matmul_precision('float32'):
    check_dinov2(d, rep)
    names = fx.tokenizer_names(d)
    if not names:
      rep.skip('tokenizer', 'no tokenizer_*.json')
    for name in names:
      check_tokenizer(d, name, rep)
    check_gpt(d, rep)
    check_losses(d, rep)
    check_dino_disc(d, rep)
  if rep.n == 0:
    print('FAIL: nothing was compared')
    return 1
  if rep.failed:
    print(f'FAIL: {len(rep.failed)} of {rep.n} comparisons failed: {", ".join(rep.failed)}')
    return 1
  print(f'PASS: {rep.n} comparisons')
  return 0


if __name__ == '__main__':
  cli.run(main)
