"""hita_jax: a JAX/Flax NNX reimplementation of Hita (holistic tokenizer + AR generator)."""
import importlib.util as _importlib_util
import os as _os

# CPU-only installs (CI, laptops, the demo): XLA 0.10's YNN convolution fusions run this model's
# small convolutions ~1.5x slower than XLA's own; measured on the 2-core CI machine, demo
# tokenizer step 0.70 -> 0.46 s. The flag must be in XLA_FLAGS before the CPU backend starts, so
# it is set on import; never when the user set it, or on a host with an accelerator plugin (their
# XLA parses the same variable), or on a jaxlib it was not measured on (unknown flags are fatal).
_YNN_FLAG = '--xla_cpu_experimental_ynn_fusion_type'


def _cpu_xla_defaults():
  flags = _os.environ.get('XLA_FLAGS', '')
  if _YNN_FLAG in flags:  # the user's own value (an empty one restores jaxlib's default)
    return
  try:
    from importlib.metadata import version
    if not version('jaxlib').startswith('0.10.'):
      return
  except Exception:  # no metadata (vendored jaxlib): leave XLA alone
    return
  for plugin in ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm7_plugin', 'libtpu'):
    if _importlib_util.find_spec(plugin) is not None:
      return
  _os.environ['XLA_FLAGS'] = f'{flags} {_YNN_FLAG}=-individual_convolution'.strip()


_cpu_xla_defaults()

import flax as _flax  # noqa: E402

# Parameters are placed on the mesh by our own `jax.jit(..., out_shardings=...)` path
# (hita_jax.sharding), so NNX's eager sharding, which needs a mesh at construction, stays off.
_flax.config.update('flax_always_shard_variable', False)

__version__ = '0.1.0'
