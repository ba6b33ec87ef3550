"""Hita with GPT-2B: Hita-V tokenizer (Hita-U with `variant=U`) + GPT-2B, official AR training and
sampling hyper-parameters (train_c2i.py / test_net.py).

Usage: --config=configs/hita_2b.py            full size
       --config=configs/hita_2b.py:variant=U  on the Hita-U tokenizer
       --config=configs/hita_2b.py:tiny       CPU-sized variant
"""
from hita_jax import config_lib


def get_config(arg=None):
  return config_lib.hita_recipe('2B', arg)
