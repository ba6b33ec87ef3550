"""Building blocks shared by the tokenizer, DINOv2 and the GPT: dense/conv with logical axis names,
fp32 norms, attention with one implementation switch, the tokenizer's fused SwiGLU."""
from __future__ import annotations

import contextlib
import functools
import math
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


def _plain(m: nnx.Conv, x) -> bool:
  """A plain NHWC 2-D convolution: no mask, groups, dilation or padding mode other than SAME /
  VALID (what `conv` builds)."""
  return (m.mask is None and m.feature_group_count == 1 and x.ndim == 4
          and m.preferred_element_type is None and m.padding in ('SAME', 'VALID')
          and all(d in (None, 1, (1, 1)) for d in (m.input_dilation, m.kernel_dilation)))


# How a 1x1, stride-1 convolution runs (`conv_apply`, `conv_without_bias`). 'conv': as a
# convolution (cuDNN on GPU). 'gemm': as the same product over the channel axis (cuBLAS on GPU),
# equal up to summation order. Why: XLA autotunes each distinct cuDNN convolution over ~60 engine
# configurations (the Hita-V/16 step's 116 convolutions: 6,094 configurations, most of its 45 s of
# autotuning on an H100, docs/PERFORMANCE.md session 27), a GEMM over at most ~8, and the CNN's 56
# attention projections at 21 x 21 become one GEMM shape. 20 of the step's 86 distinct convolution
# shapes are 1x1. Opt-in until its compile and step times are measured on a GPU. Read when a
# program is traced.
CONV_1X1S = ('conv', 'gemm')
CONV_1X1 = 'conv'


def _as_gemm(m: nnx.Conv) -> bool:
  if CONV_1X1 not in CONV_1X1S:
    raise ValueError(f'layers.CONV_1X1 must be one of {CONV_1X1S}, got {CONV_1X1!r}')
  return (CONV_1X1 == 'gemm' and tuple(m.kernel_size) == (1, 1)
          and all(st == 1 for st in _strides(m)))


def conv_without_bias(m: nnx.Conv, x):
  """`m(x)` without its bias add, for a conv whose output goes straight into a GroupNorm that adds
  the bias itself (`group_norm(..., pre_bias=m.bias)`). Channels-last, no dilation or mask."""
  if not _plain(m, x):
    raise ValueError('conv_without_bias takes a plain NHWC 2-D convolution (no mask, groups, '
                     'dilation or padding mode other than SAME / VALID)')
  x, kernel = m.promote_dtype((x, m.kernel[...]), dtype=m.dtype)
  if _as_gemm(m):  # a 1x1 kernel pads nothing under SAME or VALID
    return jnp.einsum('nhwc,cd->nhwd', x, kernel[0, 0], precision=m.precision)
  return m.conv_general_dilated(x, kernel, _strides(m), m.padding,
                                dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=m.precision)


def _strides(m: nnx.Conv) -> tuple:
  strides = 1 if m.strides is None else m.strides
  return (strides,) * 2 if isinstance(strides, int) else tuple(strides)


# The CNN convolutions' bias gradient (`conv_apply`). 'xla': nnx.Conv adds its bias and autodiff
# reduces dy over (N, H, W), one column reduction per conv (7.7 ms of the Hita-V/16 step on an
# H100, 2026-12-06 profile). 'sums': the same add under a custom VJP whose bias gradient is the fp32
# per-channel sums over the spatial axes in SPATIAL_SUM's spelling, then over the batch (the
# spelling that made the GroupNorm's sums faster on GPU). Opt-in: no gain on an H100 (2026-12-06,
# session 25: the CNN's forward + backward +0.3 %, `bench cnn_train` variant 'bias_sums'); read
# when a program is traced.
CONV_BIASES = ('xla', 'sums')
CONV_BIAS = 'xla'


def conv_apply(m: nnx.Conv, x):
  """`m(x)`, with the bias gradient per CONV_BIAS and 1x1 kernels per CONV_1X1."""
  if CONV_BIAS not in CONV_BIASES:
    raise ValueError(f'layers.CONV_BIAS must be one of {CONV_BIASES}, got {CONV_BIAS!r}')
  sums = CONV_BIAS == 'sums' and m.bias is not None
  gemm = _plain(m, x) and _as_gemm(m)
  if not (sums or gemm):
    return m(x)
  y = conv_without_bias(m, x)  # the 1x1 product or the plain convolution
  if m.bias is None:
    return y
  if sums:
    return channel_bias_add(y, m.bias[...])
  # nnx.Conv's bias add: the bias promoted to the compute dtype, then added
  return y + m.bias[...].astype(m.dtype or x.dtype)


@jax.custom_vjp
def channel_bias_add(y, bias):
  """y + bias over the last axis, the bias cast to y's dtype first (as nnx.Conv adds it)."""
  return y + bias.astype(y.dtype)


def _channel_bias_add_fwd(y, bias):
  return channel_bias_add(y, bias), bias


def _channel_bias_add_bwd(bias, dy):
  sums = _spatial_sums((dy.astype(jnp.float32),), tuple(range(1, dy.ndim - 1)))[0]
  return dy, jnp.sum(sums, tuple(range(dy.ndim - 1))).astype(bias.dtype)


channel_bias_add.defvjp(_channel_bias_add_fwd, _channel_bias_add_bwd)


def _norm_args() -> dict:
  """fp32 params and statistics, two-pass variance (as PyTorch), logical name 'norm'."""
  return dict(dtype=jnp.float32, param_dtype=jnp.float32, use_fast_variance=False,
              scale_init=named(nnx.initializers.ones, ('norm',)),
              bias_init=named(nnx.initializers.zeros, ('norm',)))


class _Fp32Norm(nnx.Module):
  """A norm computed in fp32 (an fp32 island), output cast back to the input dtype."""

  def __call__(self, x):
    return self.norm(x.astype(jnp.float32)).astype(x.dtype)


# How a LayerNorm's statistics meet its normalisation. 'split' (default): the row mean and variance
# are computed behind an optimization barrier, so XLA cannot fuse the two reductions with the
# normalisation into one (Triton) normalisation fusion. The arithmetic is nnx.LayerNorm's
# (two-pass variance, y = (x - mean) * (rsqrt(var + eps) * scale) + bias, fp32); what changes is
# the GPU compile: XLA's priority fusion priced those fusions and their backward slowly, and in the
# Hita-V/16 step the transformers' LayerNorms cost it ~10 s of ~16 (H100 target, deviceless
# compile, 2026-12-07; with lpips.TAP_NORM='split' it fell to ~6 s). It costs one more small kernel
# per norm. 'fused' is nnx.LayerNorm itself, for A/B runs (`--set layers.LAYER_NORM=fused`).
# Read at trace time.
LAYER_NORMS = ('split', 'fused')
LAYER_NORM = 'split'


class LayerNorm(_Fp32Norm):

  def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(dim, epsilon=eps, rngs=rngs, **_norm_args())

  def __call__(self, x):
    if LAYER_NORM not in LAYER_NORMS:
      raise ValueError(f'layers.LAYER_NORM must be one of {LAYER_NORMS}, got {LAYER_NORM!r}')
    if LAYER_NORM == 'fused':
      return super().__call__(x)
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)  # two-pass, as PyTorch
    mean, var = jax.lax.optimization_barrier((mean, var))
    mul = jax.lax.rsqrt(var + self.norm.epsilon) * self.norm.scale[...]
    return ((xf - mean) * mul + self.norm.bias[...]).astype(x.dtype)


NORM_IMPLS = ('fused', 'fused_recompute', 'fused_nofold', 'xla')


class GroupNorm(nnx.Module):
  """torch.nn.GroupNorm(32, C, eps=1e-6) on channels-last input, in fp32, optionally followed by
  swish: `norm(x, swish=True)` is the CNN's GN -> swish pair in one op (`group_norm`).

  impl: 'fused' / 'fused_nofold' = `group_norm`'s hand-written backward; 'fused_recompute' = the
  same with `backward='recompute'`; 'xla' = autodiff of the same forward formula, for A/B timing
  and backends where the custom VJP does not pay. The CNN folds each ResnetBlock's conv1 bias into
  norm2 only under 'fused' and 'fused_recompute'."""

  def __init__(self, dim: int, *, groups: int = 32, eps: float = 1e-6, impl: str = 'fused',
               rngs: nnx.Rngs):
    if impl not in NORM_IMPLS:
      raise ValueError(f'GroupNorm impl must be one of {NORM_IMPLS}, got {impl!r}')
    # nnx.GroupNorm holds the parameters (checkpoint paths .../norm/{scale,bias}) and settings;
    # `group_norm` computes it.
    self.norm = nnx.GroupNorm(dim, num_groups=groups, epsilon=eps, rngs=rngs, **_norm_args())
    self.impl = impl

  def __call__(self, x, *, swish: bool = False, pre_bias=None):
    n = self.norm
    if self.impl == 'xla':
      return _group_norm_fwd(x, n.scale[...], n.bias[...], n.num_groups, n.epsilon, swish, pre_bias)[0]
    backward = 'recompute' if self.impl == 'fused_recompute' else 'shared'
    return group_norm(x, n.scale[...], n.bias[...], n.num_groups, n.epsilon, swish, pre_bias, backward)


def _group_axes(shape, groups: int):
  """The axes of the grouped (N, ..., G, C/G) array a group's statistics reduce over, and the
  number of elements in a group."""
  n = len(shape)
  return tuple(range(1, n - 1)) + (n,), math.prod(shape) // (shape[0] * groups)


def _grouped(x, groups: int, pre_bias=None):
  """(N, ..., C) -> fp32 (N, ..., G, C/G), plus the preceding conv's bias if given (added here in
  fp32, see group_norm), with `_group_axes`."""
  xg = x.astype(jnp.float32).reshape(*x.shape[:-1], groups, x.shape[-1] // groups)
  if pre_bias is not None:
    xg = xg + pre_bias.astype(jnp.float32).reshape(xg.shape[-2:])
  return (xg, *_group_axes(x.shape, groups))


# How the per-channel sums over the spatial axes are spelled; the numbers are equal up to fp32
# summation order. 'flat': one reduce over all spatial axes. 'split': the last spatial axis first,
# then the rest on that small result (an optimization barrier keeps XLA from merging the two
# reduces back). 'variadic': the sums of one pass as one variadic reduce. 'auto' = 'split' when
# the default backend is a GPU (the CNN encoder + decoder's forward + backward at 336 px, batch 16:
# 3.9 % faster than 'flat' on an H100, twice; 'variadic' 5.8 % slower; docs/PERFORMANCE.md session
# 24), 'flat' elsewhere. Read when a program is traced (as the attention's 'auto'): set it before
# the first trace. A/B: `python -m hita_jax.tools.bench gn_sums` and `bench cnn_train`.
SPATIAL_SUMS = ('auto', 'flat', 'split', 'variadic')
SPATIAL_SUM = 'auto'
# group_norm's backward: how it meets dy twice. 'shared': one expression of dy * swish'(y), which
# XLA's GPU fusion writes out in fp32 from the reduction kernel and reads back for dx (two extra
# x-sized fp32 passes, seen in the optimized HLO). 'recompute': the dx kernel recomputes it from
# (x, dy) behind an optimization barrier, and the per-channel sums of x-hat come from the forward's
# sums of x (under the conv-bias fold one full-size reduction fewer; XLA's GPU fusion had made it
# a pass of its own). On an H100 (2026-12-06, session 25) with the GPU's 'split' sums: the norm's
# forward + backward at 336 px 11.8 -> 9.0 passes of x (`bench gn_sums`), the CNN's forward +
# backward -5.6 %, the Hita-V/16 step -4.3 %; with 'flat' sums no gain. The tokenizer's default
# (tokenizer.cnn_norm_impl='fused_recompute').
GN_BACKWARDS = ('shared', 'recompute')


def _spelling() -> str:
  if SPATIAL_SUM not in SPATIAL_SUMS:
    raise ValueError(f'layers.SPATIAL_SUM must be one of {SPATIAL_SUMS}, got {SPATIAL_SUM!r}')
  if SPATIAL_SUM == 'auto':
    return 'split' if jax.default_backend() == 'gpu' else 'flat'
  return SPATIAL_SUM


def _spatial_sums(arrays, axes):
  """Per-channel sums of each array over the spatial `axes` (kept as size-1 dims), one pass."""
  arrays, spelling = tuple(arrays), _spelling()
  if spelling == 'split' and len(axes) > 1:
    parts = jax.lax.optimization_barrier(tuple(jnp.sum(a, axes[-1], keepdims=True) for a in arrays))
    return tuple(jnp.sum(p, axes[:-1], keepdims=True) for p in parts)
  if spelling == 'variadic' and len(arrays) > 1:
    zeros = tuple(jnp.zeros((), a.dtype) for a in arrays)
    sums = jax.lax.reduce(arrays, zeros, lambda u, v: tuple(p + q for p, q in zip(u, v)), axes)
    return tuple(jnp.expand_dims(t, axes) for t in sums)
  return tuple(jnp.sum(a, axes, keepdims=True) for a in arrays)


def _group_norm_fwd(x, scale, bias, groups, eps, swish, pre_bias, backward='shared'):
  # Checked here: under differentiation JAX runs this, not group_norm's body, which calls it too.
  if backward not in GN_BACKWARDS:
    raise ValueError(f'group_norm backward must be one of {GN_BACKWARDS}, got {backward!r}')
  xg, axes, count = _grouped(x, groups, pre_bias)
  gshape = xg.shape[-2:]
  # Two-pass variance in fp32, as torch (autocast runs group_norm in fp32) and flax's GroupNorm.
  # Each group sum is a per-channel sum over the spatial axes (a reduction that keeps the minor
  # axis), then a sum over the group's channels on the small result.
  spatial = axes[:-1]
  channel_sums = _spatial_sums((xg,), spatial)[0]               # (N, 1.., G, C/G)
  mean = jnp.sum(channel_sums, -1, keepdims=True) / count
  var = jnp.sum(_spatial_sums((jnp.square(xg - mean),), spatial)[0], -1, keepdims=True) / count
  rstd = jax.lax.rsqrt(var + eps)
  y = (xg - mean) * (rstd * scale.reshape(gshape)) + bias.reshape(gshape)
  if swish:  # in fp32 like torch, whose GN output under autocast is fp32; one rounding after it
    y = y * jax.nn.sigmoid(y)
  return y.reshape(x.shape).astype(x.dtype), (x, mean, rstd, channel_sums, scale, bias, pre_bias)


def _xhat_and_dy(x, dy, mean, rstd, scale, bias, pre_bias, groups, swish):
  """(x-hat, dy * d swish(y) / dy) in fp32, grouped, recomputed from x and the statistics."""
  xg, _, _ = _grouped(x, groups, pre_bias)
  gshape = xg.shape[-2:]
  xhat = (xg - mean) * rstd
  dyg = dy.astype(jnp.float32).reshape(xg.shape)
  if swish:
    y = xhat * scale.reshape(gshape) + bias.reshape(gshape)
    s = jax.nn.sigmoid(y)
    dyg = dyg * (s * (1.0 + y * (1.0 - s)))
  return xhat, dyg


def _group_norm_bwd(groups, eps, swish, backward, res, dy):
  """Two passes over (x, dy): per-(sample, channel) sums of dy and dy*xhat, then dx. x is saved
  instead of the normalised (and swished) activations; they are recomputed in each pass. The
  pre-bias gradient (the per-channel sum of dx) comes from per-channel sums."""
  del eps
  x, mean, rstd, channel_sums, scale, bias, pre_bias = res
  axes, count = _group_axes(x.shape, groups)
  spatial = axes[:-1]
  gshape = (groups, x.shape[-1] // groups)
  sc = scale.reshape(gshape)
  per_image = count // gshape[-1]                               # spatial positions
  xhat, dyg = _xhat_and_dy(x, dy, mean, rstd, scale, bias, pre_bias, groups, swish)
  recompute = backward == 'recompute'
  if pre_bias is not None and not recompute:  # (N, 1.., G, C/G) each, from one pass over (x, dy)
    sum_dy, sum_dy_xhat, sum_xhat = _spatial_sums((dyg, dyg * xhat, xhat), spatial)
  else:
    sum_dy, sum_dy_xhat = _spatial_sums((dyg, dyg * xhat), spatial)
    # sum over space of (x - mean) * rstd, from the forward's per-channel sums of x: no pass
    sum_xhat = rstd * (channel_sums - per_image * mean)
  a = jnp.sum(sum_dy * sc, -1, keepdims=True) / count           # group mean of dy*scale
  b = jnp.sum(sum_dy_xhat * sc, -1, keepdims=True) / count      # group mean of dy*scale*xhat
  if recompute:
    # New names for x and dy (and the sums' results, so the pass runs after them): XLA can no
    # longer share dy * swish'(y) between the reduction and this pass, so nothing is written out.
    x2, dy2, a, b = jax.lax.optimization_barrier((x, dy, a, b))
    xhat, dyg = _xhat_and_dy(x2, dy2, mean, rstd, scale, bias, pre_bias, groups, swish)
  dx = rstd * (dyg * sc - a - xhat * b)
  batch_axes = tuple(range(sum_dy.ndim - 2))
  dscale = jnp.sum(sum_dy_xhat, batch_axes).reshape(scale.shape)
  dbias = jnp.sum(sum_dy, batch_axes).reshape(bias.shape)
  dpre = None
  if pre_bias is not None:
    # sum over (N, spatial) of dx, from per-channel sums: no pass over dx (which the conv's own
    # bias gradient would be).
    dpre = jnp.sum(rstd * (sum_dy * sc - per_image * a - sum_xhat * b), batch_axes)
    dpre = dpre.reshape(pre_bias.shape).astype(pre_bias.dtype)
  return (dx.reshape(x.shape).astype(x.dtype), dscale.astype(scale.dtype),
          dbias.astype(bias.dtype), dpre)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 7))
def group_norm(x, scale, bias, groups: int, eps: float, swish: bool = False, pre_bias=None,
               backward: str = 'shared'):
  """GroupNorm over the last axis of `x` (N, ..., C) in fp32, optionally then swish, returned in
  x's dtype. Its VJP reads x and dy twice and writes dx once, where autodiff of the two-pass
  statistics and a separate swish made several more passes over full-resolution activations
  (the tokenizer step's largest non-convolution cost, docs/PERFORMANCE.md 2026-12-05e).

  `pre_bias` (C,): the bias of the convolution that produced `x` (which then runs without it), added
  here in fp32. Its gradient comes out of the backward's per-channel sums, where the conv's own
  bias gradient is a further reduction over the full-resolution dx.

  `backward`: 'shared' or 'recompute' (see GN_BACKWARDS); the gradients are equal up to rounding."""
  return _group_norm_fwd(x, scale, bias, groups, eps, swish, pre_bias, backward)[0]


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


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


ATTN_IMPLS = ('auto', 'xla', 'cudnn', 'splash', 'pallas')


def resolve_attn_impl(impl: str, platform: str | None = None) -> str:
  """'auto' -> the fused kernel of the platform: cuDNN flash attention on GPU, the Pallas splash
  kernel on TPU, the reference XLA path elsewhere (CPU). XLA cannot partition a Mosaic (splash)
  kernel ('Mosaic kernels cannot be automatically partitioned'), so on several TPU devices splash
  needs a mesh context (`jax.set_mesh`), under which it runs in a shard_map; without one 'auto'
  takes the XLA path there (cuDNN attention partitions itself)."""
  if impl not in ATTN_IMPLS:
    raise ValueError(f'attn_impl must be one of {ATTN_IMPLS}, got {impl!r}')
  if impl != 'auto':
    return impl
  platform = platform or jax.default_backend()
  if platform == 'tpu':
    mesh = jax.sharding.get_abstract_mesh()
    return 'splash' if jax.device_count() == 1 or not mesh.empty else 'xla'
  return {'gpu': 'cudnn', 'cuda': 'cudnn', 'rocm': 'cudnn'}.get(platform, 'xla')


def batch_mesh_axes(mesh, batch: int) -> tuple[str, ...]:
  """The mesh axes (in order; 'tensor' left out: it splits heads, not rows) whose product divides
  the batch: a kernel's shard_map splits the rows over them and keeps the rest replicated."""
  axes, n = [], 1
  for name in mesh.axis_names:
    if name != 'tensor' and batch % (n * mesh.shape[name]) == 0:
      axes.append(name)
      n *= mesh.shape[name]
  return tuple(axes)


def on_batch_shards(fn, args, split: tuple[int, ...], batch: int, n_out: int | None = None):
  """fn(*args) for a custom kernel (which XLA cannot partition): directly, or under the context mesh
  (`jax.set_mesh`) inside a shard_map that splits the arguments at positions `split` and every
  output over the mesh axes dividing `batch`, and replicates the other arguments (weights,
  scalars)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn(*args)
  rows = jax.sharding.PartitionSpec(batch_mesh_axes(mesh, batch) or None)
  rep = jax.sharding.PartitionSpec()
  in_specs = tuple(rows if i in split else rep for i in range(len(args)))
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs,
                       out_specs=rows if n_out is None else (rows,) * n_out, check_vma=False)(*args)


@contextlib.contextmanager
def kernel_tuning(table: dict, what: str, **kw):
  """Overrides a kernel module's launch-parameter table (`what` names it in errors) within the
  context. The parameters are in no jit cache key, so JAX's caches are cleared on entry and exit
  (a program traced with other parameters is traced again, not reused)."""
  unknown = set(kw) - set(table)
  if unknown:
    raise ValueError(f'unknown {what} parameter(s) {sorted(unknown)}; known: {sorted(table)}')
  old = dict(table)
  table.update(kw)
  jax.clear_caches()
  try:
    yield
  finally:
    table.clear()
    table.update(old)
    jax.clear_caches()


SPLASH_BLOCK = 128
CUDNN_BLOCK = 64  # cuDNN flash attention rejects lengths such as 457 / 569
# The Pallas (Triton) flash kernel's launch set: forward q / kv blocks, the backward's blocks (dq
# and dk/dv kernels), warps, pipeline stages. The length is padded to the largest block. On an H100
# (2026-12-06, `bench train_attn --size B --tune`) this set and (64, 64, 64, 4, 3) were the best of
# eight (within 1 %), and still slower than cuDNN in the backward (96 against 132 TFLOP/s).
TRITON_ATTN_TUNING = (64, 64, 64, 4, 2)


def full_attention(q, k, v, *, impl: str = 'xla'):
  """Unmasked attention without probability dropout (DINOv2, the holistic encoder's E_trans) on
  (B, T, H, D), by `impl` (see resolve_attn_impl): cuDNN's fused kernel for 16-bit inputs on GPU,
  which never writes the (B, H, T, S) fp32 logits and probabilities the reference `attention`
  makes in both passes; the reference otherwise (fp32 inputs, CPU, TPU)."""
  if resolve_attn_impl(impl) != 'cudnn' or q.dtype not in (jnp.bfloat16, jnp.float16):
    return attention(q, k, v)
  return padded_dot_product_attention(q, k, v, implementation='cudnn')


def padded_dot_product_attention(q, k, v, *, implementation: str | None):
  """jax.nn.dot_product_attention with both lengths padded to CUDNN_BLOCK: the padded keys are
  masked by their length, the padded query rows computed and dropped. (`implementation='xla'`
  runs the same padding on CPU, which is how the tests check it.)"""
  t, s = q.shape[1], k.shape[1]
  pad = lambda a, n: jnp.pad(a, ((0, 0), (0, n), (0, 0), (0, 0))) if n else a
  pk = (-s) % CUDNN_BLOCK
  o = jax.nn.dot_product_attention(
      pad(q, (-t) % CUDNN_BLOCK), pad(k, pk), pad(v, pk),
      key_value_seq_lengths=jnp.full((q.shape[0],), s, jnp.int32) if pk else None,
      implementation=implementation)
  return o[:, :t]


def causal_pad(t: int, impl: str) -> int:
  """Rows to append to a length-t causal sequence so that `causal_attention` with `impl` needs no
  padding of its own: a model pads its activations once (padded rows sit after every real row, so
  a causal mask keeps them out of every real row) instead of each layer padding q, k, v and
  slicing the output (with gradients, ~4 % of a GPT-B/64 training step on an H200). Only when the
  pad is at most 1/16 of t (cuDNN: 569 -> 576): every layer's GEMMs run on the padded rows too, so
  a large pad (splash: 569 -> 640) stays inside the attention call."""
  block = {'cudnn': CUDNN_BLOCK, 'splash': SPLASH_BLOCK,
           'pallas': max(TRITON_ATTN_TUNING[:3])}.get(resolve_attn_impl(impl))
  pad = (-t) % block if block else 0
  return pad if pad * 16 <= t else 0


def causal_attention(q, k, v, *, impl: str, dropout: Callable | None = None):
  """Causal self-attention on (B, T, H, D) by `impl` (see resolve_attn_impl). The fused kernels
  have no attention-probability dropout, so a non-None `dropout` always takes the XLA path.
  'splash' off TPU and 'pallas' (Triton) off GPU run their kernel in Pallas interpret mode (slow;
  for tests on CPU)."""
  impl = resolve_attn_impl(impl)
  t = q.shape[1]
  if dropout is not None or impl == 'xla':
    return attention(q, k, v, mask=causal_mask(t), dropout=dropout)
  if impl == 'cudnn':
    pad = (-t) % CUDNN_BLOCK  # causal: the padded keys come after every real query
    pq, pk, pv = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, k, v))
    return jax.nn.dot_product_attention(pq, pk, pv, is_causal=True, implementation='cudnn')[:, :t]
  kernel_platform = {'pallas': 'gpu', 'splash': 'tpu'}[impl]
  interpret = jax.default_backend() != kernel_platform  # CPU tests run the kernel's arithmetic
  fn = functools.partial(triton_causal_attention if impl == 'pallas' else splash_causal_attention,
                         interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    if not interpret and jax.device_count() > 1 and mesh.empty:
      # XLA cannot partition a Pallas kernel
      raise ValueError(f"attn_impl='{impl}' on several devices needs the mesh as context "
                       "(jax.set_mesh), so that the kernel runs per shard; the tasks do not set "
                       "it yet: use attn_impl='auto' or 'xla' (--config.gpt.attn_impl=auto)")
    return fn(q, k, v)
  # the kernel runs per shard: rows over the mesh axes that divide the batch, heads over 'tensor'
  heads = 'tensor' if 'tensor' in mesh.axis_names and q.shape[2] % mesh.shape['tensor'] == 0 else None
  spec = jax.sharding.PartitionSpec(batch_mesh_axes(mesh, q.shape[0]) or None, None, heads, None)
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q, k, v)


def triton_causal_attention(q, k, v, *, interpret: bool = False, tuning=None):
  """Causal attention through Pallas' Triton flash kernel (`jax.experimental.pallas.ops.gpu.
  attention.mha`, forward and backward; `interpret=True` runs it on CPU for tests). The length is
  padded to the largest block: padded keys sit after every real query, so the causal mask hides
  them, and the padded query rows are dropped."""
  from jax.experimental.pallas.ops.gpu import attention as pa
  bq, bk, bwd, warps, stages = tuning or TRITON_ATTN_TUNING
  t = q.shape[1]
  pad = (-t) % max(bq, bk, bwd)
  if pad:
    q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, k, v))
  blocks = pa.BlockSizes(block_q=bq, block_k=bk, block_q_dkv=bwd, block_kv_dkv=bwd, block_q_dq=bwd,
                         block_kv_dq=bwd)
  o = pa.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=True, block_sizes=blocks,
             num_warps=warps, num_stages=stages, interpret=interpret)
  return o[:, :t]


def splash_causal_attention(q, k, v, *, interpret: bool = False, block: int = SPLASH_BLOCK):
  """Causal attention through the Pallas TPU splash kernel (`interpret=True` runs it on CPU for
  tests). The sequence is padded to the block size; padded keys sit after every real query, so
  the causal mask already hides them."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  b, t, h, d = q.shape
  tp = t + (-t) % block
  mask = sm.MultiHeadMask([sm.CausalMask((tp, tp)) for _ in range(h)])
  blocks = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                         block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                         block_kv_dq=block)
  kernel = sk.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                              interpret=interpret)
  # (B, T, H, D) -> (B, H, Tp, D); the kernel does not scale q itself.
  prep = lambda a: jnp.pad(a.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, tp - t), (0, 0)))
  o = jax.vmap(kernel)(prep(q * jnp.asarray(d ** -0.5, q.dtype)), prep(k), prep(v))
  return o[:, :, :t].transpose(0, 2, 1, 3).astype(v.dtype)


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
