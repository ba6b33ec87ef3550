"""The `fid` task: sampling, decoding, Inception and ADM metrics as one command, stages timed."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hita_jax import config_lib
from tests.conftest import ROOT
from tests.test_sampling_task import ENV, _exports


def test_fid_end_to_end_writes_metrics_and_stage_times(tmp_path):
  tok, gpt = _exports(tmp_path)
  ref = np.random.RandomState(0).randint(0, 256, (12, 32, 32, 3)).astype(np.uint8)
  np.savez(tmp_path / 'ref.npz', arr_0=ref)
  work = tmp_path / 'fid'
  r = subprocess.run(
      [sys.executable, '-m', 'hita_jax.main', f'--config={ROOT}/configs/fid.py:size=B,tiny',
       f'--workdir={work}', f'--config.init.tokenizer={tok}', f'--config.init.gpt={gpt}',
       f'--config.evaluate.ref_npz={tmp_path}/ref.npz', '--config.evaluate.inception_weights=random',
       '--config.evaluate.batch_size=8', '--config.sample.num_images=6',
       '--config.sample.per_device_batch=3', '--config.sample.eval_size=32'],
      cwd=ROOT, env=ENV, capture_output=True, text=True)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  rep = json.load(open(work / 'fid_report.json'))
  assert rep['num_images'] == 6 and rep['metrics']['num_samples'] == 6
  for k in ('fid', 'sfid', 'precision', 'recall'):
    assert np.isfinite(rep['metrics'][k]), k
  st = rep['stages_s']
  for k in ('sample_generate_s', 'sample_decode_s', 'sample_write_s', 'sample_setup_s',
            'evaluate_inception_samples_s', 'evaluate_inception_reference_s', 'evaluate_statistics_s'):
    assert st[k] >= 0, k
  assert st['total_s'] >= st['sample_total_s'] + st['evaluate_inception_samples_s'] - 1e-6
  assert not os.path.exists(work / 'samples' / 'png')  # no 50k PNG encodes by default
  assert 'FID' in r.stdout


def test_fid_task_names_what_is_missing_before_allocating(tmp_path):
  from hita_jax.tasks import fid
  config = config_lib.load_config(f'{ROOT}/configs/fid.py:tiny')
  with pytest.raises(ValueError, match='init.gpt.*init.tokenizer.*evaluate.ref_npz'):
    fid.validate(config)
  config.init.gpt = config.init.tokenizer = config.evaluate.ref_npz = str(tmp_path / 'nope')
  with pytest.raises(FileNotFoundError, match='init.gpt'):
    fid.validate(config)


def test_random_exports_write_loadable_weights_once_and_refuse_bad_args(tmp_path, capsys):
  from hita_jax import pretrained
  from hita_jax.models.gpt import gpt_config_from
  from hita_jax import cli
  from hita_jax.tools import random_exports
  out = random_exports.write(str(tmp_path), 'B', 'V', ref_images=3, ref_size=16, tiny=True)
  with np.load(out['ref_npz']) as z:
    assert z['arr_0'].shape == (3, 16, 16, 3) and z['arr_0'].dtype == np.uint8
  config = config_lib.hita_recipe('B', 'variant=V,tiny')
  gpt = pretrained.load_gpt(gpt_config_from(config.gpt), out['gpt'])
  assert float(np.abs(np.asarray(gpt.head[...])).max()) > 0  # not the official zero head
  assert not pretrained.wants_legacy_sampler(out['gpt'])
  pretrained.load_tokenizer(config_lib.tokenizer_config_from(config.tokenizer), out['tokenizer'])
  stamp = os.path.getmtime(os.path.join(out['gpt'], 'params'))
  random_exports.write(str(tmp_path), 'B', 'V', ref_images=3, ref_size=16, tiny=True)  # kept
  assert os.path.getmtime(os.path.join(out['gpt'], 'params')) == stamp
  with pytest.raises(SystemExit) as e:
    cli.run(random_exports.main, ['--out', str(tmp_path), '--ref-images', '1'])
  assert e.value.code == 2 and '--ref-images' in capsys.readouterr().err
