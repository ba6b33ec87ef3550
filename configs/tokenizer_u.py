"""Hita-U tokenizer (official `configs/hita_vqgan_ultra.yaml`: Hita-V + the VFM head), trained as
vq_train.py trains it: with the DINO discriminator (Meta's dino_deitsmall16_pretrain.pth via
--config.init.dino_disc=...; --config.tokenizer_loss.disc_type=patchgan for the PatchGAN).

Usage: --config=configs/tokenizer_u.py        full size
       --config=configs/tokenizer_u.py:tiny   CPU-sized variant
"""
from hita_jax import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, tiny=False, runlocal=False)
  tiny = a.tiny or a.runlocal
  config = config_lib.base_tokenizer_config('U', tiny=tiny)
  config.tokenizer_loss.disc_type = 'dino'  # vq_train.py --disc-type dinogan (Hita-U)
  return config
