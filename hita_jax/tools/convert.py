"""Weights between the official PyTorch layouts and hita_jax params exports, one command line:

    python -m hita_jax.tools.convert tokenizer import --config configs/tokenizer_v.py \
        --checkpoint hita-tok.pt --dinov2 dinov2_vitl14_reg4_pretrain.pth --out weights/hita_v
    python -m hita_jax.tools.convert tokenizer export --config configs/tokenizer_v.py \
        --params weights/hita_v --out hita-tok.safetensors
    python -m hita_jax.tools.convert gpt import --config configs/hita_b.py --checkpoint GPT-B.pt --out weights/gpt_b
    python -m hita_jax.tools.convert gpt export --config configs/hita_b.py --params weights/gpt_b --out gpt.safetensors
    python -m hita_jax.tools.convert dinov2 import --checkpoint dinov2-with-registers-large/ --out weights/dinov2
    python -m hita_jax.tools.convert dinov2 export --params weights/dinov2 --out dinov2.safetensors

`import` writes a params export (Orbax + config.json) that every task reads (`--config.init.*`);
`export` writes the official key layout as `.safetensors` or `.npz`. Nothing is overwritten unless
`--overwrite` is given. GPT imports record that the released sampler's position-S quirk must be
reproduced for published numbers (`sample.legacy_pos128_embedding=True`). A missing, unreadable or
mismatched file or config prints one line `error: ...` naming it and the argument to fix (exit
status 2); `--verbosity=1` shows the traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import os

from flax import nnx

from hita_jax import checkpoint, cli, config_lib, pretrained
from hita_jax.convert import dinov2 as dinov2_convert
from hita_jax.convert import gpt as gpt_convert
from hita_jax.convert import tokenizer as tokenizer_convert
from hita_jax.convert.mapping import write_state_dict
from hita_jax.errors import MissingEntryError
from hita_jax.models.dinov2 import DINOV2_VARIANTS, DinoV2, DinoV2Config
from hita_jax.models.gpt import gpt_config_from


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='python -m hita_jax.tools.convert',
                              description='Official Hita / DINOv2 weights <-> hita_jax params exports.',
                              epilog=cli.VERBOSITY_HELP)
  models = p.add_subparsers(dest='model', required=True)
  for model, ckpt_help in (('tokenizer', 'hita-tok.pt / .safetensors / .npz'),
                           ('gpt', 'GPT-B-50e.pt / .safetensors / .npz'),
                           ('dinov2', "Meta's .pth, a .safetensors/.npz, or a Hugging Face directory")):
    cmds = models.add_parser(model).add_subparsers(dest='cmd', required=True)
    imp = cmds.add_parser('import', help='official weights -> hita_jax params export (Orbax)')
    exp = cmds.add_parser('export', help='hita_jax params export -> official key layout')
    imp.add_argument('--checkpoint', required=True, help=ckpt_help)
    imp.add_argument('--out', required=True, help='params export directory')
    exp.add_argument('--params', required=True, help='hita_jax params export directory')
    exp.add_argument('--out', required=True, help='.safetensors or .npz')
    for sub in (imp, exp):
      sub.add_argument('--overwrite', action='store_true')
      if model == 'dinov2':
        sub.add_argument('--variant', default='vitl14_reg4', choices=sorted(DINOV2_VARIANTS),
                         help='architecture when the weights carry no config.json')
      else:
        sub.add_argument('--config', required=True, help=f'e.g. configs/{"tokenizer_v" if model == "tokenizer" else "hita_b"}.py')
    if model != 'dinov2':
      imp.add_argument('--key', default='ema', help="entry of a training checkpoint (default 'ema')")
    if model == 'tokenizer':
      imp.add_argument('--dinov2', help="Meta's dinov2_vitl14_reg4_pretrain.pth or a Hugging Face dir")
  return p


def _dinov2_model(a) -> DinoV2:
  """The architecture: from a Hugging Face directory's or an export's config.json, else --variant."""
  src = getattr(a, 'checkpoint', None)
  if a.cmd == 'export':
    saved = checkpoint.read_export_config(a.params).get('config') or {}
    if 'dinov2' not in saved:
      raise MissingEntryError(f'{a.params} is not a DINOv2 export (its config.json has no '
                              f"config.dinov2; sections: {sorted(saved)})")
    cfg = DinoV2Config(**saved['dinov2'])
  elif os.path.isdir(src) and os.path.exists(os.path.join(src, 'config.json')):
    cfg, _ = dinov2_convert.load_hf_dinov2_dir(src)
  else:
    cfg = DINOV2_VARIANTS[a.variant]
  return DinoV2(cfg, rngs=nnx.Rngs(0))


_PATH_ARGS = ('checkpoint', 'dinov2', 'params', 'out', 'config')


def main(argv=None):
  a = parser().parse_args(argv)
  # a user error naming one of these paths gets the argument to fix appended
  with cli.blame({f'--{k}': v for k, v in vars(a).items() if k in _PATH_ARGS}):
    _convert(a)


def _section(a, name: str):
  """The config's `name` section, or a UserError naming the config and the argument to fix."""
  config = config_lib.load_config(a.config)
  if name not in config:
    example = 'configs/tokenizer_v.py' if name == 'tokenizer' else 'configs/hita_b.py'
    raise MissingEntryError(f'--config {a.config} has no {name} section (sections: {sorted(config)}); '
                            f'fix --config, e.g. --config {example}')
  return config[name]


def _convert(a):
  if a.model == 'dinov2':
    model = _dinov2_model(a)
    if a.cmd == 'import':
      pretrained.load_dinov2(model, a.checkpoint)
      checkpoint.save_params(a.out, model, config={'dinov2': dataclasses.asdict(model.cfg)},
                             metadata={'source': os.path.abspath(a.checkpoint)}, overwrite=a.overwrite)
      print(f'wrote {a.out}')
      return
    checkpoint.load_params(a.params, model)
    sd = dinov2_convert.export_dinov2(model)
  elif a.model == 'tokenizer':
    cfg = config_lib.tokenizer_config_from(_section(a, 'tokenizer'))
    if a.cmd == 'import':
      if not a.dinov2:
        print('warning: no --dinov2 given; the export holds randomly initialised DINOv2 weights')
      model = pretrained.load_tokenizer(cfg, a.checkpoint, key=a.key, dinov2=a.dinov2)
      pretrained.save_tokenizer(a.out, model, overwrite=a.overwrite, metadata={
          'source': os.path.abspath(a.checkpoint), 'key': a.key,
          'dinov2': a.dinov2 and os.path.abspath(a.dinov2)})
      print(f'wrote {a.out}')
      return
    sd = tokenizer_convert.export_official_tokenizer(pretrained.load_tokenizer(cfg, a.params))
  else:
    cfg = gpt_config_from(_section(a, 'gpt'))
    if a.cmd == 'import':
      model = pretrained.load_gpt(cfg, a.checkpoint, key=a.key)
      # Official checkpoints were evaluated with the released sampler: keep its quirk on.
      pretrained.save_gpt(a.out, model, legacy_pos128_embedding=True, overwrite=a.overwrite,
                          metadata={'source': os.path.abspath(a.checkpoint), 'key': a.key})
      print(f'wrote {a.out} (sample.legacy_pos128_embedding = True)')
      return
    sd = gpt_convert.export_official_gpt(pretrained.load_gpt(cfg, a.params))
  write_state_dict(a.out, sd, overwrite=a.overwrite)
  print(f'wrote {len(sd)} tensors to {a.out}')

if __name__ == '__main__':
  cli.run(main)
