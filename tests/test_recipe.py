"""Recipe fidelity: the official training and sampling details that move FID / rFID (issue #11)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from PIL import Image
from safetensors.numpy import save_file

from hita_jax import config_lib, pretrained, sharding, training
from hita_jax.convert.dinov2 import OFFICIAL_PREFIX, export_dinov2
from hita_jax.convert.tokenizer import export_official_tokenizer
from hita_jax.data import images
from hita_jax.models import losses
from hita_jax.models.gpt import GPT, GPT_SIZES, GPTConfig, gpt_config_from
from hita_jax.models.quantizer import codes_used_fraction
from hita_jax.models.sampler import for_sampling, generate
from hita_jax.tasks import extract_codes, train_ar, train_tokenizer
from hita_jax.tasks import evaluate as evaluate_task
from tests.conftest import ROOT
from tests.utils import tiny_tokenizer


# -- 1. weight decay per logical parameter ------------------------------------------------------

def test_zero_gradient_step_leaves_every_norm_gain_unchanged():
  config = config_lib.load_config(f'{ROOT}/configs/hita_b.py:tiny')
  model = GPT(gpt_config_from(config.gpt), rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  params = jax.tree.map(lambda p: p + 0.5, params)  # decay visibly moves whatever it touches
  tx = train_ar.adamw(1e-2, 0.9, 0.95, 0.05, 1.0)
  grads = jax.tree.map(jnp.zeros_like, params)
  new = optax.apply_updates(params, tx.update(grads, tx.init(params), params)[0])
  flat_old, flat_new = nnx.to_flat_state(params), dict(nnx.to_flat_state(new))
  for path, old in flat_old:
    name = '.'.join(map(str, path))
    changed = not np.array_equal(np.asarray(old[...]), np.asarray(flat_new[path][...]))
    assert changed == ('norm' not in name), name  # decayed: every matrix and table, no RMSNorm gain


@pytest.mark.parametrize('size', ['B', 'XL'])
def test_decayed_parameters_are_the_official_2d_ones(size):
  cfg = GPTConfig(**GPT_SIZES[size])
  params = nnx.state(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  mask = train_ar.decay_mask(params)
  sizes = jax.tree.leaves(jax.tree.map(lambda p: int(np.prod(p.shape)), params))
  decayed = sum(n for n, m in zip(sizes, jax.tree.leaves(mask)) if m)
  # official: every >= 2-D parameter; the 1-D ones are the 2 RMSNorm gains per layer + the final one
  assert decayed == sum(sizes) - (2 * cfg.n_layer + 1) * cfg.dim


# -- 2. steps from the official epochs ---------------------------------------------------------

def test_ar_steps_follow_the_official_epochs():
  xl = config_lib.load_config(f'{ROOT}/configs/hita_xl.py').train_ar
  assert (xl.num_steps, xl.epochs, xl.global_batch_size) == (0, 50, 256)
  assert config_lib.ar_num_steps(xl) == 50 * (1_281_167 // 256) == 250_200
  bu = config_lib.load_config(f'{ROOT}/configs/hita_b.py:variant=U').train_ar
  assert config_lib.ar_num_steps(bu) == 250 * 5004
  assert config_lib.ar_num_steps(config_lib.load_config(f'{ROOT}/configs/hita_b.py').train_ar) == 300 * 5004
  tiny = config_lib.load_config(f'{ROOT}/configs/hita_b.py:tiny').train_ar
  assert config_lib.ar_num_steps(tiny) == tiny.num_steps == 200  # an explicit count wins


# -- 3. no silent random DINOv2 ----------------------------------------------------------------

@pytest.fixture
def official_tokenizer_file(tmp_path):
  path = str(tmp_path / 'hita-tok.safetensors')
  save_file(export_official_tokenizer(tiny_tokenizer('V', seed=1)), path)
  return path


@pytest.fixture
def no_model_allocation(monkeypatch):
  """Any model construction fails the test: the refusal must come first."""
  def refuse(*a, **k):
    raise AssertionError('a model was allocated before the DINOv2 check')
  for target in (pretrained, train_ar):
    for name in ('Tokenizer', 'GPT', 'InceptionV3'):
      if hasattr(target, name):
        monkeypatch.setattr(target, name, refuse)


@pytest.mark.parametrize('task', ['train_ar', 'extract_codes', 'evaluate'])
def test_official_tokenizer_without_dinov2_is_refused_before_allocation(
    task, official_tokenizer_file, no_model_allocation, tmp_path):
  config = config_lib.load_config(f'{ROOT}/configs/hita_b.py:tiny')
  config.init.tokenizer = official_tokenizer_file
  config.init.allow_random_dinov2 = False
  if task == 'evaluate':
    config = config_lib.load_config(f'{ROOT}/configs/evaluate.py:mode=tokenizer,tiny')
    config.init.tokenizer = official_tokenizer_file
    config.init.allow_random_dinov2 = False
    config.evaluate.images = str(tmp_path)
  module = {'train_ar': train_ar, 'extract_codes': extract_codes, 'evaluate': evaluate_task}[task]
  with pytest.raises(ValueError, match='--config.init.dinov2'):
    module.run(config, str(tmp_path / 'w'))


def test_dinov2_comes_from_the_given_source_or_the_file(official_tokenizer_file, tmp_path):
  ref = tiny_tokenizer('V', seed=7)
  cfg = ref.cfg
  dino = str(tmp_path / 'dino.safetensors')
  save_file(export_dinov2(ref.dinov2), dino)
  pretrained.require_dinov2(official_tokenizer_file, dino)  # a source given: fine
  tok = pretrained.load_tokenizer(cfg, official_tokenizer_file, dinov2=dino, allow_random_dinov2=False)
  np.testing.assert_array_equal(tok.dinov2.cls_token[...], ref.dinov2.cls_token[...])
  # an official file that carries the backbone (as in-training state dicts do) needs no source
  both = str(tmp_path / 'with_backbone.safetensors')
  sd = export_official_tokenizer(tiny_tokenizer('V', seed=1))
  sd.update({OFFICIAL_PREFIX + k: v for k, v in export_dinov2(ref.dinov2).items()})
  save_file(sd, both)
  pretrained.require_dinov2(both, None)
  tok = pretrained.load_tokenizer(cfg, both, allow_random_dinov2=False)
  np.testing.assert_array_equal(tok.dinov2.cls_token[...], ref.dinov2.cls_token[...])
  with pytest.raises(ValueError, match='--config.init.dinov2'):
    pretrained.load_tokenizer(cfg, official_tokenizer_file, allow_random_dinov2=False)


# -- 4. pre-extracted views follow the official per-epoch augmentation ---------------------------

def test_default_views_are_official_random_crops_with_flips():
  ex = config_lib.load_config(f'{ROOT}/configs/hita_b.py').extract_codes
  assert ex.views == 'random_crops' and images.num_views(ex.views, ex.random_crops) == 2 * ex.random_crops
  pil = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
  views = images.image_views(pil, 64, ex.views, random_crops=3, rng=np.random.default_rng((0, 5)))
  assert views.shape == (6, 64, 64, 3)
  rng = np.random.default_rng((0, 5))
  for k in range(3):
    crop = images.random_crop_arr(pil, 64, rng)  # the training augmentation, drawn in order
    np.testing.assert_array_equal(views[2 * k], crop)
    np.testing.assert_array_equal(views[2 * k + 1], crop[:, ::-1])
  assert len({v.tobytes() for v in views}) == 6


# -- 5. sampling as test_net.py ----------------------------------------------------------------

def test_sample_defaults_are_the_official_protocol():
  sc = config_lib.load_config(f'{ROOT}/configs/hita_xl.py').sample
  assert sc.classes == 'random' and sc.dtype == 'bfloat16' and sc.cfg_scale == 1.5


def test_bf16_sampler_agrees_with_fp32(official_fixtures):
  from hita_jax.tools import fixtures as fx
  model, _ = fx.gpt_from_fixture(official_fixtures)
  labels = jnp.arange(8) % model.cfg.num_classes
  codes, ref = generate(model, labels, jax.random.key(0), cfg_scale=1.5, top_k=1, return_logits=True)
  bf16, state = for_sampling(model, 'bfloat16')
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating))
  assert bf16.init_cache(2)['k'][0].dtype == jnp.bfloat16  # the KV cache too
  # the bf16 sampler teacher-forced on the fp32 codes: per-token argmax and logits
  _, got = generate(bf16, labels, jax.random.key(0), cfg_scale=1.5, top_k=1, return_logits=True,
                    prefix_codes=codes, prefix_mask=jnp.ones(codes.shape, bool), state=state)
  ref, got = np.asarray(ref), np.asarray(got)
  scale = float(np.abs(ref).max())
  np.testing.assert_allclose(got, ref, atol=2 ** -6 * scale)  # bf16 keeps 8 bits of mantissa
  same = np.argmax(got, -1) == np.argmax(ref, -1)
  top2 = np.sort(ref, -1)[..., -2:]
  decided = top2[..., 1] - top2[..., 0] > 2 ** -7 * scale  # fp32 margin above bf16 resolution
  assert same[decided].mean() >= 0.999, same[decided].mean()
  # Random weights leave many near-ties (about 7 % of tokens have a margin below that), so over
  # all tokens bf16 and fp32 agree on about 98.4 %; every disagreement is a near-tie.
  assert same.mean() >= 0.98, same.mean()


# -- 7. codebook usage as the official log -----------------------------------------------------

def test_codebook_usage_is_the_steps_distinct_codes():
  config = config_lib.load_config(f'{ROOT}/configs/tokenizer_v.py:tiny')
  config.tokenizer_loss.lpips_weights = 'random'
  config.train_tokenizer.global_batch_size = 8
  mesh = sharding.make_mesh([('data', 1)], jax.devices()[:1])
  parts, state, lp_state, _ = train_tokenizer.build(config, mesh)
  step = jax.jit(lambda s, b: train_tokenizer.train_step(parts, config, s, lp_state, b, jax.random.key(0)))
  # the step's forward pass, same state and dropout streams (jitted: eager op-by-op dispatch of
  # the whole tokenizer was most of this test's time)
  forward = jax.jit(lambda p, r, x: {k: v for k, v in nnx.merge(parts.g_def, p, r, copy=True)(
      images.to_unit(x)).items() if k.endswith('_codes')})
  for seed in range(2):
    x = np.random.RandomState(seed).randint(0, 256, (8, 64, 64, 3)).astype(np.uint8)
    out = forward(state['g_params'], state['g_rest'], x)
    state, metrics = step(state, {'image': jnp.asarray(x)})
    for kind in ('patch', 'holistic'):
      want = len(np.unique(np.asarray(out[f'{kind}_codes']))) / parts.cfg.codebook_size
      assert float(metrics[f'{kind}_codebook_usage']) == pytest.approx(want, abs=2 / parts.cfg.codebook_size)
  window = train_tokenizer.codebook_usage_window(parts, state)  # the FIFO figure, kept apart
  assert float(window['patch_codebook_usage_window']) >= float(metrics['patch_codebook_usage'])
  assert float(codes_used_fraction(jnp.array([[1, 1, 2]]), 4)) == 0.5


# -- 8. small differences ----------------------------------------------------------------------

def test_vfm_loss_is_torch_cosine_with_eps_1e_6(torch):
  r = np.random.RandomState(0)
  t = r.randn(2, 5, 16).astype(np.float32)
  p = r.randn(2, 5, 16).astype(np.float32)
  t[0, 0] *= 1e-7  # a near-zero target vector, where eps decides the value
  p[1, 2] *= 1e-8
  want = (1 - torch.nn.functional.cosine_similarity(torch.from_numpy(t), torch.from_numpy(p), dim=-1,
                                                     eps=1e-6)).mean().item()
  assert float(losses.vfm_loss(jnp.asarray(t), jnp.asarray(p))) == pytest.approx(want, rel=1e-6)


def test_fusion_decoder_linears_are_xavier_with_zero_biases():
  tok = tiny_tokenizer('U', seed=0)
  for module in (tok.fusion_decoder, tok.holistic_encoder):
    for _, node in nnx.iter_graph(module):
      if not isinstance(node, nnx.Linear):
        continue
      fan_in, fan_out = node.kernel.shape
      xavier, torch_default = (6 / (fan_in + fan_out)) ** 0.5, fan_in ** -0.5
      k = np.abs(np.asarray(node.kernel[...]))
      if module is tok.fusion_decoder:  # official Decoder: xavier-uniform, zero biases
        assert k.max() <= xavier and k.max() > 0.9 * xavier
        assert node.bias is None or not np.any(np.asarray(node.bias[...]))
      else:  # the encoder keeps PyTorch's default init (its xavier loop is a no-op, spec 2.4)
        assert k.max() <= torch_default


# Item 6 (PatchGAN statistics per replica) is tested in test_discriminator.py, item 9 (the tfds path)
# in test_tfds_path.py.


def test_init_gpt_resumes_model_ema_and_adamw_as_train_c2i(torch, tmp_path):
  """An official-format training checkpoint written by torch's AdamW with train_c2i.py's groups:
  params, EMA, moments and count come back, and the next step equals torch's next step."""
  import argparse
  from hita_jax.convert.gpt import export_official_gpt, load_official_gpt
  config = config_lib.load_config(f'{ROOT}/configs/hita_b.py:tiny')
  config.train_ar.codes_dir = 'synthetic'
  cfg = gpt_config_from(config.gpt)
  sd = export_official_gpt(GPT(cfg, rngs=nnx.Rngs(3)))
  names = list(sd)
  params = {k: torch.nn.Parameter(torch.from_numpy(sd[k].copy())) for k in names}
  groups = [{'params': [params[k] for k in names if sd[k].ndim >= 2], 'weight_decay': 0.05},
            {'params': [params[k] for k in names if sd[k].ndim < 2], 'weight_decay': 0.0}]
  opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95))
  gen = torch.Generator().manual_seed(0)
  grads = [{k: 1e-3 * torch.randn(p.shape, generator=gen) for k, p in params.items()} for _ in range(3)]
  for g in grads[:2]:
    for k, p in params.items():
      p.grad = g[k].clone()
    opt.step()
  model = {k: p.detach().clone() for k, p in params.items()}
  path = str(tmp_path / 'GPT-B.pt')
  torch.save({'model': model, 'ema': {k: 0.5 * v for k, v in model.items()}, 'optimizer': opt.state_dict(),
              'steps': 2, 'args': argparse.Namespace(gpt_model='GPT-B')}, path)
  config.init.gpt = path
  mesh = sharding.make_mesh('data=-1')
  parts, state, _ = train_ar.build(config, mesh)

  def ours(tree):  # official-named arrays -> our parameter layout
    m = GPT(cfg, rngs=nnx.Rngs(0))
    load_official_gpt(m, {k: np.asarray(v) for k, v in tree.items()})
    return nnx.state(m, nnx.Param)

  for a, b in zip(jax.tree.leaves(state['params']), jax.tree.leaves(ours(model))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(state['ema']), jax.tree.leaves(ours({k: 0.5 * v for k, v in model.items()}))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(optax.tree_utils.tree_get(state['opt'], 'count')) == 2
  # the third step, in torch and here
  for k, p in params.items():
    p.grad = grads[2][k].clone()
  opt.step()
  updates, _ = parts.tx.update(ours(grads[2]), state['opt'], state['params'])
  new = optax.apply_updates(state['params'], updates)
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(ours({k: p.detach() for k, p in params.items()}))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def _official_patchgan(disc):
  """Our PatchGAN -> an official `NLayerDiscriminator` state dict (nn.Sequential `main`, in order)."""
  n = len(disc.norms)
  conv_idx = [0] + [2 + 3 * i for i in range(n)] + [2 + 3 * n]
  sd = {}
  for j, (conv, idx) in enumerate(zip(disc.convs, conv_idx)):
    sd[f'main.{idx}.weight'] = np.asarray(conv.kernel[...]).transpose(3, 2, 0, 1).copy()
    if conv.bias is not None:
      sd[f'main.{idx}.bias'] = np.asarray(conv.bias[...]).copy()
    if j < n:
      norm, p = disc.norms[j], f'main.{3 + 3 * j}'
      sd.update({f'{p}.weight': np.asarray(norm.scale[...]).copy(), f'{p}.bias': np.asarray(norm.bias[...]).copy(),
                 f'{p}.running_mean': np.asarray(norm.mean[...]).copy() + 0.1,
                 f'{p}.running_var': np.asarray(norm.var[...]).copy() * 2,
                 f'{p}.num_batches_tracked': np.array(7)})
  return sd


@pytest.mark.slow  # builds the tokenizer trainer twice, ~1.5 min: keeps the default run near 20 minutes
@pytest.mark.parametrize('layout', ['flat', 'per_leaf'])
def test_tokenizer_resumes_vq_train_checkpoints(torch, tmp_path, layout):
  """vq_train.py's checkpoint: generator (+ frozen DINOv2 in its Adam, without state), EMA,
  discriminator with its statistics, both Adam states; the next steps equal torch's, with the
  Adam moments flat (one vector per network) or per parameter."""
  import argparse
  from hita_jax.convert.losses import load_official_patchgan
  from hita_jax.convert.tokenizer import load_official_tokenizer
  from hita_jax.models.discriminator import PatchGAN
  from hita_jax.models.tokenizer import trainable_filter
  config = config_lib.load_config(f'{ROOT}/configs/tokenizer_v.py:tiny')
  config.tokenizer_loss.lpips_weights = 'random'
  config.train_tokenizer.update(warmup_steps=0, lr=1e-4)  # torch below runs at a constant 1e-4
  config.train_tokenizer.optimizer_layout = layout
  ref = tiny_tokenizer('V', seed=4)
  g_sd = {k: v for k, v in export_official_tokenizer(ref).items() if not k.endswith('codebook_used')}
  d_ref = PatchGAN(ndf=config.tokenizer_loss.disc_ndf, n_layers=config.tokenizer_loss.disc_layers,
                   rngs=nnx.Rngs(5))
  d_sd = _official_patchgan(d_ref)
  g = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in g_sd.items()}
  d = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in d_sd.items()
       if k.endswith(('.weight', '.bias'))}
  frozen = [torch.nn.Parameter(torch.zeros(2), requires_grad=False)
            for _ in jax.tree.leaves(nnx.state(ref.dinov2, nnx.Param))]
  g_list = []
  for k, p in g.items():  # vq_model.parameters(): the DINOv2 backbone follows the encoder's pos_embed
    g_list.append(p)
    if k == 'encode_transformer.pos_embed':
      g_list += frozen
  opt_g = torch.optim.Adam(g_list, lr=1e-4, betas=(0.9, 0.95))
  opt_d = torch.optim.Adam(list(d.values()), lr=1e-4, betas=(0.9, 0.95))
  gen = torch.Generator().manual_seed(1)
  grads = [({k: 1e-4 * torch.randn(p.shape, generator=gen) for k, p in g.items()},
            {k: 1e-3 * torch.randn(p.shape, generator=gen) for k, p in d.items()}) for _ in range(3)]
  for gg, dg in grads[:2]:
    for params, gr, opt in ((g, gg, opt_g), (d, dg, opt_d)):
      for k, p in params.items():
        p.grad = gr[k].clone()
      opt.step()
  model = {k: p.detach().clone() for k, p in g.items()}
  disc = {k: (d[k].detach().clone() if k in d else torch.from_numpy(np.asarray(v))) for k, v in d_sd.items()}
  path = str(tmp_path / 'hita-tok.pt')
  torch.save({'model': model, 'ema': {k: 0.5 * v for k, v in model.items()}, 'optimizer': opt_g.state_dict(),
              'discriminator': disc, 'optimizer_disc': opt_d.state_dict(), 'steps': 2,
              'args': argparse.Namespace(image_size=64)}, path)
  config.init.tokenizer = path
  parts, state, _, _ = train_tokenizer.build(config, sharding.make_mesh([('data', 1)], jax.devices()[:1]))
  assert parts.flat_optimizer == (layout == 'flat')
  mu = state['opt_g'][1][0].mu
  assert (mu.ndim == 1) if layout == 'flat' else isinstance(mu, nnx.State), type(mu)

  def ours_g(sd):
    m = tiny_tokenizer('V')
    load_official_tokenizer(m, {k: np.asarray(v) for k, v in sd.items()})
    return nnx.state(m, trainable_filter())

  def ours_d(sd):
    m = PatchGAN(ndf=config.tokenizer_loss.disc_ndf, n_layers=config.tokenizer_loss.disc_layers,
                 rngs=nnx.Rngs(0))
    load_official_patchgan(m, {**d_sd, **{k: np.asarray(v) for k, v in sd.items()}})
    return nnx.state(m, nnx.Param)

  def same(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), **(tol or dict(rtol=0, atol=0)))

  same(state['g_params'], ours_g(model))
  assert parts.flat_ema == (layout == 'flat')
  same(train_tokenizer.ema_params(parts, state), ours_g({k: 0.5 * v for k, v in model.items()}))
  same(state['d_params'], ours_d(disc))
  np.testing.assert_allclose(np.asarray(state['d_stats']['norms'][0]['mean'][...]),
                             d_sd['main.3.running_mean'])
  # the third step of both optimizers, here and in torch
  gg, dg = grads[2]
  for params, gr, opt in ((g, gg, opt_g), (d, dg, opt_d)):
    for k, p in params.items():
      p.grad = gr[k].clone()
    opt.step()
  for key, tx, ours in (('g', parts.tx_g, ours_g), ('d', parts.tx_d, ours_d)):
    params, opt = state[f'{key}_params'], state[f'opt_{key}']
    new, _ = training.optimizer_step(tx, ours(gg if key == 'g' else dg), opt, params,
                                     flat=parts.flat_optimizer, finite=jnp.bool_(True))
    want = ours({k: p.detach() for k, p in (g if key == 'g' else d).items()})
    same(new, want, rtol=1e-6, atol=1e-7)


def test_gpu_compiler_options_reach_only_a_gpu_step(monkeypatch):
  """train_ar's `gpu_compiler_options` (cuBLAS GEMMs by default) are passed to the step's jit on a
  GPU backend only: TPU and CPU compilers get none (xla_gpu_* names are GPU options)."""
  config = config_lib.load_config(f'{ROOT}/configs/hita_b.py')
  opts = config.train_ar.gpu_compiler_options
  assert opts.to_dict() == {'xla_gpu_enable_triton_gemm': False}
  for backend, want in (('cpu', None), ('tpu', None), ('gpu', {'xla_gpu_enable_triton_gemm': False})):
    monkeypatch.setattr(config_lib.jax, 'default_backend', lambda b=backend: b)
    assert config_lib.gpu_compiler_options(opts) == want
  assert config_lib.gpu_compiler_options({}) is None
  # what the CPU compiler does with the option: accepts and ignores it (the step's code path)
  monkeypatch.undo()
  f = jax.jit(lambda x: x @ x, compiler_options={'xla_gpu_enable_triton_gemm': False})
  assert float(f(jnp.ones((2, 2)))[0, 0]) == 2.0


def test_tokenizer_gpu_compiler_options_reach_its_jit(monkeypatch):
  """train_tokenizer's step is jitted with `train_tokenizer.gpu_compiler_options` on a GPU backend
  (by default no fusion autotuner and cuBLAS GEMMs; none ever on CPU / TPU), as the trainer and
  `bench tok_trainer` run it."""
  from hita_jax.tasks import train_tokenizer as tt
  for variant in ('v', 'u'):
    config = config_lib.load_config(f'{ROOT}/configs/tokenizer_{variant}.py')
    assert config.train_tokenizer.gpu_compiler_options.to_dict() == {
        'xla_gpu_experimental_enable_fusion_autotuner': False, 'xla_gpu_enable_triton_gemm': False}
  seen = []
  real_jit = tt.jax.jit
  monkeypatch.setattr(tt.jax, 'jit', lambda f, **kw: seen.append(kw) or real_jit(f, **kw))
  config.train_tokenizer.gpu_compiler_options = {'xla_gpu_enable_triton_gemm': False}
  for backend, want in (('cpu', None), ('gpu', {'xla_gpu_enable_triton_gemm': False})):
    monkeypatch.setattr(config_lib.jax, 'default_backend', lambda b=backend: b)
    tt.jit_train_step(None, config)
    assert seen[-1] == {'donate_argnums': (0,), 'compiler_options': want}
