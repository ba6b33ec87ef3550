"""PatchGAN discriminator (pix2pix `NLayerDiscriminator`, as Hita-V trains with it), NHWC.

conv4 s2 -> LeakyReLU(0.2) -> [conv4 (no bias) -> BatchNorm -> LeakyReLU] x n (stride 2, last
stride 1) -> conv4 s1 to one logit per patch (40 x 40 at 336 px). BatchNorm follows PyTorch
exactly: training normalises with the biased batch variance and updates the running statistics
with momentum 0.1 and the *unbiased* variance; eval uses the running statistics.

`dtype` is the convolutions' compute dtype (parameters stay fp32, BatchNorm and the logits fp32):
the official trainer runs the discriminator under bf16 autocast, so its convolutions are bf16 there.

`groups` splits the batch into that many equal replicas that are normalised separately, as plain
BatchNorm2d under DDP does (statistics per GPU); the running statistics follow replica 0, whose
module the official trainer saves. groups=1 normalises over the whole batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class TorchBatchNorm(nnx.Module):

  def __init__(self, c: int, *, eps: float = 1e-5, momentum: float = 0.1, groups: int = 1,
               rngs: nnx.Rngs):
    self.eps, self.momentum, self.groups = eps, momentum, groups
    self.scale = nnx.Param(1.0 + 0.02 * jax.random.normal(rngs.params(), (c,)))  # official init
    self.bias = nnx.Param(jnp.zeros((c,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((c,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((c,), jnp.float32))
    self.use_running_average = False  # flipped by model.eval()

  def __call__(self, x):
    x = x.astype(jnp.float32)
    if self.use_running_average:
      return (x - self.mean[...]) * jax.lax.rsqrt(self.var[...] + self.eps) * self.scale[...] + self.bias[...]
    b, h, w, c = x.shape
    if b % self.groups:
      raise ValueError(f'batch {b} does not split into {self.groups} batch-norm replicas')
    xg = x.reshape(self.groups, b // self.groups, h, w, c)
    mean = jnp.mean(xg, axis=(1, 2, 3), keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=(1, 2, 3), keepdims=True)
    n = (b // self.groups) * h * w
    m = self.momentum
    self.mean[...] = (1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean[0, 0, 0, 0])
    self.var[...] = (1 - m) * self.var[...] + m * jax.lax.stop_gradient(var[0, 0, 0, 0]) * n / max(n - 1, 1)
    y = (xg - mean) * jax.lax.rsqrt(var + self.eps)
    return y.reshape(b, h, w, c) * self.scale[...] + self.bias[...]


def _conv(cin, cout, stride, bias, rngs, dtype=jnp.float32):
  return nnx.Conv(cin, cout, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)),
                  use_bias=bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=nnx.initializers.normal(0.02), rngs=rngs)


class PatchGAN(nnx.Module):

  def __init__(self, *, in_channels: int = 3, ndf: int = 64, n_layers: int = 3,
               batch_norm_groups: int = 1, dtype=jnp.float32, rngs: nnx.Rngs):
    convs, norms = [_conv(in_channels, ndf, 2, True, rngs, dtype)], []
    mult = 1
    for n in range(1, n_layers + 1):
      prev, mult = mult, min(2 ** n, 8)
      convs.append(_conv(ndf * prev, ndf * mult, 2 if n < n_layers else 1, False, rngs, dtype))
      norms.append(TorchBatchNorm(ndf * mult, groups=batch_norm_groups, rngs=rngs))
    convs.append(_conv(ndf * mult, 1, 1, True, rngs, dtype))
    self.convs = nnx.List(convs)
    self.norms = nnx.List(norms)

  def __call__(self, x):
    """(B, H, W, 3) in [-1, 1] -> patch logits (B, H', W', 1) in fp32."""
    h = jax.nn.leaky_relu(self.convs[0](x.astype(jnp.float32)), 0.2)
    for conv, norm in zip(self.convs[1:-1], self.norms):
      h = jax.nn.leaky_relu(norm(conv(h)), 0.2)
    return self.convs[-1](h).astype(jnp.float32)
