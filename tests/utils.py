"""Shared helpers for tests: tiny models and inputs."""
import jax
import numpy as np
from flax import nnx

from hita_jax import config_lib
from hita_jax.models.tokenizer import Tokenizer
from hita_jax.sharding import create_jitted


def tiny_tokenizer_config(variant='V', **overrides):
  return config_lib.tokenizer_config_from(config_lib.tokenizer_model_config(variant, tiny=True, **overrides))


def tiny_tokenizer(variant='V', seed=0, **overrides):
  # jitted init: one compile (cached across tests) instead of one per initializer shape
  return create_jitted(lambda: Tokenizer(tiny_tokenizer_config(variant, **overrides), rngs=nnx.Rngs(seed)))


def random_images(b=2, size=64, seed=0):
  return np.random.RandomState(seed).uniform(-1, 1, (b, size, size, 3)).astype(np.float32)


def param_leaves(module, filt=nnx.Param):
  return jax.tree.leaves(nnx.state(module, filt))


def assert_logits_as_close_as_xla(logits, xla_logits, ref):
  """A fused decode path's bf16 logits against the fp32 model's `ref`: within 5 % of its scale and
  no further from it than the XLA path's bf16 logits (x1.5 + 1e-3)."""
  ref = np.asarray(ref)
  err = np.abs(np.asarray(logits) - ref).max()
  err_xla = np.abs(np.asarray(xla_logits) - ref).max()
  assert err < 0.05 * np.abs(ref).max(), (err, err_xla)
  assert err <= 1.5 * err_xla + 1e-3, (err, err_xla)
