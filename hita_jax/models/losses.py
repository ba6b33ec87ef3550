"""Tokenizer losses as the official `VQLoss` (vq_loss.py) computes them.

Generator: 2 x MSE (`rec_loss(l2) + F.mse_loss`), LPIPS mean (weight 1), `disc_weight *
softplus(-D(x_hat))` mean from the start step on (fixed weight 0.5, no adaptive weight), both
quantizers' vq + commit (+ entropy) terms, and for Hita-U `mean(1 - cos(DINOv2 patch features,
VFM prediction))`. Discriminator: `disc_weight * 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))`
from the start step on (before it the official code multiplies both adversarial terms by 0).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def hinge_d_loss(logits_real, logits_fake):
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real, logits_fake):
  return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


def softplus_g_loss(logits_fake):
  return jnp.mean(jax.nn.softplus(-logits_fake))


def hinge_g_loss(logits_fake):
  return -jnp.mean(logits_fake)


D_LOSSES = {'hinge': hinge_d_loss, 'vanilla': vanilla_d_loss}
G_LOSSES = {'softplus_g_loss': softplus_g_loss, 'hinge': hinge_g_loss}


def reconstruction_loss(x, x_hat):
  """Official pixel loss: `rec_loss(l2) + F.mse_loss` = 2 x MSE."""
  return 2.0 * jnp.mean(jnp.square(x.astype(jnp.float32) - x_hat.astype(jnp.float32)))


def adversarial_weight(step, disc_start: int, disc_weight: float):
  """`adopt_weight`: 0 before `disc_start`, `disc_weight` from then on."""
  return jnp.where(step < disc_start, 0.0, disc_weight)


def vfm_loss(target, prediction, eps: float = 1e-6):
  """Hita-U: mean(1 - cosine similarity) over the last axis, as the official loss computes it
  (`F.cosine_similarity(..., eps=1e-6)`: each vector divided by max(|v|, eps), as PyTorch 2 does)."""
  t, p = target.astype(jnp.float32), prediction.astype(jnp.float32)
  t = t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True), eps)
  p = p / jnp.maximum(jnp.linalg.norm(p, axis=-1, keepdims=True), eps)
  return jnp.mean(1.0 - jnp.sum(t * p, axis=-1))
