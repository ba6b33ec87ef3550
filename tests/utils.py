"""Shared helpers for tests: tiny models and inputs."""
import jax
import numpy as np
from flax import nnx

from hita_jax import config_lib
from hita_jax.models.tokenizer import Tokenizer


def tiny_tokenizer_config(variant='V', **overrides):
  return config_lib.tokenizer_config_from(config_lib.tokenizer_model_config(variant, tiny=True, **overrides))


def tiny_tokenizer(variant='V', seed=0, **overrides):
  return Tokenizer(tiny_tokenizer_config(variant, **overrides), rngs=nnx.Rngs(seed))


def random_images(b=2, size=64, seed=0):
  return np.random.RandomState(seed).uniform(-1, 1, (b, size, size, 3)).astype(np.float32)


def param_leaves(module, filt=nnx.Param):
  return jax.tree.leaves(nnx.state(module, filt))
