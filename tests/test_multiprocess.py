"""Several JAX processes on one machine (#13): 2 processes x 4 CPU devices (loopback coordinator,
gloo collectives) against 1 process x 8 devices, through `python -m hita_jax.main --distributed`:
the same training losses (train_tokenizer, train_ar: 3 steps, to 1e-5), the same extracted codes,
samples and evaluation results. The 1 x 8 reference runs in this (8-device) test process."""
import importlib
import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from hita_jax import config_lib, pretrained
from hita_jax.checkpoint import save_params
from hita_jax.data import codes
from hita_jax.models.gpt import gpt_config_from
from hita_jax.models.tokenizer import Tokenizer
from hita_jax.pretrained import TOKENIZER_EXPORT_FILTER
from hita_jax.sharding import create_jitted
from tests.conftest import ROOT
from tests.multiprocess import run_main

AR = f'{ROOT}/configs/hita_b.py:tiny'
TOK = f'{ROOT}/configs/tokenizer_v.py:tiny'
MESH = 'data=2,fsdp=4,tensor=1'  # FSDP across the two processes' devices


def _run(spec, overrides: dict, workdir: str, processes: int):
  """One task, as 1 process (here, 8 devices) or as `processes` x 4 devices (subprocesses, whose
  outputs are returned)."""
  if processes == 1:
    config = config_lib.load_config(spec)
    config.update_from_flattened_dict(overrides)
    os.makedirs(workdir, exist_ok=True)
    importlib.import_module(f'hita_jax.tasks.{config.task}').run(config, workdir)
    return []
  return run_main([f'--config={spec}', f'--workdir={workdir}',
                   *(f'--config.{k}={v}' for k, v in overrides.items())], processes=processes, devices=4)


def _losses(workdir, keys):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return np.array([[r[k] for k in keys] for r in rows])


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Every task once per layout (1 x 8 and 2 x 4), sharing one tokenizer export and one code
  extraction: {processes: {task: workdir}}."""
  root = tmp_path_factory.mktemp('multiprocess')
  config = config_lib.load_config(AR)
  tok = create_jitted(lambda: Tokenizer(config_lib.tokenizer_config_from(config.tokenizer), rngs=nnx.Rngs(0)))
  tok_export = save_params(str(root / 'tok'), tok, filt=TOKENIZER_EXPORT_FILTER, config={})
  out = {}
  for n in (1, 2):
    w = {t: str(root / f'{t}{n}') for t in ('extract', 'ar', 'sample', 'evaluate', 'tokenizer')}
    _run(AR, {'task': 'extract_codes', 'init.tokenizer': tok_export, 'extract_codes.views': 'flip',
              'extract_codes.max_examples': 16 // n, 'extract_codes.examples_per_shard': 8}, w['extract'], n)
    # both layouts train on the codes of the 1-process extraction (identical records, other files)
    _run(AR, {'init.tokenizer': tok_export, 'train_ar.codes_dir': str(root / 'extract1' / 'codes'),
              'train_ar.num_steps': 3, 'train_ar.log_every': 1, 'train_ar.sample_every': 3,
              'train_ar.grid_classes': 2, 'train_ar.grid_per_class': 4, 'mesh': MESH}, w['ar'], n)
    _run(AR, {'task': 'sample', 'init.tokenizer': tok_export, 'init.gpt': str(root / 'ar1' / 'export' / 'ema'),
              'sample.num_images': 12, 'sample.per_device_batch': 1, 'sample.eval_size': 0,
              'mesh': MESH}, w['sample'], n)
    _run(f'{ROOT}/configs/evaluate.py', {
        'evaluate.sample_npz': str(root / 'sample1' / 'samples.npz'),
        'evaluate.ref_npz': str(root / 'sample1' / 'samples.npz'), 'evaluate.inception_weights': 'random',
        'evaluate.batch_size': 8}, w['evaluate'], n)
    _run(TOK, {'train_tokenizer.global_batch_size': 8, 'tokenizer_loss.lpips_weights': 'random',
               'train_tokenizer.warmup_steps': 1, 'tokenizer_loss.disc_start': 1,
               'train_tokenizer.num_steps': 3, 'train_tokenizer.log_every': 1,
               'train_tokenizer.image_every': 3, 'mesh': MESH}, w['tokenizer'], n)
    out[n] = w
  return out


def _assert_same_run(one, two):
  """Losses (all columns but the last) to 1e-5 as the issue asks; the first step's gradient norm
  to 1e-5, later steps' to 1e-3.

  The norm sums squares over every parameter after the cross-process all-reduce, which adds in
  another order than one process does. At step 1 the parameters are identical, so only that order
  differs (seen: 4e-7). After Adam steps, which rescale near-zero gradients (e.g. the conv biases
  that GroupNorm nearly cancels) to full-size updates, the reordering alone moved the tokenizer's
  step-3 norm by 1.5e-4 relative in CI while its losses agreed to 1e-7. A wrong data slice or a
  missing shard moves every column by percents.
  """
  np.testing.assert_allclose(two[:, :-1], one[:, :-1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(two[0, -1], one[0, -1], rtol=1e-5)
  np.testing.assert_allclose(two[1:, -1], one[1:, -1], rtol=1e-3)


@pytest.mark.slow
def test_train_ar_losses_match(runs):
  keys = ('loss', 'loss_holistic', 'loss_patch', 'grad_norm')
  one, two = _losses(runs[1]['ar'], keys), _losses(runs[2]['ar'], keys)
  assert one.shape == (3, 4)
  _assert_same_run(one, two)
  assert os.listdir(os.path.join(runs[2]['ar'], 'export', 'ema'))  # written by both processes
  assert any(f.startswith('samples_') for f in os.listdir(runs[2]['ar']))  # grid gathered, saved once


@pytest.mark.slow
def test_train_tokenizer_losses_match(runs):
  keys = ('g_loss', 'rec_loss', 'd_loss', 'vq_loss', 'g_grad_norm')
  one, two = _losses(runs[1]['tokenizer'], keys), _losses(runs[2]['tokenizer'], keys)
  assert one.shape == (3, 5)
  _assert_same_run(one, two)
  grids = lambda w: sorted(f for f in os.listdir(w) if f.startswith('reconstructions_'))
  assert grids(runs[2]['tokenizer']) == grids(runs[1]['tokenizer']) == ['reconstructions_0000003.png']


@pytest.mark.slow
def test_extract_codes_same_records(runs):
  def records(w):
    src = codes.CodesSource(os.path.join(w, 'codes'))
    return sorted((int(r['label']), r['holistic_codes'].tobytes(), r['patch_codes'].tobytes())
                  for r in (src[i] for i in range(len(src))))
  one, two = records(runs[1]['extract']), records(runs[2]['extract'])
  assert len(one) == 16 and one == two
  shards = sorted(f for f in os.listdir(os.path.join(runs[2]['extract'], 'codes')) if f.endswith('record'))
  assert shards == ['codes-00000-00000.array_record', 'codes-00001-00000.array_record']


@pytest.mark.slow
def test_sample_and_evaluate_same_files(runs):
  with np.load(os.path.join(runs[1]['sample'], 'samples.npz')) as a, \
       np.load(os.path.join(runs[2]['sample'], 'samples.npz')) as b:
    assert a['arr_0'].shape == (12, 64, 64, 3)
    np.testing.assert_array_equal(a['arr_1'], b['arr_1'])
    # the same codes; decoding's all-reduces (gloo across processes) may round a pixel the other
    # way at the uint8 cast
    diff = np.abs(a['arr_0'].astype(int) - b['arr_0'])
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())
  assert (sorted(os.listdir(os.path.join(runs[1]['sample'], 'samples', 'png')))
          == sorted(os.listdir(os.path.join(runs[2]['sample'], 'samples', 'png'))))
  r1, r2 = (json.load(open(os.path.join(runs[n]['evaluate'], 'eval_results.json'))) for n in (1, 2))
  assert r1.keys() == r2.keys()
  for k, v in r1.items():
    if isinstance(v, float):
      np.testing.assert_allclose(r2[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_main_rejects_partial_distributed_flags(tmp_path):
  import subprocess
  import sys
  r = subprocess.run([sys.executable, '-m', 'hita_jax.main', f'--config={AR}', f'--workdir={tmp_path}',
                      '--distributed', '--num_processes=2'], cwd=ROOT, capture_output=True, text=True)
  assert r.returncode != 0
  assert '--coordinator_address, --process_id missing' in r.stderr



@pytest.mark.slow
def test_fsdp8_checkpoint_resumes_on_2_processes(tmp_path):
  """train_ar saved at step 2 on 1 process x 8 devices (FSDP) continues on 2 processes x 4 as it
  does on 1 x 8: the same step-3 loss, gradient and parameter norms, and the same EMA export."""
  over = {'train_ar.codes_dir': 'synthetic', 'train_ar.log_every': 1, 'mesh': 'data=1,fsdp=8,tensor=1'}
  saved = str(tmp_path / 'saved')
  _run(AR, {**over, 'train_ar.num_steps': 2}, saved, 1)
  for n in (1, 2):
    shutil.copytree(saved, str(tmp_path / f'resumed{n}'))
    outs = _run(AR, {**over, 'train_ar.num_steps': 3}, str(tmp_path / f'resumed{n}'), n)
  assert len(outs) == 2 and all('resumed from step 2' in out for out in outs)  # the 2-process run
  keys = ('loss', 'grad_norm', 'param_norm')
  one, two = (_losses(str(tmp_path / f'resumed{n}'), keys) for n in (1, 2))
  assert one.shape == two.shape == (3, 3)  # steps 1, 2 before the save, 3 after the resume
  np.testing.assert_allclose(two[-1], one[-1], rtol=1e-5)
  gcfg = gpt_config_from(config_lib.load_config(AR).gpt)
  ema = [nnx.to_pure_dict(nnx.state(pretrained.load_gpt(gcfg, str(tmp_path / f'resumed{n}' / 'export' / 'ema')),
                                    nnx.Param)) for n in (1, 2)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7),
               ema[0], ema[1])
