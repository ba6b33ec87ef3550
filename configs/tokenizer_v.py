"""Hita-V tokenizer (official `configs/hita_vqgan.yaml`, 336 px, 128 holistic + 441 patch tokens).

Usage: --config=configs/tokenizer_v.py        full size
       --config=configs/tokenizer_v.py:tiny   CPU-sized variant (64 px, small widths)
"""
from hita_jax import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, tiny=False, runlocal=False)
  tiny = a.tiny or a.runlocal
  config = config_lib.base_tokenizer_config('V', tiny=tiny)
  return config
