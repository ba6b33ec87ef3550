"""Hita-U's DINO discriminator: per-replica batch statistics on 8 devices, the crop-or-resize draws,
the converter tables (heads round trip, Adam parameter order as torch's optimizer sees it), the
missing-weights error, and tokenizer_u.py:tiny training with it, resumed with its state."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from hita_jax import checkpoint, config_lib, pretrained, sharding
from hita_jax.convert import dino_disc as convert
from hita_jax.convert.dinov2 import DINOV2_RULES
from hita_jax.convert.mapping import export_params
from hita_jax.data.sources import make_image_dataset
from hita_jax.models.dino_discriminator import (DinoDiscConfig, DinoDiscriminator, dino_input,
                                                replay_augmentation, sample_augmentation)
from hita_jax.tasks import train_tokenizer as trainer
from tests.conftest import ROOT

TINY = DinoDiscConfig(embed_dim=16, depth=2, num_heads=2, patch_size=8, img_size=16, key_depths=(0, 1, 5),
                      kernel_size=3, virtual_batch_size=2)


def _disc(cfg, seed=3):
  d = DinoDiscriminator(cfg, rngs=nnx.Rngs(seed))
  d.train()
  return d


def _images(n, seed=0, size=24):
  x = np.random.RandomState(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)
  return x * np.linspace(0.2, 1.0, n)[:, None, None, None]  # shards with different statistics


def test_replica_statistics_equal_each_shard_run_alone_on_8_devices():
  cfg8 = dataclasses.replace(TINY, batch_norm_groups=8)
  x = _images(32)  # 4 images per replica: 2 virtual batches of 2 each
  aug = replay_augmentation(True, 3, 5)
  mesh = sharding.make_mesh('data=8')
  graphdef, state = nnx.split(_disc(cfg8))
  fn = jax.jit(lambda s, v: (lambda m: (m(v, aug), nnx.state(m, nnx.BatchStat)))(nnx.merge(graphdef, s)))
  got, stats = fn(state, jax.device_put(x, NamedSharding(mesh, P('data'))))
  alone = [_disc(TINY) for _ in range(8)]
  want = jnp.concatenate([d(jnp.asarray(x[4 * i:4 * i + 4]), aug) for i, d in enumerate(alone)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # the power iteration depends on the weights only: every replica stores the same u, v
  np.testing.assert_allclose(stats['heads'][1]['conv_res']['u'][...], alone[0].heads[1].conv_res.u[...],
                             rtol=1e-6, atol=1e-7)
  whole = _disc(dataclasses.replace(TINY, virtual_batch_size=32))(jnp.asarray(x), aug)
  assert not np.allclose(whole, got, atol=1e-3)  # global statistics differ
  with pytest.raises(ValueError, match='does not split into 8 batch-norm replicas'):
    _disc(cfg8)(jnp.asarray(x[:12]), aug)


def test_virtual_batches_and_train_mode_state():
  d = _disc(TINY)
  x = jnp.asarray(_images(4))
  aug = replay_augmentation(False)
  u0 = np.asarray(d.heads[0].conv_in.u[...])
  both = d(x, aug)
  assert both.shape == (4, 3 * 4)  # key depth 5 >= depth is dropped, as official; 2x2 tokens
  assert not np.allclose(u0, d.heads[0].conv_in.u[...])  # one power iteration per train call
  d.eval()
  u1 = np.asarray(d.heads[0].conv_in.u[...])
  ev = d(x, aug)
  np.testing.assert_array_equal(u1, d.heads[0].conv_in.u[...])  # eval: vectors as stored
  # virtual batch 2: the first two images' logits do not depend on the last two
  np.testing.assert_allclose(d(x[:2], aug), ev[:2], rtol=1e-5, atol=1e-5)
  assert not np.allclose(d(x[:3:2], aug), ev[:3:2], atol=1e-3)


def test_draws_crop_or_resize():
  x = jnp.asarray(_images(2, size=24))
  keys = jax.random.split(jax.random.key(0), 64)
  draws = [sample_augmentation(k, 24, 24, 16) for k in keys]
  crops = [bool(a['crop']) for a in draws]
  assert 16 < sum(crops) < 48
  tops = {int(a['top']) for a in draws}
  assert tops <= set(range(9)) and len(tops) > 4
  a = next(a for a in draws if a['crop'])
  got = dino_input(x, a, 16)
  t, l = int(a['top']), int(a['left'])
  scale = 0.5 / np.array([0.229, 0.224, 0.225], np.float32)
  shift = (0.5 - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
  np.testing.assert_allclose(got, (np.asarray(x) * scale + shift)[:, t:t + 16, l:l + 16], rtol=1e-6, atol=1e-6)
  small = dino_input(x[:, :16, :16], replay_augmentation(True, 3, 3), 16)  # not larger: no crop
  np.testing.assert_allclose(small, np.asarray(x[:, :16, :16]) * scale + shift, rtol=1e-5, atol=1e-5)


def test_area_resize_is_torch_area(torch):
  from hita_jax.models.resize import torch_area_resize
  x = np.random.RandomState(0).randn(2, 3, 21, 17).astype(np.float32)
  want = torch.nn.functional.interpolate(torch.from_numpy(x), size=(8, 11), mode='area').numpy()
  got = np.asarray(torch_area_resize(jnp.asarray(x.transpose(0, 2, 3, 1)), (8, 11))).transpose(0, 3, 1, 2)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _torch_heads(torch, c, ks, n):
  """The official heads' module structure (DinoDisc.heads), to read parameter and state-dict order."""
  nn = torch.nn

  class BatchNormLocal(nn.Module):
    def __init__(self):
      super().__init__()
      self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))

  class Residual(nn.Module):
    def __init__(self, fn):
      super().__init__()
      self.fn = fn

  sn = torch.nn.utils.spectral_norm
  block = lambda k: nn.Sequential(sn(nn.Conv1d(c, c, k, padding=k // 2, padding_mode='circular')),
                                  BatchNormLocal(), nn.LeakyReLU(0.2))
  return nn.ModuleList([nn.Sequential(block(1), Residual(block(ks)), sn(nn.Conv1d(c, 1, 1)))
                        for _ in range(n)])


def test_heads_converter_and_adam_order_follow_torch(torch):
  heads = _torch_heads(torch, TINY.embed_dim, TINY.kernel_size, 3)
  wrapper = torch.nn.Module()
  wrapper.heads = heads
  sd = {k: v.detach().numpy().copy() for k, v in wrapper.state_dict().items()}
  model = _disc(TINY)
  convert.load_dino_disc_heads(model, sd)
  np.testing.assert_array_equal(model.heads[2].conv_res.weight[...], sd['heads.2.1.fn.0.weight_orig'])
  np.testing.assert_array_equal(model.heads[1].conv_out.v[...], sd['heads.1.2.weight_v'])
  back = convert.export_dino_disc_heads(model)
  assert sorted(back) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
  # one Adam step in torch: each moment lands on the parameter it belongs to
  opt = torch.optim.Adam(wrapper.parameters(), lr=1e-3)
  for i, p in enumerate(wrapper.parameters()):
    p.grad = torch.full_like(p, float(i + 1))
  opt.step()
  count, mu, _ = convert.official_heads_adam_moments(sd, opt.state_dict())
  assert count == 1
  names = {id(p): n for n, p in wrapper.named_parameters()}
  for i, p in enumerate(wrapper.parameters()):
    np.testing.assert_allclose(mu[names[id(p)]], 0.1 * (i + 1), rtol=1e-6)
  # as a vq_train.py checkpoint resumes it: moments on our heads' parameters
  ckpt = {'model': {}, 'discriminator': sd, 'optimizer_disc': opt.state_dict()}
  count, mu_ours, nu_ours = pretrained.dino_disc_adam_state(ckpt, lambda: _disc(TINY))
  assert count == 1 and 'dino' not in mu_ours
  np.testing.assert_allclose(mu_ours['heads'][1]['norm_res']['bias'][...],
                             mu['heads.1.1.fn.1.bias'], rtol=1e-6)
  np.testing.assert_allclose(nu_ours['heads'][2]['conv_res']['weight'][...],
                             opt.state[heads[2][1].fn[0].weight_orig]['exp_avg_sq'].numpy(), rtol=1e-6)


def test_dino_weights_required_unless_allowed(tmp_path):
  with pytest.raises(ValueError, match='dino_deitsmall16_pretrain.pth'):
    pretrained.load_dino_discriminator(TINY, None)
  with pytest.raises(FileNotFoundError, match='not found'):
    pretrained.load_dino_discriminator(TINY, str(tmp_path / 'missing.pth'))
  d = pretrained.load_dino_discriminator(TINY, None, allow_random=True)
  sd = {k: np.asarray(v) for k, v in export_params(d.dino, DINOV2_RULES).items()}
  sd['blocks.0.attn.qkv.bias'] = np.ones_like(sd['blocks.0.attn.qkv.bias'])
  sd['cls_token'] = sd['cls_token'][None, None]
  loaded = pretrained.load_dino_discriminator(TINY, sd)
  c = TINY.embed_dim
  np.testing.assert_array_equal(loaded.dino.blocks[0].qkv.bias[...],
                                np.r_[np.ones(c), np.zeros(c), np.ones(c)])  # k part zeroed


@pytest.mark.slow  # ~2.5 min of CPU on 2 cores (a Hita-U tiny step compiles with the DINO in it)
def test_tokenizer_u_tiny_trains_with_the_dino_discriminator_and_resumes(tmp_path, quick_compile):
  config = config_lib.load_config(f'{ROOT}/configs/tokenizer_u.py:tiny')
  assert config.tokenizer_loss.disc_type == 'dino'
  config.tokenizer_loss.lpips_weights = 'random'
  config.tokenizer_loss.disc_start = 0
  config.train_tokenizer.global_batch_size = 4
  config.train_tokenizer.warmup_steps = 1
  mesh = sharding.make_mesh([('data', 1)], jax.devices()[:1])

  parts, state, frozen, _ = trainer.build(config, mesh)
  data = lambda: make_image_dataset(config.data, image_size=parts.cfg.image_size, global_batch=4, seed=0)[0]
  it = data()
  fresh = jax.tree.map(jnp.copy, state)  # what a restarted run builds (same config, same seed)
  assert jax.tree.leaves(frozen['disc']) and not any('dino' in str(p) for p, _ in nnx.to_flat_state(state['d_params']))
  step = jax.jit(lambda s, f, b: trainer.train_step(parts, config, s, f, b, jax.random.key(0)))
  batch = lambda: {'image': jnp.asarray(next(it)['image'])}
  u0 = np.asarray(state['d_stats']['heads'][0]['conv_res']['u'][...])
  heads0 = jax.tree.map(np.asarray, state['d_params'])
  for _ in range(2):
    state, m = step(state, frozen, batch())
    for k in ('g_loss', 'd_loss', 'g_adv_loss', 'rec_loss', 'vfm_loss'):
      assert np.isfinite(float(m[k])), k
  assert float(m['d_grad_norm']) > 0 and float(m['adv_weight']) == 0.5
  assert not np.allclose(u0, state['d_stats']['heads'][0]['conv_res']['u'][...])
  assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(heads0), jax.tree.leaves(state['d_params'])))
  mngr = checkpoint.checkpoint_manager(str(tmp_path / 'ckpt'), every=1, keep=1)
  checkpoint.save_train_state(mngr, 2, state, it)
  mngr.wait_until_finished()
  ref_state, ref = step(state, frozen, batch())

  it2 = data()
  mngr2 = checkpoint.checkpoint_manager(str(tmp_path / 'ckpt'), every=1, keep=1)
  fresh, at = checkpoint.resume(mngr2, fresh, it2)
  assert at == 2
  for a, b in zip(jax.tree.leaves(state['d_stats']), jax.tree.leaves(fresh['d_stats'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # spectral-norm u, v restored
  it = it2
  got_state, got = step(fresh, frozen, batch())
  for k in ('g_loss', 'd_loss', 'logits_real', 'logits_fake'):
    assert float(got[k]) == pytest.approx(float(ref[k]), rel=1e-6, abs=1e-7), k
  np.testing.assert_allclose(got_state['d_stats']['heads'][2]['conv_in']['v'][...],
                             ref_state['d_stats']['heads'][2]['conv_in']['v'][...], rtol=1e-6, atol=1e-7)
  # Learning, not just finite: on one fixed batch the reconstruction and the discriminator's own
  # loss fall over a few steps (the discriminator separates that batch's real and fake images).
  fixed = batch()
  state, losses = got_state, []
  for _ in range(8):
    state, m = step(state, frozen, fixed)
    losses.append((float(m['rec_loss']), float(m['d_loss'])))
  assert all(np.isfinite(losses).ravel())
  assert losses[-1][0] < 0.9 * losses[0][0], losses
  assert losses[-1][1] < losses[0][1], losses
