"""The zero-shot tasks (style transfer, in-painting, linear probing) on the demo-sized models, randomly
initialised: the code paths and their invariants (the tasks' `run` entries are `slow`). The quality numbers on the trained demo models are
asserted by the slow demo test (tests/test_demo.py) from demo_report.json."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from flax import nnx

from hita_jax import config_lib, sharding
from hita_jax.errors import UserError
from hita_jax.data.sources import labelled_images
from hita_jax.models.gpt import GPT, gpt_config_from
from hita_jax.models.tokenizer import Tokenizer
from hita_jax.tasks import inpaint, linear_probe, style_transfer
from tests.conftest import ROOT


@pytest.fixture(scope='module')
def demo_config():
  return config_lib.load_config(os.path.join(ROOT, 'configs', 'demo.py'))


@pytest.fixture(scope='module')
def tok(demo_config):
  t = Tokenizer(config_lib.tokenizer_config_from(demo_config.tokenizer), rngs=nnx.Rngs(0))
  t.eval()
  return t


@pytest.fixture(scope='module')
def io(tok):
  return style_transfer.CodeIO(tok, batch=8)


@pytest.fixture(scope='module')
def shapes(demo_config):
  return labelled_images(demo_config.data, 32, 12, seed=0)


# -- style transfer ------------------------------------------------------------------------------------

def test_colour_and_edge_measures():
  rng = np.random.default_rng(0)
  img = np.zeros((1, 32, 32, 3), np.uint8)
  img[:, 8:24, 8:24] = 200
  assert style_transfer.edge_correlation(img, img)[0] == pytest.approx(1.0)
  assert style_transfer.edge_correlation(img, np.roll(img, 8, axis=2))[0] < 0.5
  recoloured = img.copy()
  recoloured[..., 0] = 255 - recoloured[..., 0]
  assert style_transfer.edge_correlation(img, recoloured)[0] > 0.5  # layout, not colour
  noise = rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
  assert style_transfer.colour_distance(img, img)[0] == 0.0
  assert style_transfer.colour_distance(img, noise)[0] > 0.3


def test_variants_and_blending(tok):
  assert style_transfer.parse_variants('all,first:3,last:2,blend', 8) == [
      ('all', 8), ('first', 3), ('last', 2), ('blend', 8)]
  with pytest.raises(ValueError, match='m must be in 1..8'):
    style_transfer.parse_variants('first:9', 8)
  with pytest.raises(ValueError, match='unknown style-transfer variant'):
    style_transfer.parse_variants('swap', 8)
  c, r = jnp.arange(8), jnp.arange(8) + 100
  np.testing.assert_array_equal(style_transfer.mix_holistic(c, r, 'first', 3), [100, 101, 102, 3, 4, 5, 6, 7])
  np.testing.assert_array_equal(style_transfer.mix_holistic(c, r, 'last', 2), [0, 1, 2, 3, 4, 5, 106, 107])
  refs = jnp.array([[5, 1, 2, 3, 4, 5, 6, 7], [5, 9, 2, 3, 4, 5, 6, 7], [7, 9, 8, 3, 4, 5, 6, 7]])
  np.testing.assert_array_equal(style_transfer.blend_codes(tok, refs, 'majority'), [5, 9, 2, 3, 4, 5, 6, 7])
  # three equal votes: the first reference's code
  np.testing.assert_array_equal(style_transfer.blend_codes(tok, jnp.array([[4] * 8, [2] * 8, [3] * 8]),
                                                           'majority'), [4] * 8)
  same = jnp.tile(refs[:1], (3, 1))  # identical references blend to themselves
  np.testing.assert_array_equal(style_transfer.blend_codes(tok, same, 'nearest_mean'), refs[0])


def test_transfer_with_the_content_as_reference_is_its_reconstruction(tok, io, shapes):
  imgs = shapes[0][:3]
  out = style_transfer.transfer(tok, imgs, imgs, 'all,first:2,last:2', io=io)
  for name in ('all', 'first:2', 'last:2'):
    res = out['variants'][name]['images']
    assert res.shape == (3, 3, 32, 32, 3)
    for i in range(3):  # the diagonal: the content's own holistic codes
      np.testing.assert_array_equal(res[i, i], out['reconstructions'][i])
  assert out['variants']['all']['measures']['pairs'] == 9


def _task_config(config, task, **sections):
  c = config_lib.load_config(os.path.join(ROOT, 'configs', 'demo.py'))
  with c.unlocked():
    c.task = task
    for dotted, v in sections.items():
      sec, key = dotted.split('.')
      c[sec][key] = v
  return c


@pytest.mark.slow  # the task's own entry: loads, compiles at 48 px, imports TensorFlow (CLU)
def test_style_transfer_task_writes_grid_json_and_tensorboard(tmp_path, shapes):
  from PIL import Image
  files = []
  for i, img in enumerate(shapes[0][:4]):
    files.append(str(tmp_path / f'{i}.png'))
    Image.fromarray(img).resize((48, 48)).save(files[-1])
  os.makedirs(tmp_path / 'refs')
  for i, img in enumerate(shapes[0][4:7]):
    Image.fromarray(img).save(tmp_path / 'refs' / f'{i}.png')
  # 48 px: not the tokenizer's training size (any multiple of the down-sampling works)
  config = _task_config(None, 'style_transfer', **{
      'style_transfer.content': ','.join(files[:2]), 'style_transfer.reference': str(tmp_path / 'refs'),
      'style_transfer.image_size': 48, 'style_transfer.variants': 'all,last:2,blend'})
  report = style_transfer.run(config, str(tmp_path / 'out'))
  assert set(report) == {'all', 'last:2', 'blend'}
  grid = np.asarray(Image.open(tmp_path / 'out' / 'style_transfer_all.png'))
  assert grid.shape == (3 * 48, 5 * 48, 3)  # (1 + 2 contents) x (content, reconstruction, 3 refs)
  assert np.asarray(Image.open(tmp_path / 'out' / 'style_transfer_blend.png')).shape == (3 * 48, 3 * 48, 3)
  saved = json.load(open(tmp_path / 'out' / 'style_transfer.json'))
  assert saved['all']['pairs'] == 6 and saved['blend']['pairs'] == 2
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path / 'out'))
  with pytest.raises(ValueError, match='not a multiple'):
    style_transfer.run(_task_config(None, 'style_transfer', **{
        'style_transfer.content': files[0], 'style_transfer.reference': files[1],
        'style_transfer.image_size': 30}), str(tmp_path / 'bad'))


# -- in-painting -----------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def gpt(demo_config):
  g = GPT(gpt_config_from(demo_config.gpt), rngs=nnx.Rngs(1))
  g.eval()
  return g


SAMPLE = mlc.ConfigDict(dict(cfg_scale=2.0, cfg_interval=-1, temperature=1.0, top_k=0, top_p=1.0))


def test_inpaint_forces_the_kept_rows_and_holistic_codes(gpt, io, shapes):
  imgs, labels = shapes[0][:3], shapes[1][:3]
  grid, s = gpt.cfg.grid, gpt.cfg.num_holistic
  masked = inpaint.mask_images(imgs, 4, grid)
  assert (masked[:, 16:] == inpaint.GREY).all() and (masked[:, :16] == imgs[:, :16]).all()
  med = inpaint.mask_images(imgs, 4, grid, fill='median')  # each image's kept-rows median colour
  want = np.median(imgs[:, :16].reshape(3, -1, 3), axis=1).astype(np.uint8)
  assert (med[:, 16:] == want[:, None, None]).all() and (med[:, :16] == imgs[:, :16]).all()
  with pytest.raises(ValueError, match="fill 'mean'"):
    inpaint.mask_images(imgs, 4, grid, fill='mean')
  with pytest.raises(ValueError, match='keeps 0 of 8'):
    inpaint.kept_rows(0.01, grid)
  key = jax.random.key(0)
  for variant in ('holistic', 'none'):
    res = inpaint.complete(gpt, io, imgs, labels, 0.5, variant, key, sample_cfg=SAMPLE, completions=2, batch=4)
    assert res['images'].shape == (3, 2, 32, 32, 3) and res['rows'] == 4
    codes, pre, mask = res['codes'], res['prefix'], res['mask']
    kept = slice(s, s + 4 * grid)
    np.testing.assert_array_equal(codes[..., kept], pre[..., kept])  # kept rows: the masked image's codes
    assert mask[..., kept].all() and not mask[..., s + 4 * grid:].any()
    assert mask[..., :s].all() == (variant == 'holistic')
    if variant == 'holistic':
      np.testing.assert_array_equal(codes[..., :s], pre[..., :s])
    # the completed rows are sampled: the two completions of an image differ somewhere
    assert (codes[:, 0, s + 4 * grid:] != codes[:, 1, s + 4 * grid:]).any()


def test_inpaint_refine_reencodes_the_kept_pixels_over_the_completion(gpt, io, shapes):
  imgs, labels = shapes[0][:2], shapes[1][:2]
  grid, s = gpt.cfg.grid, gpt.cfg.num_holistic
  key = jax.random.key(3)
  res = inpaint.complete(gpt, io, imgs, labels, 0.5, 'holistic', key, sample_cfg=SAMPLE, refine=1, batch=4)
  # the last round's prefix: the codes of the original's kept pixels pasted over the first completion
  first = inpaint.complete(gpt, io, imgs, labels, 0.5, 'holistic', key, sample_cfg=SAMPLE, batch=4)
  whole = np.array(first['images'][:, 0])
  whole[:, :16] = imgs[:, :16]
  hol, patch = io.encode(whole)
  kept = slice(s, s + 4 * grid)
  np.testing.assert_array_equal(res['prefix'][:, 0, :s], np.asarray(hol))
  np.testing.assert_array_equal(res['prefix'][:, 0, kept], np.asarray(patch)[:, :4 * grid])
  np.testing.assert_array_equal(res['codes'][..., :s + 4 * grid], res['prefix'][..., :s + 4 * grid])
  # only the kept pixels of the original are read: another lower half gives the same completion
  other = np.array(imgs)
  other[:, 16:] = 255 - other[:, 16:]
  res2 = inpaint.complete(gpt, io, other, labels, 0.5, 'holistic', key, sample_cfg=SAMPLE, refine=1, batch=4)
  np.testing.assert_array_equal(res2['codes'], res['codes'])
  with pytest.raises(ValueError, match='refine=-1'):
    inpaint.complete(gpt, io, imgs, labels, 0.5, 'holistic', key, sample_cfg=SAMPLE, refine=-1)


def test_inpaint_protocol_measures_and_grids(tmp_path, monkeypatch, gpt, io, tok, shapes):
  imgs, labels = shapes
  calls = []

  def classify(x):
    calls.append(len(x))
    return np.full(len(x), labels[0])

  def features(x):  # a cheap stand-in for the Inception: colour means (3-d, so 4 images give FID)
    return x.astype(np.float32).mean((1, 2)) + 1.0
  report = inpaint.protocol(tok, gpt, imgs[:4], labels[:4], fractions=[0.25, 0.75],
                            variants=['holistic', 'none'], sample_cfg=SAMPLE, key=jax.random.key(1),
                            classify=classify, features=features, out_dir=str(tmp_path), grid_images=2,
                            batch=4, io=io)
  assert set(report) == {'r0.25_holistic', 'r0.25_none', 'r0.75_holistic', 'r0.75_none'}
  m = report['r0.75_holistic']
  assert m['kept_token_rows'] == 6 and m['class_accuracy'] == np.mean(labels[:4] == labels[0])
  assert m['cfg_scale'] == SAMPLE.cfg_scale
  assert -1.0 <= m['feature_similarity'] <= 1.0 and np.isfinite(m['fid'])
  assert np.isfinite(m['kept_psnr_db']) and np.isfinite(m['kept_psnr_reconstruction_db'])
  # FID on too few images for its features (ADM's evaluator refuses a complex sqrtm): the other
  # measures are kept, the FID is null with the reason
  def refuse(self, other):
    raise ValueError('Imaginary component 0.02')
  monkeypatch.setattr(inpaint.FIDStatistics, 'frechet_distance', refuse)
  res = {'images': imgs[:2, None], 'rows': 4, 'grid': 8, 'masked': imgs[:2]}
  m = inpaint.measure(res, imgs[:2], labels[:2], imgs[:2], classify=classify, features=features)
  assert m['fid'] is None and 'raise inpaint.num_images' in m['fid_error'] and m['class_accuracy'] >= 0
  from PIL import Image
  pic = np.asarray(Image.open(tmp_path / 'inpaint_r0.25_none.png'))
  assert pic.shape == (2 * 32, 3 * 32, 3)  # original | masked | one completion


def test_inpaint_cfg_scale_replaces_the_sample_sections_only_when_set(demo_config):
  config = demo_config.copy_and_resolve_references()
  config.sample.cfg_scale = 3.0
  config.inpaint.cfg_scale = 0.0
  assert inpaint.sample_config(config).cfg_scale == 3.0
  config.inpaint.cfg_scale = 4.5
  sc = inpaint.sample_config(config)
  assert sc.cfg_scale == 4.5 and sc.temperature == config.sample.temperature
  assert config.sample.cfg_scale == 3.0  # the samples keep theirs
  config.inpaint.cfg_scale = -1.0
  with pytest.raises(UserError, match=r'inpaint.cfg_scale=-1.0'):
    inpaint.sample_config(config)


def test_inpaint_class_accuracy_of_decoded_pasted_and_kept_only_images(shapes):
  imgs, labels = shapes[0][:3], shapes[1][:3]
  completed = 255 - imgs  # stand-in completions: every pixel differs from the original
  masked = inpaint.mask_images(imgs, 2, 8)
  seen = []

  def classify(x):  # right only on images whose upper 8 pixel rows are the original's
    seen.append(np.array(x))
    return np.where((x[:, :8] == imgs[:, :8]).all((1, 2, 3)), labels, -1)
  res = {'images': completed[:, None], 'rows': 2, 'grid': 8, 'masked': masked}
  m = inpaint.measure(res, imgs, labels, imgs, classify=classify)
  decoded, pasted, kept_only = seen
  np.testing.assert_array_equal(decoded, completed)
  np.testing.assert_array_equal(pasted[:, :8], imgs[:, :8])  # 2 token rows = 8 pixel rows kept
  np.testing.assert_array_equal(pasted[:, 8:], completed[:, 8:])
  np.testing.assert_array_equal(kept_only, masked)
  assert (m['class_accuracy'], m['class_accuracy_pasted'], m['class_accuracy_kept_only']) == (0.0, 1.0, 1.0)


@pytest.mark.slow  # the task's own entry: fresh models, sampler compilation
def test_inpaint_task_runs_from_its_config(tmp_path):
  config = _task_config(None, 'inpaint', **{
      'inpaint.num_images': 3, 'inpaint.fractions': '0.5', 'inpaint.variants': 'holistic',
      'inpaint.features': '', 'inpaint.batch_size': 4, 'inpaint.cfg_scale': 2.0, 'inpaint.classifier': 'tests.test_zero_shot:constant_classifier'})
  report = inpaint.run(config, str(tmp_path))
  assert 'class_accuracy' in report['r0.5_holistic'] and report['r0.5_holistic']['cfg_scale'] == 2.0
  assert os.path.exists(tmp_path / 'inpaint.json') and os.path.exists(tmp_path / 'inpaint_r0.5_holistic.png')


def constant_classifier(config):
  """A user-supplied classifier factory (`inpaint.classifier='module:factory'`)."""
  return lambda images: np.zeros(len(images), np.int32)


# -- linear probing --------------------------------------------------------------------------------------

def test_feature_extraction_sharded_over_8_devices_matches_one_device(tok, shapes):
  assert jax.device_count() == 8
  imgs = shapes[0][:10]  # not a multiple of the batch: the last one is padded
  eight = linear_probe.extract_features(tok, imgs, batch=8)
  one = linear_probe.extract_features(tok, imgs, batch=8,
                                      mesh=sharding.make_mesh([('data', 1)], devices=jax.devices()[:1]))
  assert set(eight) == set(linear_probe.FEATURE_SETS)
  for k in eight:
    assert eight[k].shape == (10, tok.cfg.dim * (tok.cfg.num_holistic if k == 'holistic_flat' else 1))
    np.testing.assert_allclose(eight[k], one[k], rtol=1e-4, atol=1e-4)


def test_probe_learns_a_linear_rule_and_not_noise(demo_config):
  rng = np.random.default_rng(0)
  y = rng.integers(0, 4, 600).astype(np.int32)
  centres = rng.normal(0, 1, (4, 16)) * 3
  x_good = (centres[y] + rng.normal(0, 1, (600, 16)) + 50).astype(np.float32)  # offset: BN removes it
  x_noise = rng.normal(0, 1, (600, 16)).astype(np.float32)
  pc = mlc.ConfigDict(demo_config.linear_probe.to_dict())
  pc.update(epochs=10, warmup_epochs=2, batch_size=64)
  for opt, base_lr, good in (('sgd', 1.0, 0.9), ('lars', 25.0, 0.45)):  # LARS: lr 6.25 as MAE's 6.4
    pc.update(optimizer=opt, base_lr=base_lr)
    out = linear_probe.probe_all({'good': x_good[:400], 'noise': x_noise[:400]}, y[:400],
                                 {'good': x_good[400:], 'noise': x_noise[400:]}, y[400:], 4, pc,
                                 sets=('good', 'noise'))
    assert out['good']['test_top1'] >= good, out  # LARS from a 0.01-std head is slow in 60 steps
    assert out['noise']['test_top1'] <= 0.35, out
  with pytest.raises(ValueError, match='unknown linear-probe feature set'):
    linear_probe.probe_all({'a': x_good}, y, {'a': x_good}, y, 4, pc, sets=('b',))


@pytest.mark.slow  # the task's own entry: fresh tokenizer, chunked extraction, three probes
def test_linear_probe_task_runs_from_its_config(tmp_path):
  config = _task_config(None, 'linear_probe', **{
      'linear_probe.train_images': 40, 'linear_probe.test_images': 20, 'linear_probe.extract_batch': 8,
      'linear_probe.optimizer': 'sgd', 'linear_probe.batch_size': 20, 'linear_probe.epochs': 2,
      'linear_probe.warmup_epochs': 1})
  report = linear_probe.run(config, str(tmp_path))
  assert set(report) == set(linear_probe.FEATURE_SETS)
  saved = json.load(open(tmp_path / 'linear_probe.json'))
  assert saved['holistic']['steps'] == 4 and 0.0 <= saved['holistic']['test_top1'] <= 1.0
