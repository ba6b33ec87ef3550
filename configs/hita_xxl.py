"""Hita with GPT-XXL: Hita-V tokenizer (Hita-U with `variant=U`) + GPT-XXL, official AR training and
sampling hyper-parameters (train_c2i.py / test_net.py).

Usage: --config=configs/hita_xxl.py            full size
       --config=configs/hita_xxl.py:variant=U  on the Hita-U tokenizer
       --config=configs/hita_xxl.py:tiny       CPU-sized variant
"""
from hita_jax import config_lib


def get_config(arg=None):
  return config_lib.hita_recipe('XXL', arg)
