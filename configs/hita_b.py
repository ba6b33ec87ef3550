"""Hita with GPT-B: Hita-V tokenizer (Hita-U with `variant=U`) + GPT-B, official AR training and
sampling hyper-parameters (train_c2i.py / test_net.py).

Usage: --config=configs/hita_b.py            full size
       --config=configs/hita_b.py:variant=U  on the Hita-U tokenizer
       --config=configs/hita_b.py:tiny       CPU-sized variant
"""
from hita_jax import config_lib


def get_config(arg=None):
  return config_lib.hita_recipe('B', arg)
