"""FID-50k end to end (`task = fid`): sample with CFG, decode to 256 px, Inception features, then
FID / sFID / IS / precision / recall against an ADM reference batch, with each stage timed.

  python -m hita_jax.main --config=configs/fid.py:size=B --workdir=runs/fid_b \
      --config.init.gpt=weights/GPT-B.pt --config.init.tokenizer=weights/hita_v.pt \
      --config.evaluate.ref_npz=VIRTUAL_imagenet256_labeled.npz
Args: `size=B|L|XL|XXL|2B`, `variant=V|U`, `tiny`. Sampling settings are the recipe's
(`config.sample`: 50,000 images, CFG from test_net.py); results in <workdir>/fid_report.json.
"""
from hita_jax import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, size='B', variant='V', tiny=False, runlocal=False)
  tiny = a.tiny or a.runlocal
  config = config_lib.hita_recipe(a.size, ','.join(['variant=' + a.variant] + (['tiny'] if tiny else [])))
  config.task = 'fid'
  config.sample.save_png = False  # 50k PNG encodes would cost more than the sampling itself
  config.evaluate = config_lib.evaluate_section('generation')
  return config
