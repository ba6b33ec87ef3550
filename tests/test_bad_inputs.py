"""Bad inputs and user errors: images of every PIL mode converted, unreadable files skipped and
counted, small images upscaled, and each user error one line naming the thing and the fix (exit
status 2, no traceback); tasks check config, paths and inputs before allocating a model."""
import io
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from hita_jax import checkpoint, config_lib, errors
from hita_jax.data import codes, images, sources
from hita_jax.models.gpt import GPT, gpt_config_from
from tests.conftest import ROOT

ENV = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
ENV.update(JAX_PLATFORMS='cpu')


def _png(img, fmt='PNG'):
  b = io.BytesIO()
  img.save(b, fmt)
  return b.getvalue()


def _modes():
  rng = np.random.default_rng(0)
  rgb = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
  return {
      'L': _png(rgb.convert('L')),
      'CMYK': _png(rgb.convert('CMYK'), 'JPEG'),
      'RGBA': _png(rgb.convert('RGBA')),
      'P': _png(rgb.convert('P')),
      'I;16': _png(Image.fromarray((rng.integers(0, 65536, (20, 24))).astype(np.uint16))),
      'LA': _png(rgb.convert('LA')),
  }


@pytest.mark.parametrize('mode', sorted(_modes()))
def test_every_image_mode_becomes_rgb_uint8(mode):
  pil = images.read_rgb(io.BytesIO(_modes()[mode]))
  assert pil.mode == 'RGB'
  arr = images.center_crop_arr(pil, 16)
  assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8
  if mode == 'I;16':  # scaled to 8 bits, not clipped to 0/255 as PIL's convert would
    assert len(np.unique(np.asarray(pil))) > 100


def test_images_smaller_than_the_crop_are_upscaled():
  small = Image.fromarray(np.random.default_rng(1).integers(0, 256, (10, 12, 3), dtype=np.uint8))
  assert images.center_crop_arr(small, 32).shape == (32, 32, 3)
  assert images.random_crop_arr(small, 32, np.random.default_rng(0)).shape == (32, 32, 3)


def test_truncated_and_non_image_files_are_skipped_and_counted(tmp_path):
  d = tmp_path / 'data' / 'cls'
  d.mkdir(parents=True)
  good = _png(Image.fromarray(np.zeros((8, 8, 3), np.uint8)))
  (d / 'a_truncated.png').write_bytes(good[:len(good) // 2])
  (d / 'b_text.png').write_bytes(b'this is not an image')
  (d / 'c_good.png').write_bytes(good)
  src = sources.make_source(_folder_cfg(tmp_path / 'data'))
  pil, label, skipped = sources.open_readable(src, 0)
  assert skipped == 2 and pil.size == (8, 8) and label == 0


def _folder_cfg(root):
  cfg = config_lib.base_tokenizer_config('V', tiny=True).data
  cfg.source, cfg.path = 'folder', str(root)
  return cfg


def test_tokenizer_input_of_wrong_shape_or_dtype():
  from tests.utils import tiny_tokenizer
  tok = nnx.eval_shape(tiny_tokenizer)  # abstract weights: the check runs before any compute
  with pytest.raises(errors.UserError, match=r'\(B, H, W, 3\).*got shape \(64, 64, 3\)'):
    tok.encode(jnp.zeros((64, 64, 3)))
  with pytest.raises(errors.UserError, match=r'floating point.*uint8.*to_unit'):
    tok.encode(jnp.zeros((1, 64, 64, 3), jnp.uint8))
  with pytest.raises(errors.UserError, match=r'not a multiple'):
    tok.encode(jnp.zeros((1, 60, 60, 3)))


def test_codes_and_labels_out_of_range():
  ok = {'label': np.array([0, 9]), 'holistic_codes': np.zeros((2, 4), np.int32),
        'patch_codes': np.full((2, 16), 255)}
  codes.check_code_batch(ok, num_classes=10, vocab_size=256)
  with pytest.raises(errors.UserError, match=r'label out of range: found 10.*0\.\.9.*num_classes'):
    codes.check_code_batch({**ok, 'label': np.array([0, 10])}, 10, 256)
  with pytest.raises(errors.UserError, match=r'patch_codes out of range: found 256.*0\.\.255'):
    codes.check_code_batch({**ok, 'patch_codes': np.full((2, 16), 256)}, 10, 256)
  with pytest.raises(errors.UserError, match=r'holistic_codes out of range: found -1'):
    codes.check_code_batch({**ok, 'holistic_codes': np.full((2, 4), -1)}, 10, 256)


def _tiny_gpt(num_classes):
  config = config_lib.load_config(f'{ROOT}/configs/hita_b.py:tiny')
  config.gpt.num_classes, config.gpt.n_layer = num_classes, 1
  return GPT(gpt_config_from(config.gpt), rngs=nnx.Rngs(0))


def test_checkpoint_shapes_not_matching_the_config_name_the_param_and_both_shapes(tmp_path):
  checkpoint.save_params(str(tmp_path / 'gpt'), _tiny_gpt(10), config={})
  with pytest.raises(errors.UserError, match=r"parameter \['class_embedding'\] has shape \(11, 64\) in the "
                                             r'checkpoint but \(13, 64\) in the model config.*num_classes'):
    checkpoint.load_params(str(tmp_path / 'gpt'), _tiny_gpt(12))


def _main(*args):
  return subprocess.run([sys.executable, '-m', 'hita_jax.main', *args], cwd=ROOT, env=ENV,
                        capture_output=True, text=True)


def _one_line_error(r):
  assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
  lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert 'Traceback' not in r.stderr and len(lines) == 1 and lines[0].startswith('error: '), r.stderr
  return lines[0]


def test_config_key_typo_names_the_key_and_the_closest_ones(tmp_path):
  line = _one_line_error(_main(f'--config={ROOT}/configs/hita_b.py:tiny', f'--workdir={tmp_path}',
                               '--config.train_ar.nmu_steps=3'))
  assert "no key 'train_ar.nmu_steps'" in line and 'train_ar.num_steps' in line


def test_missing_weights_path_names_the_key(tmp_path):
  line = _one_line_error(_main(f'--config={ROOT}/configs/hita_b.py:tiny', f'--workdir={tmp_path}',
                               f'--config.init.tokenizer={tmp_path}/nope.pt'))
  assert 'tokenizer weights not found' in line and '--config.init.tokenizer=' in line


@pytest.mark.slow  # a third JAX start-up; the two above cover the one-line path
def test_verbosity_keeps_the_traceback(tmp_path):
  r = _main(f'--config={ROOT}/configs/hita_b.py:tiny', f'--workdir={tmp_path}', '--verbosity=0',
            f'--config.init.tokenizer={tmp_path}/nope.pt')
  assert r.returncode != 0 and 'Traceback' in r.stderr and 'MissingPathError' in r.stderr


# -- validation before allocation -------------------------------------------------------------------

@pytest.fixture
def no_models(monkeypatch):
  """Model constructors that fail the test if a task reaches them."""
  from hita_jax.models import tokenizer

  def refuse(self, *a, **k):
    raise AssertionError(f'{type(self).__name__} allocated before the config was checked')
  monkeypatch.setattr(GPT, '__init__', refuse)
  monkeypatch.setattr(tokenizer.Tokenizer, '__init__', refuse)


def test_hita_l_says_init_tokenizer_is_missing_before_allocating_gpt_l(tmp_path, no_models):
  from hita_jax.tasks import train_ar
  config = config_lib.load_config(f'{ROOT}/configs/hita_l.py')
  with pytest.raises(errors.UserError, match=r'needs --config.init.tokenizer='):
    train_ar.run(config, str(tmp_path))


@pytest.mark.parametrize('task,key', [('train_tokenizer', 'init.dinov2'), ('train_ar', 'init.gpt'),
                                      ('extract_codes', 'init.tokenizer'), ('sample', 'init.gpt')])
def test_every_task_checks_weight_paths_before_allocating(tmp_path, no_models, task, key):
  import importlib
  config = config_lib.load_config(f'{ROOT}/configs/hita_b.py:tiny')
  config.init.tokenizer = config.init.gpt = str(tmp_path)  # exist
  config.train_ar.codes_dir = 'synthetic'
  section, name = key.split('.')
  config[section][name] = str(tmp_path / 'missing')
  with pytest.raises(errors.MissingPathError, match=rf'not found: .*missing \(fix --config.{key}='):
    importlib.import_module(f'hita_jax.tasks.{task}').run(config, str(tmp_path / 'w'))
