"""hita_jax.tools.bench_attn (`bench train_attn`) on the CPU: the Triton kernel in interpret mode
at a tiny layer shape; cuDNN is absent here and reported as an error, not a crash."""
from hita_jax.models.gpt import GPTConfig
from hita_jax.tools import bench, bench_attn


def test_train_attn_bench_times_each_kernel_and_checks_it(monkeypatch, capsys):
  cfg = GPTConfig(dim=32, n_layer=1, n_head=2, vocab_size=16, num_holistic=6, grid=4, num_classes=5)
  monkeypatch.setattr(bench_attn, 'TRITON_TUNE_GRID', [(16, 16, 16, 4, 2), (32, 16, 16, 4, 2)])
  res = bench_attn.bench_train_attn(cfg, batch=2, iters=1, rounds=1, tune=True)
  assert (res['seq_len'], res['heads'], res['head_dim']) == (cfg.seq_len, 2, 16)
  pallas = res['impls']['pallas']
  assert pallas['fwd_ms'] > 0 and pallas['fwd_bwd_ms'] > 0
  assert pallas['max_err'] < 5e-2  # bf16 inputs against the fp32 reference
  assert 'error' in res['impls']['cudnn']
  assert [r['tuning'] for r in res['tune']] == [[16, 16, 16, 4, 2], [32, 16, 16, 4, 2]]
  assert all(r['max_err'] < 5e-2 for r in res['tune'])
  # the bench CLI knows the kernel for the full training step too
  assert 'pallas' in bench.ATTN_IMPLS


def test_bench_records_name_the_xla_flags_they_ran_under(monkeypatch):
  """A record timed under $XLA_FLAGS (2026-12-06: the sampler with the exhaustive tiling search)
  carries them; one without carries none."""
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  assert 'xla_flags' not in bench.env_info()
  monkeypatch.setenv('XLA_FLAGS', '--xla_gpu_exhaustive_tiling_search=true')
  assert bench.env_info()['xla_flags'] == '--xla_gpu_exhaustive_tiling_search=true'
