"""Configs load, sizes match the official parameter counts (no allocation), bad args are explained."""
import glob
import os
import subprocess
import sys

import pytest

from hita_jax import config_lib
from hita_jax.tools import summary
from tests.conftest import ROOT

CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py')))


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
@pytest.mark.parametrize('arg', [None, 'tiny'])
def test_every_config_loads(path, arg):
  config = config_lib.load_config(path + (f':{arg}' if arg else ''))
  assert config.task


def test_bad_config_argument_is_named():
  with pytest.raises(ValueError, match="unknown config argument 'tinyy'"):
    config_lib.load_config(os.path.join(ROOT, 'configs', 'tokenizer_v.py') + ':tinyy')


def test_unknown_tokenizer_key_is_named():
  c = config_lib.tokenizer_model_config('V')
  d = c.to_dict()
  d['num_holistc'] = 3
  with pytest.raises(ValueError, match='num_holistc'):
    config_lib.tokenizer_config_from(d)


@pytest.mark.parametrize('name,expected', [
    ('tokenizer_v.py', {'tokenizer.trainable_params': 104_240_839, 'dinov2.params': 304_372_736}),
    ('tokenizer_u.py', {'tokenizer.trainable_params': 104_767_687, 'dinov2.params': 304_372_736}),
])
def test_official_parameter_counts(name, expected, capsys):
  got = summary.summarize(config_lib.load_config(os.path.join(ROOT, 'configs', name)))
  for k, v in expected.items():
    assert got[k] == v
  assert f'tokenizer.trainable_params: {expected["tokenizer.trainable_params"]}' in capsys.readouterr().out


def test_summary_cli():
  out = subprocess.run([sys.executable, '-m', 'hita_jax.tools.summary',
                        f'--config={ROOT}/configs/tokenizer_u.py:tiny'], capture_output=True,
                       text=True, cwd=ROOT, check=True).stdout
  assert 'tokenizer.trainable_params:' in out and 'dinov2.params:' in out
  assert 'holistic_encoder.e_trans' in out
