"""Building blocks shared by the tokenizer, DINOv2 and the GPT: dense/conv with logical axis names,
fp32 norms, attention with one implementation switch, the tokenizer's fused SwiGLU."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = Any
# Config strings -> compute dtypes (params are always fp32).
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def named(init: Callable, names: Sequence[str | None]) -> Callable:
  """Attaches logical axis names (mapped to mesh axes by `hita_jax.sharding`)."""
  return nnx.with_partitioning(init, tuple(names))


def torch_linear_init(fan_in: int) -> tuple[Callable, Callable]:
  """PyTorch's default nn.Linear / nn.Conv init (kaiming-uniform a=sqrt(5) == U(+-1/sqrt(fan_in)))."""
  bound = 1.0 / (fan_in ** 0.5)
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init, init


def dense(in_features: int, out_features: int, *, names=('embed', 'mlp'), use_bias: bool = True,
          dtype: Dtype = jnp.float32, rngs: nnx.Rngs) -> nnx.Linear:
  kinit, binit = torch_linear_init(in_features)
  return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype,
                    param_dtype=jnp.float32,
                    kernel_init=named(kinit, names),
                    bias_init=named(binit, (names[-1],)),
                    precision=None, rngs=rngs)


def conv(in_features: int, out_features: int, kernel: int, *, stride: int = 1, padding='SAME',
         use_bias: bool = True, dtype: Dtype = jnp.float32, rngs: nnx.Rngs) -> nnx.Conv:
  kinit, binit = torch_linear_init(in_features * kernel * kernel)
  return nnx.Conv(in_features, out_features, (kernel, kernel), strides=(stride, stride),
                  padding=padding, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=named(kinit, (None, None, 'conv_in', 'conv_out')),
                  bias_init=named(binit, ('conv_out',)), rngs=rngs)


def _norm_args() -> dict:
  """fp32 params and statistics, two-pass variance (as PyTorch), logical name 'norm'."""
  return dict(dtype=jnp.float32, param_dtype=jnp.float32, use_fast_variance=False,
              scale_init=named(nnx.initializers.ones, ('norm',)),
              bias_init=named(nnx.initializers.zeros, ('norm',)))


class _Fp32Norm(nnx.Module):
  """A norm computed in fp32 (an fp32 island), output cast back to the input dtype."""

  def __call__(self, x):
    return self.norm(x.astype(jnp.float32)).astype(x.dtype)


class LayerNorm(_Fp32Norm):

  def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(dim, epsilon=eps, rngs=rngs, **_norm_args())


class GroupNorm(_Fp32Norm):
  """torch.nn.GroupNorm(32, C, eps=1e-6) on NHWC."""

  def __init__(self, dim: int, *, groups: int = 32, eps: float = 1e-6, rngs: nnx.Rngs):
    self.norm = nnx.GroupNorm(dim, num_groups=groups, epsilon=eps, rngs=rngs, **_norm_args())


def attention(q, k, v, *, mask=None, dropout: Callable | None = None):
  """Multi-head attention on (B, T, H, D) inputs, scaled by 1/sqrt(D). `mask` is boolean, True =
  attend, broadcastable to (B, H, Tq, Tk). The softmax runs in fp32. `dropout` acts on the
  attention probabilities. (The GPT's fused cuDNN path lives in models/gpt.py.)"""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if dropout is not None:
    probs = dropout(probs)
  return jnp.einsum('bhqk,bkhd->bqhd', probs.astype(v.dtype), v)


def causal_mask(t: int) -> jnp.ndarray:
  return jnp.tril(jnp.ones((t, t), bool))


class SwiGLUFused(nnx.Module):
  """xformers-style SwiGLU of the tokenizer transformers: `w3(silu(a) * b)`, `a, b = w12(x)`.
  The hidden width is rounded as the official `SwiGLUFFNFused`: (int(h*2/3)+7)//8*8."""

  def __init__(self, dim: int, mlp_dim: int, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.hidden = (int(mlp_dim * 2 / 3) + 7) // 8 * 8
    self.w12 = dense(dim, 2 * self.hidden, names=('embed', 'mlp'), dtype=dtype, rngs=rngs)
    self.w3 = dense(self.hidden, dim, names=('mlp', 'embed'), dtype=dtype, rngs=rngs)

  def __call__(self, x):
    a, b = jnp.split(self.w12(x), 2, axis=-1)
    return self.w3(jax.nn.silu(a) * b)
