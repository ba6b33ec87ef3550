"""Evaluation (`task = evaluate`).

Generation metrics (FID, sFID, IS, precision, recall) of a sample batch against an ADM reference:
  python -m hita_jax.main --config=configs/evaluate.py --workdir=runs/eval \
      --config.evaluate.sample_npz=samples.npz \
      --config.evaluate.ref_npz=VIRTUAL_imagenet256_labeled.npz
Tokenizer metrics (rFID, rIS, PSNR, SSIM, codebook usage) on a folder or .npz of images:
  python -m hita_jax.main --config=configs/evaluate.py:mode=tokenizer --workdir=runs/tok_eval \
      --config.init.tokenizer=weights/hita_v --config.evaluate.images=/data/imagenet/val
Args: `mode=generation|tokenizer`, `variant=V|U` (tokenizer), `tiny`.
"""
from hita_jax import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, mode='generation', variant='V', tiny=False, runlocal=False)
  config = config_lib.base_tokenizer_config(a.variant, tiny=a.tiny or a.runlocal)
  config.task = 'evaluate'
  config.evaluate = config_lib.evaluate_section(a.mode)
  return config
