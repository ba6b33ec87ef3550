"""The sampler's bandwidth floor (`bench hbm`): the bytes of a run by hand for GPT-B, and the
measurement's record on the CPU."""
from hita_jax.models.gpt import GPT_SIZES, GPTConfig
from hita_jax.tools.bench_floor import bench_hbm, sampler_bytes


def test_sampler_bytes_of_gpt_b_by_hand():
  cfg = GPTConfig(**GPT_SIZES['B'], vocab_size=16384, num_holistic=128, grid=21, num_classes=1000)
  d, h, layers = 768, 2048, 12  # SwiGLU hidden of B: 2/3 * 4 * 768 rounded up to 256
  per_layer = d * 3 * d + d * d + 3 * d * h + 2 * d  # wqkv, wo, w1 / w3 / w2, two norms
  per_step = layers * per_layer + d + d * 16384       # + final norm + one head half
  tokens = 128 + 441
  prefix = sum(1 + i for i in range(tokens))          # one class token, then the tokens so far
  b = sampler_bytes(cfg, 64)
  assert b['tokens'] == tokens and b['rows'] == 128
  assert b['weights_gb'] * 1e9 == tokens * per_step * 2
  assert b['kv_gb'] * 1e9 == layers * 2 * 128 * prefix * d * 2
  assert abs(b['total_gb'] - 876.19) < 0.01  # the figure docs/PERFORMANCE.md uses since 2026-12-04
  # without CFG (scale <= 1) the sampler runs one half: half the cache, the same weights
  b1 = sampler_bytes(cfg, 64, cfg_scale=1.0)
  assert b1['rows'] == 64 and b1['kv_gb'] * 2 == b['kv_gb'] and b1['weights_gb'] == b['weights_gb']


def test_hbm_bench_reports_rates_and_floors():
  res = bench_hbm(gb=0.01, iters=2, rounds=1, images=8, sizes=('B',))
  assert res['read_tb_s'] > 0 and res['copy_tb_s'] > 0
  floor = res['sampler_floor']['B']
  rate = max(res['read_tb_s'], res['copy_tb_s']) * 1e12
  assert abs(floor['floor_s'] - floor['total_gb'] * 1e9 / rate) < 1e-9 * floor['floor_s']
  assert abs(floor['floor_images_s'] * floor['floor_s'] - 8) < 1e-9
