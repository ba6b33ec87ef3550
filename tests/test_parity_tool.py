"""The parity tool passes on the official fixtures and fails when the model is wrong."""
import os
import shutil

import numpy as np

from hita_jax.tools import parity


def test_parity_passes_on_official_fixtures(official_fixtures, capsys):
  rc = parity.main(['--fixtures', official_fixtures])
  out = capsys.readouterr().out
  assert rc == 0, out
  assert out.strip().splitlines()[-1].startswith('PASS')
  for name in ('dinov2_features (end-to-end)', 'e_trans_out', 'patch_indices', 'holistic_indices',
               'fusion_out', 'recon (from saved code ids)', 'recon_eval_uint8',
               'dino_act_block11', 'logits_eval_crop_real (end-to-end)', 'logits_dstep_real (end-to-end)',
               'sn_after_train.heads.4.1.fn.0.weight_v (end-to-end)', 'dstep_d_adversarial_loss'):
    assert f'ok   {name}' in out, name


def test_parity_fails_on_wrong_weights(official_fixtures, tmp_path, capsys):
  from safetensors.numpy import load_file, save_file
  d = tmp_path / 'fx'
  shutil.copytree(official_fixtures, d)
  os.remove(d / 'gpt.json')  # keep the run short: tokenizer part only
  os.remove(d / 'dino_disc.json')
  sd = load_file(str(d / 'tokenizer_v.safetensors'))
  key = 'decode_transformer.transformer.layers.2.ffnet.w3.weight'
  sd[key] = sd[key] * np.float32(1.01)
  save_file(sd, str(d / 'tokenizer_v.safetensors'))
  rc = parity.main(['--fixtures', str(d)])
  out = capsys.readouterr().out
  assert rc == 1
  assert 'FAIL fusion_out' in out and 'ok   e_trans_out' in out
  assert out.strip().splitlines()[-1].startswith('FAIL')


def test_parity_reports_missing_files(tmp_path, capsys):
  (tmp_path / 'README.md').write_text('empty\n')
  rc = parity.main(['--fixtures', str(tmp_path)])
  out = capsys.readouterr().out
  assert rc == 1 and 'skip dinov2' in out and 'skip tokenizer' in out and 'skip dino_disc' in out


def test_parity_missing_directory(capsys):
  assert parity.main(['--fixtures', '/nonexistent/fixtures']) == 2
