"""Analytic FLOP counts for MFU.

GPT training FLOPs per token follow the convention of the official-code anchor
(`shared/bench/official_bench.py`), so MFU numbers are comparable with it:
    6 * N_matmul + 12 * L * d * T
with N_matmul = transformer-layer parameters + output head (embedding lookups cost nothing) and
12*L*d*T the QK^T and AV products of full (non-causal) attention, fwd + bwd. A causal kernel does
about half of that attention work; `causal=True` counts it that way (MaxText's convention).
"""
from __future__ import annotations

import jax

from hita_jax.models.gpt import GPTConfig

PEAK_FLOPS = {'H100': 989e12, 'H200': 989e12, 'v5p': 459e12, 'v6e': 918e12, 'A100': 312e12}


def gpt_matmul_params(cfg: GPTConfig) -> int:
  d, f = cfg.dim, cfg.ffn_hidden
  per_layer = d * 3 * d + d * d + 3 * d * f + 2 * d  # wqkv, wo, w1/w3/w2, two RMSNorm weights
  return cfg.n_layer * per_layer + d * 2 * cfg.vocab_size


def gpt_train_flops_per_token(cfg: GPTConfig, seq_len: int | None = None, *, causal: bool = False) -> float:
  t = seq_len or cfg.seq_len
  attn = (6 if causal else 12) * cfg.n_layer * cfg.dim * t
  return 6.0 * gpt_matmul_params(cfg) + attn


def mfu(tokens_per_second: float, flops_per_token: float, peak: float = 989e12) -> float:
  return tokens_per_second * flops_per_token / peak


def device_peak_flops(device=None) -> float | None:
  """Dense bf16 peak of a known accelerator, from its device kind; None when unknown (CPU)."""
  kind = (device or jax.devices()[0]).device_kind
  for name, peak in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return peak
  return None
