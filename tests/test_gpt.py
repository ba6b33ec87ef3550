"""GPT: official parameter counts, RoPE layout, KV cache vs full forward, scan/remat equivalence,
conversion round trip, sampler behaviour (compile once, filters, prefix forcing, sharding)."""
import collections
import dataclasses
import functools
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hita_jax import sharding
from hita_jax.convert.gpt import export_official_gpt, load_official_gpt
from hita_jax.models.gpt import GPT, GPT_SIZES, Block, GPTConfig
from hita_jax.models.gpt import cross_entropy, head_cross_entropy, logits_fp32
from hita_jax.models.rope import gpt_position_tables, rope_2d_table
from hita_jax.models.sampler import decode_segments, filter_logits, generate
from hita_jax.models.sampler import generate as generate_any
from tests.conftest import ROOT



def count_params(cfg: GPTConfig) -> int:
  model = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
  return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


_HEADS_BY_DIM = {768: 12, 1024: 16, 1280: 20, 1536: 24, 1920: 32, 2560: 40}  # official sizes


def config_from_state_dict(sd: dict[str, np.ndarray], **overrides) -> GPTConfig:
  """Infers the GPT architecture from an official state dict (width, depth, vocab, S, classes).
  The head count is not stored; it is taken from the official size table unless given."""
  n_cls, dim = sd['cls_embedding.embedding_table.weight'].shape
  layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r'layers\.(\d+)\.', k)))
  n_head = overrides.pop('n_head', None) or _HEADS_BY_DIM.get(dim)
  if n_head is None:
    raise ValueError(f'cannot infer n_head for width {dim} (not an official size); pass n_head')
  cfg = dict(dim=dim, n_layer=layers, n_head=n_head, vocab_size=sd['tok_embeddings.weight'].shape[0],
             num_holistic=sd['slot_pos.weight'].shape[0], num_classes=n_cls - 1)
  cfg.update(overrides)
  out = GPTConfig(**cfg)
  ffn = sd['layers.0.feed_forward.w1.weight'].shape[0]
  if out.ffn_hidden != ffn:
    raise ValueError(f'state dict FFN width {ffn} != {out.ffn_hidden} implied by width {dim}')
  return out


def tiny_cfg(**kw):
  base = dict(dim=64, n_layer=2, n_head=4, vocab_size=32, num_holistic=6, grid=4, num_classes=5,
              token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
  base.update(kw)
  return GPTConfig(**base)


def random_gpt(cfg, seed=0):
  """A GPT with a non-zero head (the official init zeroes it, which would hide bugs)."""
  m = GPT(cfg, rngs=nnx.Rngs(seed))
  m.head[...] = jax.random.normal(jax.random.key(seed + 1), m.head.shape) * 0.05
  m.eval()
  return m


def codes(cfg, b=2, seed=0):
  r = np.random.RandomState(seed)
  return (jnp.asarray(r.randint(0, cfg.num_classes, b)),
          jnp.asarray(r.randint(0, cfg.vocab_size, (b, cfg.num_holistic))),
          jnp.asarray(r.randint(0, cfg.vocab_size, (b, cfg.num_patches))))


@pytest.mark.parametrize('size,expected', [('B', 136_152_576), ('L', 376_596_480), ('XL', 816_806_400),
                                           ('XXL', 1_461_500_928), ('2B', 2_251_549_440)])
def test_official_parameter_counts(size, expected):
  assert count_params(GPTConfig(**GPT_SIZES[size])) == expected


def test_rope_head_dim_60_has_15_plus_15_frequencies():
  t = rope_2d_table(21, 60)
  assert t.shape == (442, 30, 2)
  assert np.all(t[0] == 0)  # the official zero row
  # pair 0 rotates by the row index, pair 15 by the column index (both with freq 1)
  row, col = 2, 5
  np.testing.assert_allclose(t[1 + row * 21 + col, 0], [np.cos(row), np.sin(row)], atol=1e-6)
  np.testing.assert_allclose(t[1 + row * 21 + col, 15], [np.cos(col), np.sin(col)], atol=1e-6)
  is_hol, cos, sin = gpt_position_tables(128, 21, 60, 10000.0, 569)
  assert is_hol[:128].all() and not is_hol[128:].any()
  assert np.all(cos[128] == 0) and np.all(sin[128] == 0)  # q_{S-1}: q = k = 0
  assert np.all(cos[:128] == 1) and np.all(sin[:128] == 0)


@pytest.mark.parametrize('kw,segments', [({}, 1), ({'n_head': 2}, 1), ({'grid': 5, 'num_holistic': 3}, 1),
                                         ({'scan_layers': True}, 1), ({}, 4), ({'scan_layers': True}, 3)])
def test_kv_cache_equals_full_forward_fixed_mode(kw, segments):
  cfg = tiny_cfg(**kw)
  generate = functools.partial(generate_any, kv_segments=segments)
  m = random_gpt(cfg)
  labels, q, z = codes(cfg)
  full = np.asarray(m(labels, q, z))
  s, v = cfg.num_holistic, cfg.vocab_size
  head_selected = np.concatenate([full[:, :s, :v], full[:, s:, v:]], axis=1)
  seq = jnp.concatenate([q, z], 1)
  out, logits = generate(m, labels, jax.random.key(0), cfg_scale=1.0, prefix_codes=seq,
                         prefix_mask=np.ones(seq.shape[1], bool), return_logits=True)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(seq))
  np.testing.assert_allclose(np.asarray(logits), head_selected, atol=2e-5)
  # the released sampler's quirk changes patch logits only
  _, legacy = generate(m, labels, jax.random.key(0), cfg_scale=1.0, legacy_pos128_embedding=True,
                       prefix_codes=seq, prefix_mask=np.ones(seq.shape[1], bool), return_logits=True)
  legacy = np.asarray(legacy)
  np.testing.assert_allclose(legacy[:, :s], head_selected[:, :s], atol=2e-5)
  assert np.abs(legacy[:, s:] - head_selected[:, s:]).max() > 1e-3


@pytest.mark.parametrize('dropout_rng', ['hash', 'threefry'])
def test_scan_and_remat_match_unrolled(dropout_rng):
  cfg = tiny_cfg(token_dropout=0.1, resid_dropout=0.1, ffn_dropout=0.1, dropout_rng=dropout_rng)
  labels, q, z = codes(cfg)
  results = []
  for scan, remat in [(False, 'none'), (True, 'none'), (False, 'full'), (True, 'minimal'), (False, 'dots')]:
    m = random_gpt(dataclasses.replace(cfg, scan_layers=scan, remat=remat))
    graphdef, params = nnx.split(m)

    def loss(p):
      mm = nnx.merge(graphdef, p, copy=True)
      lh, lp = mm.loss(labels, q, z, rng=jax.random.key(3))
      return lh + lp
    l, g = jax.value_and_grad(loss)(params)
    results.append((float(l), jax.tree.leaves(g)))
  for l, g in results[1:]:
    assert l == pytest.approx(results[0][0], rel=1e-5)
    for a, b in zip(g, results[0][1]):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('dropout_rng', ['hash', 'threefry'])
def test_dropout_only_with_rng(dropout_rng):
  cfg = tiny_cfg(token_dropout=0.5, resid_dropout=0.5, ffn_dropout=0.5, dropout_rng=dropout_rng)
  m = random_gpt(cfg)
  labels, q, z = codes(cfg)
  a, b = m(labels, q, z), m(labels, q, z)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  c = m(labels, q, z, rng=jax.random.key(0))
  assert np.abs(np.asarray(c) - np.asarray(a)).max() > 1e-3


def test_label_dropout_uses_null_class():
  cfg = tiny_cfg(class_dropout_prob=0.5)
  m = random_gpt(cfg)
  dropped = m.drop_labels(jnp.zeros(1000, jnp.int32), jax.random.key(0))
  assert set(np.unique(np.asarray(dropped))) == {0, cfg.num_classes}
  assert 0.4 < float(np.mean(np.asarray(dropped) == cfg.num_classes)) < 0.6


def test_export_import_round_trip_and_config_inference():
  cfg = tiny_cfg()
  src = random_gpt(cfg, seed=1)
  sd = export_official_gpt(src)
  assert sd['layers.1.attention.wqkv.weight'].shape == (192, 64)
  assert sd['output.weight'].shape == (64, 64) and sd['cls_embedding.embedding_table.weight'].shape == (6, 64)
  dst = GPT(cfg, rngs=nnx.Rngs(9))
  assert load_official_gpt(dst, sd) == {'missing': [], 'unexpected': []}
  for a, b in zip(jax.tree.leaves(nnx.state(src)), jax.tree.leaves(nnx.state(dst))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  inferred = config_from_state_dict(sd, n_head=4, grid=4)
  assert (inferred.dim, inferred.n_layer, inferred.vocab_size, inferred.num_holistic,
          inferred.num_classes) == (64, 2, 32, 6, 5)
  with pytest.raises(KeyError, match='does not match'):
    load_official_gpt(GPT(tiny_cfg(n_layer=3), rngs=nnx.Rngs(0)), sd)


def test_sampler_compiles_once_per_shape():
  from hita_jax.models.sampler import _generate
  cfg = tiny_cfg()
  m = random_gpt(cfg)
  labels = jnp.asarray([1, 2])
  _generate.clear_cache()
  generate(m, labels, jax.random.key(0), cfg_scale=1.5)
  n = _generate._cache_size()
  for i, scale in enumerate([2.0, 3.5, 1.7]):  # new scale values and keys: no recompilation
    generate(m, labels, jax.random.key(i + 1), cfg_scale=scale)
  assert _generate._cache_size() == n == 1
  generate(m, jnp.asarray([1, 2, 3]), jax.random.key(0), cfg_scale=1.5)  # new batch: one more
  assert _generate._cache_size() == 2


def test_decode_segments_cover_positions_split_at_s_and_bound_the_cache_read():
  assert decode_segments(569, 128, 1, 576) == [(0, 569, 576, None)]
  segs = decode_segments(569, 128, 8, 576)
  assert segs[0][0] == 0 and segs[-1][1] == 569
  assert all(a[1] == b[0] for a, b in zip(segs[:-1], segs[1:]))  # contiguous, no overlap
  assert any(b == 128 for _, b, _, _ in segs)                    # S is a boundary
  for a, b, kv, head in segs:
    assert b <= kv <= 576 and kv % 8 == 0 and kv - b < 8       # reads the prefix it needs only
    assert head == ('holistic' if b <= 128 else 'patch') and (b <= 128 or a >= 128)
  read = sum((b - a) * kv for a, b, kv, _ in segs)
  assert read < 0.6 * 569 * 576                                  # ~ (n + 1) / 2n of the full reads
  assert decode_segments(5, 6, 4, 8)[-1][3] == 'holistic'        # a prefix shorter than S
  from hita_jax.models.sampler import resolve_kv_segments
  assert resolve_kv_segments(None, 'cpu') == 1 and resolve_kv_segments(0, 'gpu') == 8
  assert resolve_kv_segments(0, 'gpu', fused_attention=True) == 2
  assert resolve_kv_segments(0, 'cpu', fused_attention=True) == 1 and resolve_kv_segments(5, 'gpu', True) == 5
  with pytest.raises(ValueError, match='kv_segments'):
    resolve_kv_segments(-1)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_segmented_decode_matches_one_loop_with_cfg(dtype):
  """The segmented sampler (static cache prefixes, branch-free heads) against the one-loop
  sampler: same greedy codes and logits with CFG, in fp32 and in the bf16 the sampler ships with
  (and bf16 logits close to fp32's)."""
  from hita_jax.models.sampler import for_sampling
  cfg = tiny_cfg(grid=5, num_holistic=7)
  m32 = random_gpt(cfg, seed=3)
  m, state = for_sampling(m32, dtype)
  labels = jnp.asarray([0, 1, 4])
  run = lambda mm, st, n: generate(mm, labels, jax.random.key(2), cfg_scale=2.5, top_k=1, state=st,
                                   kv_segments=n, return_logits=True)
  one_codes, one_logits = run(m, state, 1)
  for n in (2, 5):
    codes_n, logits_n = run(m, state, n)
    np.testing.assert_array_equal(np.asarray(codes_n), np.asarray(one_codes))
    np.testing.assert_allclose(np.asarray(logits_n), np.asarray(one_logits),
                               atol=1e-5 if dtype == 'float32' else 2e-2)
  if dtype == 'bfloat16':  # teacher-force fp32's codes: bf16 segmented logits near fp32's
    ref_codes, ref_logits = run(m32, nnx.state(m32), 1)
    _, got = generate(m, labels, jax.random.key(2), cfg_scale=2.5, state=state, kv_segments=4,
                      prefix_codes=ref_codes, prefix_mask=np.ones(ref_codes.shape[1], bool),
                      return_logits=True)
    err = np.abs(np.asarray(got) - np.asarray(ref_logits)).max()
    assert err < 0.05 * np.abs(np.asarray(ref_logits)).max(), err


def test_lower_generate_lowers_the_program_generate_runs():
  """`lower_generate` (bench sample --profile's source lines) lowers `generate`'s own jitted
  program: its output's shape, its loops, and HLO whose instructions name the model's source
  lines."""
  from hita_jax.models.sampler import lower_generate
  from hita_jax.tools import profile_summary
  cfg = tiny_cfg()
  m = random_gpt(cfg)
  labels, key = jnp.array([1, 3]), jax.random.key(2)
  seq = generate(m, labels, key, cfg_scale=1.5)
  lowered = lower_generate(m, labels, key, cfg_scale=1.5)
  assert lowered.out_info[0].shape == seq.shape and lowered.out_info[0].dtype == seq.dtype
  assert 'stablehlo.while' in lowered.as_text()
  sources = profile_summary.hlo_sources(lowered.compile().as_text())
  assert any(src and 'hita_jax/models/gpt.py:' in src for src, _ in sources.values())


def test_filters_and_sampling_statistics():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  f = np.asarray(filter_logits(logits, top_k=2))
  assert np.isfinite(f[0, :2]).all() and (f[0, 2:] < -1e30).all()
  f = np.asarray(filter_logits(logits, top_p=0.7))  # keeps 0.5 and 0.3 (mass before 0.3 is 0.5)
  assert (f[0, :2] > -1e30).all() and (f[0, 2:] < -1e30).all()
  f = np.asarray(filter_logits(logits, top_p=0.4))
  assert f[0, 0] > -1e30 and (f[0, 1:] < -1e30).all()
  from hita_jax.models.sampler import sample_token
  keys = jax.random.split(jax.random.key(0), 4000)
  toks = np.asarray(jax.vmap(lambda k: sample_token(k, logits)[0])(keys))
  np.testing.assert_allclose(np.bincount(toks, minlength=4) / 4000, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_prefix_forcing_and_cfg_interval():
  cfg = tiny_cfg()
  m = random_gpt(cfg)
  labels = jnp.asarray([0, 3])
  n = cfg.num_holistic + cfg.num_patches
  prefix = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, n))
  mask = np.zeros(n, bool)
  mask[:cfg.num_holistic + 5] = True
  out = np.asarray(generate(m, labels, jax.random.key(1), cfg_scale=2.0, prefix_codes=prefix,
                            prefix_mask=mask, top_k=4))
  np.testing.assert_array_equal(out[:, mask], prefix[:, mask])
  assert out.max() < cfg.vocab_size
  # cfg_interval=-1 guides every step; a huge interval is the same, interval 0 differs
  a = generate(m, labels, jax.random.key(1), cfg_scale=4.0, top_k=1)
  b = generate(m, labels, jax.random.key(1), cfg_scale=4.0, top_k=1, cfg_interval=10_000)
  c = generate(m, labels, jax.random.key(1), cfg_scale=4.0, top_k=1, cfg_interval=0)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_sharded_sampler_matches_single_device():
  cfg = tiny_cfg(n_head=4, dim=64)
  m = random_gpt(cfg, seed=4)
  labels = jnp.asarray([0, 1, 2, 3, 4, 0, 1, 2])
  ref = np.asarray(generate(m, labels, jax.random.key(0), cfg_scale=1.5, top_k=1))
  mesh = sharding.make_mesh([('data', 2), ('fsdp', 2), ('tensor', 2)])
  sharding.shard_module(m, mesh, sharding.DEFAULT_RULES)
  assert m.blocks.w1[...].sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor')
  lab = jax.device_put(labels, sharding.batch_sharding(mesh, sharding.DEFAULT_RULES, 1))
  got = np.asarray(generate(m, lab, jax.random.key(0), cfg_scale=1.5, top_k=1))
  np.testing.assert_array_equal(got, ref)


def test_gpt_import_cli_sets_legacy_sampler_flag(tmp_path):
  from safetensors.numpy import save_file
  from hita_jax import config_lib
  from hita_jax.pretrained import wants_legacy_sampler as legacy_flag_from_export
  from hita_jax.models.gpt import gpt_config_from
  config = config_lib.load_config(f'{ROOT}/configs/hita_b.py:tiny')
  model = random_gpt(gpt_config_from(config.gpt), seed=2)
  sd = export_official_gpt(model)
  save_file(sd, str(tmp_path / 'GPT-B.safetensors'))
  run = lambda *a: subprocess.run([sys.executable, '-m', 'hita_jax.tools.convert', 'gpt', *a], cwd=ROOT,
                                  capture_output=True, text=True)
  r = run('import', '--config', f'{ROOT}/configs/hita_b.py:tiny', '--checkpoint',
          str(tmp_path / 'GPT-B.safetensors'), '--out', str(tmp_path / 'gpt'))
  assert r.returncode == 0, r.stderr
  assert legacy_flag_from_export(str(tmp_path / 'gpt'))
  r = run('export', '--config', f'{ROOT}/configs/hita_b.py:tiny', '--params', str(tmp_path / 'gpt'),
          '--out', str(tmp_path / 'back.npz'))
  assert r.returncode == 0, r.stderr
  back = np.load(tmp_path / 'back.npz')
  assert all(np.array_equal(back[k], sd[k]) for k in sd)


def test_mfu_accounting_matches_the_official_anchor():
  """The anchor (shared/bench) measured GPT-B at 234089 tokens/s = 17.128 % MFU, GPT-L at 93419 =
  20.96 %; our FLOP count must reproduce its convention exactly, and N_matmul must be the model's
  layer + head parameter count."""
  from hita_jax.metrics import flops
  b = GPTConfig(**GPT_SIZES['B'])
  assert flops.mfu(234089.469382175, flops.gpt_train_flops_per_token(b, 569)) == pytest.approx(
      0.1712806658567718, rel=1e-9)
  lcfg = GPTConfig(**GPT_SIZES['L'])
  assert flops.mfu(93419.31141281781, flops.gpt_train_flops_per_token(lcfg, 569)) == pytest.approx(
      0.20961390107434, rel=1e-9)
  m = nnx.eval_shape(lambda: GPT(b, rngs=nnx.Rngs(0)))
  n_layers_head = sum(int(np.prod(v.shape)) for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))
                      if p[0] in ('blocks', 'head'))
  assert flops.gpt_matmul_params(b) == n_layers_head == 110_118_912
  causal = flops.gpt_train_flops_per_token(b, 569, causal=True)
  assert flops.gpt_train_flops_per_token(b, 569) - causal == 6 * 12 * 768 * 569


def test_attention_impl_auto_picks_the_platform_kernel():
  from hita_jax.models.layers import resolve_attn_impl
  assert jax.device_count() == 8
  # several TPU devices and no mesh context: XLA cannot partition splash, so the XLA path
  assert [resolve_attn_impl('auto', p) for p in ('gpu', 'tpu', 'cpu')] == ['cudnn', 'xla', 'xla']
  with jax.set_mesh(jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))):
    assert resolve_attn_impl('auto', 'tpu') == 'splash'
  assert resolve_attn_impl('xla', 'gpu') == 'xla'
  with pytest.raises(ValueError, match='attn_impl'):
    resolve_attn_impl('flash')
  assert GPTConfig().attn_impl == 'auto'


@pytest.mark.parametrize('kernel', ['splash', 'pallas'])
def test_attention_kernel_path_matches_xla_forward_and_gradients(kernel):
  """The TPU path (Pallas splash kernel) and the GPU Triton flash kernel ('pallas'), interpret mode
  here, on a sequence that needs padding."""
  cfg = tiny_cfg(n_head=2, attn_impl='xla')
  labels, q, z = codes(cfg)
  results = []
  for impl in ('xla', kernel):
    m = random_gpt(dataclasses.replace(cfg, attn_impl=impl))
    graphdef, params = nnx.split(m)

    def loss(p):
      lh, lp = nnx.merge(graphdef, p, copy=True).loss(labels, q, z)
      return lh + lp
    results.append(jax.value_and_grad(loss)(params))
  assert float(results[1][0]) == pytest.approx(float(results[0][0]), rel=1e-5)
  for a, b in zip(jax.tree.leaves(results[1][1]), jax.tree.leaves(results[0][1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize('kernel', ['splash', 'pallas'])
def test_attention_kernel_under_a_mesh_runs_per_shard(kernel):
  """Splash / the Triton kernel under jax.set_mesh (interpret mode here): a shard_map with rows
  over 'data' and heads over 'tensor', forward and gradients equal to the unsharded XLA path. (On
  a TPU or GPU, XLA refuses to partition a Pallas kernel itself.)"""
  from hita_jax.models.layers import causal_attention
  mesh = jax.make_mesh((4, 2), ('data', 'tensor'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  ks = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(kk, (4, 20, 2, 16)) for kk in ks)
  loss = lambda impl: lambda q, k, v: jnp.sum(causal_attention(q, k, v, impl=impl) ** 2)
  ref, ref_g = jax.value_and_grad(loss('xla'), argnums=(0, 1, 2))(q, k, v)
  with jax.set_mesh(mesh):
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data', None, 'tensor'))
    args = [jax.device_put(a, sh) for a in (q, k, v)]
    fn = jax.jit(jax.value_and_grad(loss(kernel), argnums=(0, 1, 2)))
    got, got_g = fn(*args)
    assert 'shard_map' in fn.lower(*args).as_text() or 'manual' in fn.lower(*args).as_text().lower()
  assert float(got) == pytest.approx(float(ref), rel=1e-5)
  for a, b in zip(got_g, ref_g):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)


def test_triton_attention_in_bf16_is_the_fp32_result_within_bf16_rounding():
  """The Triton flash kernel (interpret mode) with bf16 inputs against the fp32 reference: output
  and gradients within a few bf16 steps, as the cuDNN path's are; a length that needs padding."""
  from hita_jax.models.layers import attention, causal_mask, triton_causal_attention
  ks = jax.random.split(jax.random.key(1), 4)
  q, k, v = (jax.random.normal(kk, (2, 70, 2, 16)) for kk in ks[:3])
  do = jax.random.normal(ks[3], (2, 70, 2, 16))
  ref_fn = lambda q, k, v: jnp.sum(attention(q, k, v, mask=causal_mask(70)) * do)
  got_fn = lambda q, k, v: jnp.sum(triton_causal_attention(q, k, v, interpret=True).astype(jnp.float32) * do)
  ref, ref_g = jax.value_and_grad(ref_fn, argnums=(0, 1, 2))(q, k, v)
  f32, f32_g = jax.value_and_grad(got_fn, argnums=(0, 1, 2))(q, k, v)
  bf = [a.astype(jnp.bfloat16) for a in (q, k, v)]
  b16, b16_g = jax.value_and_grad(got_fn, argnums=(0, 1, 2))(*bf)
  assert float(f32) == pytest.approx(float(ref), rel=1e-5)
  for a, r in zip(f32_g, ref_g):
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=2e-5, rtol=1e-4)
  out = triton_causal_attention(*bf, interpret=True).astype(jnp.float32)
  out_ref = attention(q, k, v, mask=causal_mask(70))
  np.testing.assert_allclose(np.asarray(out), np.asarray(out_ref), atol=3e-2)
  for a, r in zip(b16_g, ref_g):
    a, r = np.asarray(a.astype(jnp.float32)), np.asarray(r)
    assert np.abs(a - r).max() <= 0.03 * np.abs(r).max()


def _bf16_attention_near_fp32(fn, shape, seed):
  """fn(q, k, v) (causal attention) on bf16 inputs against the fp32 reference on the same draws:
  output within 3e-2 and each gradient within 3 % of its largest value (a few bf16 steps).
  Returns fn's bf16 output."""
  from hita_jax.models.layers import attention, causal_mask
  t = shape[1]
  ks = jax.random.split(jax.random.key(seed), 4)
  q, k, v = (jax.random.normal(kk, shape) for kk in ks[:3])
  do = jax.random.normal(ks[3], shape)
  ref_fn = lambda q, k, v: jnp.sum(attention(q, k, v, mask=causal_mask(t)) * do)
  got_fn = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * do)
  _, ref_g = jax.value_and_grad(ref_fn, argnums=(0, 1, 2))(q, k, v)
  bf = [a.astype(jnp.bfloat16) for a in (q, k, v)]
  out = fn(*bf)
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             np.asarray(attention(q, k, v, mask=causal_mask(t))), atol=3e-2)
  _, b16_g = jax.value_and_grad(got_fn, argnums=(0, 1, 2))(*bf)
  for name, a, r in zip('qkv', b16_g, ref_g):
    a, r = np.asarray(a, np.float32), np.asarray(r)
    assert np.abs(a - r).max() <= 0.03 * np.abs(r).max(), name
  return out


def _xla_for_cudnn(calls):
  """jax.nn.dot_product_attention with the cuDNN request served by its XLA implementation, so
  that the CPU runs `causal_attention`'s cuDNN branch (pad to the block, is_causal, slice)."""
  real = jax.nn.dot_product_attention

  def on_cpu(*args, implementation=None, **kw):
    calls.append(implementation)
    return real(*args, implementation='xla', **kw)
  return on_cpu


def test_cudnn_causal_branch_in_bf16_is_the_fp32_result_within_bf16_rounding(monkeypatch):
  """The GPU training default (attn_impl 'auto' -> 'cudnn'), its branch run on the CPU: bf16
  q / k / v on a length the branch pads (70 -> 128) against the fp32 reference, output and
  gradients within a few bf16 steps; then the whole bf16 model through it against the fp32 XLA
  model (loss and every gradient)."""
  from hita_jax.models.layers import causal_attention
  calls = []
  monkeypatch.setattr(jax.nn, 'dot_product_attention', _xla_for_cudnn(calls))
  out = _bf16_attention_near_fp32(functools.partial(causal_attention, impl='cudnn'), (2, 70, 2, 16), 11)
  assert out.dtype == jnp.bfloat16 and out.shape == (2, 70, 2, 16)
  assert calls == ['cudnn'] * 2, calls  # the bf16 output, then the gradient's forward

  cfg = tiny_cfg(n_head=2)
  labels, qc, zc = codes(cfg)
  out = {}
  for impl, dt in (('xla', 'float32'), ('cudnn', 'bfloat16')):
    m = random_gpt(dataclasses.replace(cfg, attn_impl=impl, dtype=dt), seed=5)
    graphdef, params = nnx.split(m)
    loss = lambda p: sum(nnx.merge(graphdef, p, copy=True).loss(labels, qc, zc))
    out[impl] = jax.value_and_grad(loss)(params)
  assert calls.count('cudnn') > 1 + cfg.n_layer - 1  # every layer of the bf16 model took the branch
  assert float(out['cudnn'][0]) == pytest.approx(float(out['xla'][0]), rel=1e-2)
  for a, r in zip(jax.tree.leaves(out['cudnn'][1]), jax.tree.leaves(out['xla'][1])):
    a, r = np.asarray(a, np.float32), np.asarray(r)
    np.testing.assert_allclose(a, r, atol=5e-2 * (float(np.abs(r).max()) + 1e-12))


def test_splash_attention_in_bf16_is_the_fp32_result_within_bf16_rounding():
  """The TPU default (Pallas splash kernel, interpret mode here) with bf16 inputs against the fp32
  reference. Head dim 32: its scale 32**-0.5 is not exact in bf16, so the kernel's scaling of q in
  q's dtype is part of what is checked."""
  from hita_jax.models.layers import splash_causal_attention
  out = _bf16_attention_near_fp32(functools.partial(splash_causal_attention, interpret=True),
                                  (2, 70, 2, 32), 12)
  assert out.dtype == jnp.bfloat16


@pytest.mark.gpu  # deselected by default (a skip would fail CI): JAX_PLATFORMS=cuda pytest -m gpu
def test_cudnn_causal_kernel_against_the_reference_on_gpu():
  """The real cuDNN kernel (device lease) at GPT-B's training length (569, padded to 576), head
  dim 64: bf16 values and gradients within rounding of the fp32 reference."""
  from hita_jax.models.layers import causal_attention
  _bf16_attention_near_fp32(functools.partial(causal_attention, impl='cudnn'), (2, 569, 4, 64), 13)


def test_triton_attention_lowers_for_cuda_forward_and_backward():
  """The Triton kernels (forward, dq and dk/dv) lower through Pallas' Triton lowering for CUDA at
  GPT-B's training shape (569 rows padded to 576, 12 heads of 64): what the CPU can check before a
  GPU compiles the PTX."""
  from hita_jax.models.layers import triton_causal_attention
  x = jax.ShapeDtypeStruct((2, 569, 12, 64), jnp.bfloat16)
  loss = lambda q, k, v: jnp.sum(triton_causal_attention(q, k, v).astype(jnp.float32))
  allow = [jax.export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')]
  exp = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=['cuda'],
                          disabled_checks=allow)(x, x, x)
  assert exp.mlir_module().count('__gpu$xla.gpu.triton') >= 3  # forward, dq, dk/dv


def test_loss_multiplies_each_row_by_its_head_half_only():
  """loss() (half-head per row, logsumexp CE) equals the CE of the official full 2V logits, in
  fp32 exactly and in bf16 compute within bf16 rounding of the fp32 value."""
  cfg = tiny_cfg()
  labels, q, z = codes(cfg, b=3)
  m = random_gpt(cfg)
  full = m(labels, q, z)
  lh_full, lp_full = m.split_logits(full)
  ref = [float(jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(a, -1), t[..., None], -1)))
         for a, t in ((lh_full, q), (lp_full, z))]
  lh, lp = m.loss(labels, q, z)
  np.testing.assert_allclose([float(lh), float(lp)], ref, rtol=1e-6)
  bf = random_gpt(dataclasses.replace(cfg, dtype='bfloat16'))
  lh16, lp16 = bf.loss(labels, q, z)
  np.testing.assert_allclose([float(lh16), float(lp16)], ref, rtol=2e-2)


def test_sequence_padding_for_the_attention_kernel_is_inert(monkeypatch):
  """The model pads the sequence once to the attention kernel's block (cuDNN 64, splash 128 when
  the pad is small; none for XLA) and drops the padded rows before the head: the same logits,
  losses and gradients as without padding, in fp32 and bf16, and with dropout on (hash and 16- and
  32-bit Threefry masks are drawn for the real rows only). Padding is forced here through the XLA path."""
  from hita_jax.models import gpt as gpt_mod
  from hita_jax.models.layers import causal_pad
  assert causal_pad(569, 'cudnn') == 7 and causal_pad(576, 'cudnn') == 0
  assert causal_pad(569, 'xla') == 0 and causal_pad(569, 'auto') == 0  # CPU: XLA pads nothing
  assert causal_pad(569, 'splash') == 0 and causal_pad(1000, 'splash') == 24  # 71 rows: too many
  assert causal_pad(569, 'pallas') == 7
  assert causal_pad(100, 'cudnn') == 0  # 28 rows: more than 1/16 of the sequence
  drop = dict(token_dropout=0.1, resid_dropout=0.1, ffn_dropout=0.1)
  cases = [(dict(dtype='float32'), None, 1e-6), (dict(dtype='bfloat16'), None, 5e-3),
           (dict(dtype='float32', dropout_rng='hash', **drop), jax.random.key(7), 1e-6),
           (dict(dtype='float32', dropout_rng='threefry', dropout_bits=16, **drop), jax.random.key(7), 1e-6),
           (dict(dtype='float32', dropout_rng='threefry', dropout_bits=32, **drop), jax.random.key(7), 1e-6)]
  for kw, rng, tol in cases:
    cfg = tiny_cfg(attn_impl='xla', **kw)
    labels, q, z = codes(cfg)
    m = random_gpt(cfg, seed=4)
    graphdef, params = nnx.split(m)

    def loss(p):
      lh, lp = nnx.merge(graphdef, p, copy=True).loss(labels, q, z, rng=rng)
      return lh + lp
    ref = (m(labels, q, z), *jax.value_and_grad(loss)(params))
    with monkeypatch.context() as mp:
      mp.setattr(gpt_mod, 'causal_pad', lambda t, impl: 11)
      got = (m(labels, q, z), *jax.value_and_grad(loss)(params))
    assert got[0].shape == ref[0].shape
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
      np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol,
                                 rtol=max(tol, 1e-5))


def _apply_rope_stacked(x, cos, sin):
  """The first spelling of apply_rope (pairs sliced apart, results stacked): the reference for its
  pair-reversal form, forward and backward. The products and sums are the same; only which
  product the backend contracts into a fused multiply-add may differ (one fp32 ulp)."""
  dt = x.dtype
  xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  if cos.ndim == 2:
    cos, sin = cos[None], sin[None]
  c, s = cos[:, :, None, :], sin[:, :, None, :]
  x0, x1 = xf[..., 0], xf[..., 1]
  return jnp.stack([x0 * c - x1 * s, x1 * c + x0 * s], axis=-1).reshape(x.shape).astype(dt)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('batched_tables', [False, True])
def test_apply_rope_equals_its_stacked_spelling(dtype, batched_tables):
  from hita_jax.models.rope import apply_rope
  _, cos, sin = gpt_position_tables(4, 5, 16, 10000.0, 30)
  cos, sin = jnp.asarray(cos), jnp.asarray(sin)
  x = jax.random.normal(jax.random.key(0), (2, 30, 3, 16)).astype(dtype)
  if batched_tables:  # the sampler's per-row tables
    cos, sin = jnp.stack([cos, cos[::-1]]), jnp.stack([sin, sin[::-1]])
  # fp32: within an ulp or two; bf16: the same fp32 values rounded, so at most one bf16 step apart
  tol = dict(rtol=2e-7, atol=5e-7) if dtype == jnp.float32 else dict(rtol=2 ** -8, atol=2 ** -8)
  for f in (apply_rope, jax.jit(apply_rope)):
    np.testing.assert_allclose(np.asarray(f(x, cos, sin), np.float32),
                               np.asarray(_apply_rope_stacked(x, cos, sin), np.float32), **tol)
  g = jax.random.normal(jax.random.key(1), x.shape).astype(dtype)
  grad = lambda fn: jax.grad(lambda a: jnp.vdot(fn(a, cos, sin).astype(jnp.float32),
                                                g.astype(jnp.float32)))(x)
  np.testing.assert_allclose(np.asarray(jax.jit(grad, static_argnums=0)(apply_rope), np.float32),
                             np.asarray(jax.jit(lambda: grad(_apply_rope_stacked))(), np.float32), **tol)


def test_layer_gradients_are_one_concatenate_per_stacked_weight():
  """The unrolled layer loop's gradient writes each stacked weight's gradient once (a concatenate
  of the layers'), not a pad to the whole stack per layer summed over the layers: with a[i] per
  layer, a 12-layer step had 84 such pads and 77 adds of whole-stack arrays (O(layers^2) traffic)."""
  cfg = tiny_cfg(n_layer=7)  # no other array has a leading 7 (num_holistic is 6)
  m = random_gpt(cfg)
  labels, q, z = codes(cfg)
  graphdef, state = nnx.split(m)
  loss = lambda s: sum(nnx.merge(graphdef, s).loss(labels, q, z))
  hlo = jax.jit(jax.grad(loss)).lower(state).compile().as_text()
  whole_stack = collections.Counter(
      m_.group(1) for m_ in re.finditer(rf'= f32\[{cfg.n_layer},[^\]]*\]\S* ([\w-]+)\(', hlo))
  stacked = len(jax.tree.leaves(nnx.state(m.blocks)))
  assert whole_stack['pad'] == 0 and whole_stack['add'] == 0, whole_stack
  assert whole_stack['concatenate'] <= stacked, whole_stack
  # the same for the loss's holistic / patch split of the hidden rows and of the 2V head
  b, t = labels.shape[0], cfg.seq_len
  assert not re.search(rf'= f32\[{b},{t},{cfg.dim}\]\S* pad\(', hlo)
  assert not re.search(rf'= f32\[{cfg.dim},{2 * cfg.vocab_size}\]\S* pad\(', hlo)


def test_head_loss_backward_multiplies_at_the_operands_dtype():
  """The training head's CE: fp32 operands give autodiff's loss and gradients of the plain spelling;
  bf16 operands give the official autocast loss (a bf16 product, then `.float()`), bf16 gradients
  within 1 % of fp32's, and only bf16 x bf16 products (autodiff of an fp32-output product would
  multiply the fp32 cotangent by bf16 operands: an fp32 GEMM on the GPU). No scatter either: the
  picked logit's gradient is an iota compare, which XLA fuses with the cast."""
  kh, kw, kt = jax.random.split(jax.random.key(7), 3)
  h = jax.random.normal(kh, (3, 10, 32), jnp.float32)
  w = jax.random.normal(kw, (32, 48), jnp.float32) * 0.2
  t = jax.random.randint(kt, (3, 10), 0, 48)

  def plain(h, w, t):
    x = jnp.einsum('...d,dv->...v', h, w).astype(jnp.float32)
    return jnp.mean(jax.nn.logsumexp(x, -1) - jnp.take_along_axis(x, t[..., None], -1)[..., 0])
  ref = jax.grad(plain, argnums=(0, 1))(h, w, t)
  np.testing.assert_allclose(float(head_cross_entropy(h, w, t)), float(plain(h, w, t)), rtol=1e-6)
  got = jax.grad(head_cross_entropy, argnums=(0, 1))(h, w, t)
  for a, b in zip(got, ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  h16, w16 = h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  assert float(head_cross_entropy(h16, w16, t)) == float(plain(h16, w16, t))  # the official rounding
  np.testing.assert_allclose(float(head_cross_entropy(h16, w16, t)), float(plain(h, w, t)), rtol=1e-2)
  got16 = jax.grad(head_cross_entropy, argnums=(0, 1))(h16, w16, t)
  for a, b in zip(got16, ref):
    assert a.dtype == jnp.bfloat16
    a = np.asarray(a, np.float32)
    assert np.isfinite(a).all()
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-2
  jaxpr = jax.make_jaxpr(jax.grad(head_cross_entropy, argnums=(0, 1)))(h16, w16, t)
  eqns = _all_eqns(jaxpr.jaxpr)
  dots = [e for e in eqns if e.primitive.name == 'dot_general']
  assert len(dots) == 3  # forward and the two backward products
  for e in dots:
    assert {v.aval.dtype for v in e.invars} == {jnp.dtype(jnp.bfloat16)}, e
  assert not [e for e in eqns if 'scatter' in e.primitive.name]


def test_cross_entropy_gradient_is_softmax_minus_onehot_at_large_logits():
  """The CE's own backward against autodiff's, with logits large enough that a naive exp overflows."""
  x = jax.random.normal(jax.random.key(3), (4, 5, 64), jnp.float32) * 200.0
  t = jax.random.randint(jax.random.key(4), (4, 5), 0, 64)
  ref = lambda x: jnp.mean(jax.nn.logsumexp(x, -1) - jnp.take_along_axis(x, t[..., None], -1)[..., 0])
  np.testing.assert_allclose(float(cross_entropy(x, t)), float(ref(x)), rtol=1e-6)
  g = np.asarray(jax.grad(cross_entropy)(x, t))
  assert np.isfinite(g).all()
  np.testing.assert_allclose(g, np.asarray(jax.grad(ref)(x)), atol=2e-6)


def test_gpt_logits_accumulate_in_fp32_and_backpropagate_in_the_operands_dtype():
  """GPT.logits' head (teacher forcing, inference) keeps fp32 products, as the decode step's; its
  backward: autodiff's gradients for fp32 operands, bf16-only products for bf16 ones."""
  kh, kw = jax.random.split(jax.random.key(9))
  h = jax.random.normal(kh, (3, 10, 32), jnp.float32)
  w = jax.random.normal(kw, (32, 48), jnp.float32) * 0.2
  np.testing.assert_array_equal(np.asarray(logits_fp32(h, w)), np.asarray(h @ w))
  h16, w16 = h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  out = logits_fp32(h16, w16)
  assert out.dtype == jnp.float32
  exact = np.asarray(h16, np.float32) @ np.asarray(w16, np.float32)
  np.testing.assert_allclose(np.asarray(out), exact, rtol=1e-5, atol=1e-5)  # not bf16-rounded
  assert np.abs(np.asarray(out) - np.asarray(out.astype(jnp.bfloat16), np.float32)).max() > 0
  loss = lambda h, w: jnp.sum(jnp.sin(logits_fp32(h, w)))
  plain = lambda h, w: jnp.sum(jnp.sin(h @ w))
  for a, b in zip(jax.grad(loss, argnums=(0, 1))(h, w), jax.grad(plain, argnums=(0, 1))(h, w)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  dots = [e for e in _all_eqns(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(h16, w16).jaxpr)
          if e.primitive.name == 'dot_general']
  assert len(dots) == 3
  for e in dots[1:]:
    assert {v.aval.dtype for v in e.invars} == {jnp.dtype(jnp.bfloat16)}, e
  # the bf16 backward's values: the cotangent rounded once to bf16, products accumulated in fp32,
  # so each gradient is within a few bf16 steps of the fp32 gradient on the same operands
  up = lambda a: a.astype(jnp.float32)
  for a, r in zip(jax.grad(loss, argnums=(0, 1))(h16, w16), jax.grad(plain, argnums=(0, 1))(up(h16), up(w16))):
    a, r = np.asarray(a, np.float32), np.asarray(r)
    assert np.linalg.norm(a - r) <= 1e-2 * np.linalg.norm(r)


def test_cross_entropy_negative_targets_count_from_the_end():
  x = jax.random.normal(jax.random.key(5), (2, 3, 16), jnp.float32)
  t = jnp.array([[0, -1, 5], [-16, 15, -3]])
  np.testing.assert_allclose(float(cross_entropy(x, t)), float(cross_entropy(x, t % 16)), rtol=1e-7)
  np.testing.assert_array_equal(np.asarray(jax.grad(cross_entropy)(x, t)),
                                np.asarray(jax.grad(cross_entropy)(x, t % 16)))


def _all_eqns(jaxpr):
  """Every equation of a jaxpr, inside custom_vjp / pjit bodies too."""
  for e in jaxpr.eqns:
    yield e
    for p in e.params.values():
      inner = getattr(p, 'jaxpr', p)
      if hasattr(inner, 'eqns'):
        yield from _all_eqns(inner)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('scan', [False, True])
def test_two_qkv_products_match_one(dtype, scan):
  """qkv_gemms=2 (q|k and v as two products on column splits of wqkv) computes the same loss and
  gradients as the one (dim, 3 dim) product, in fp32 and in bf16 (where each output column is
  the same dot product, so it stays within bf16 rounding of the fp32 reference)."""
  cfg = tiny_cfg(n_layer=3, token_dropout=0.1, resid_dropout=0.1, ffn_dropout=0.1,
                 scan_layers=scan, dtype=dtype)
  labels, q, z = codes(cfg)
  out = {}
  for gemms, dt in ((1, 'float32'), (1, dtype), (2, dtype)):
    m = random_gpt(dataclasses.replace(cfg, qkv_gemms=gemms, dtype=dt))
    graphdef, params = nnx.split(m)
    loss = lambda p: sum(nnx.merge(graphdef, p, copy=True).loss(labels, q, z, rng=jax.random.key(3)))
    l, g = jax.value_and_grad(loss)(params)
    out[gemms, dt] = (float(l), [np.asarray(a, np.float32) for a in jax.tree.leaves(g)])
  ref_l, ref_g = out[1, 'float32']
  new_l, new_g = out[2, dtype]
  same_l, same_g = out[1, dtype]
  tight = dtype == 'float32'
  assert new_l == pytest.approx(same_l, rel=1e-6 if tight else 2e-3)
  assert new_l == pytest.approx(ref_l, rel=1e-6 if tight else 1e-2)
  for a, b, r in zip(new_g, same_g, ref_g):
    scale = float(np.abs(r).max()) + 1e-12
    np.testing.assert_allclose(a, b, atol=(1e-6 if tight else 2e-2) * scale)
    np.testing.assert_allclose(a, r, atol=(1e-5 if tight else 5e-2) * scale)


def test_two_qkv_products_drop_the_activation_sized_split_and_concatenate():
  """With qkv_gemms=2 the gradient concatenates only dq|dk (B, T, 2 dim), not (B, T, 3 dim), and
  v is not sliced off a wider projection; with qkv_gemms=1 both are there (so this can fail)."""
  cfg = tiny_cfg(dim=48, n_head=4, n_layer=3)
  labels, q, z = codes(cfg)
  b, t, d = labels.shape[0], cfg.seq_len, cfg.dim
  ops = {}
  for gemms in (1, 2):
    m = random_gpt(dataclasses.replace(cfg, qkv_gemms=gemms))
    graphdef, state = nnx.split(m)
    loss = lambda s: sum(nnx.merge(graphdef, s).loss(labels, q, z))
    hlo = jax.jit(jax.grad(loss)).lower(state).compile().as_text()
    ops[gemms] = collections.Counter(
        (int(m_.group(1)), m_.group(2))
        for m_ in re.finditer(rf'= f32\[{b},{t},(\d+)\]\S* (concatenate|slice)\(', hlo))
  assert ops[1][3 * d, 'concatenate'] == cfg.n_layer, ops[1]
  assert ops[2][3 * d, 'concatenate'] == 0, ops[2]
  # (XLA may keep a concatenate both in a fusion and outside it: at least one per layer)
  assert ops[2][2 * d, 'concatenate'] >= ops[1][2 * d, 'concatenate'] + cfg.n_layer, (ops[1], ops[2])
  assert ops[2][d, 'slice'] == ops[1][d, 'slice'] - cfg.n_layer, (ops[1], ops[2])
  with pytest.raises(ValueError, match='qkv_gemms'):
    tiny_cfg(qkv_gemms=3)


def test_holistic_positions_reach_only_the_first_rows_and_their_gradient_is_unchanged():
  """`GPT.pos_add` is the S-row table, added to the first S rows of q and k (`Block.positions`):
  the same values and gradients as adding a T-row table that is zero past S (the previous
  spelling), and no T-row table in the gradient's program."""
  cfg = tiny_cfg(n_head=2)
  blk = Block(cfg, rngs=nnx.Rngs(4))
  t, s = cfg.num_holistic + 10, cfg.num_holistic
  x = jax.random.normal(jax.random.key(1), (3, t, cfg.dim))
  table = jax.random.normal(jax.random.key(2), (s, cfg.dim))
  gpt = GPT(cfg, rngs=nnx.Rngs(6))
  _, cos, sin = gpt.position_tables(t)
  padded = lambda tb: jnp.concatenate([tb, jnp.zeros((t - s, cfg.dim))], 0)
  w = jax.random.normal(jax.random.key(3), (3, t, cfg.n_head, cfg.head_dim))
  new = lambda tb: sum(jnp.sum(a * w) for a in blk.qkv(x, tb, cos, sin))
  old = lambda tb: new(padded(tb))
  np.testing.assert_allclose(new(table), old(table), rtol=1e-6)
  g_new, g_old = jax.grad(new)(table), jax.grad(old)(table)
  np.testing.assert_allclose(g_new, g_old, rtol=1e-5, atol=1e-6)
  assert gpt.pos_add(t).shape == (s, cfg.dim) and gpt.pos_add(4).shape == (4, cfg.dim)

  def reduced_shapes(jaxpr):  # operands of every sum over the batch axis, nested jaxprs included
    out = []
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'reduce_sum' and tuple(eqn.params['axes']) == (0,):
        out.append(tuple(eqn.invars[0].aval.shape))
      for sub in jax.core.jaxprs_in_params(eqn.params):
        out += reduced_shapes(sub)
    return out
  full_rows = (3, t, cfg.n_head, cfg.head_dim)
  assert full_rows in reduced_shapes(jax.make_jaxpr(jax.grad(old))(table).jaxpr)
  assert full_rows not in reduced_shapes(jax.make_jaxpr(jax.grad(new))(table).jaxpr)
