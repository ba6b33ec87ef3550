"""hita_jax: a JAX/Flax NNX reimplementation of Hita (holistic tokenizer + AR generator)."""
import flax as _flax

# Parameters are placed on the mesh by our own `jax.jit(..., out_shardings=...)` path
# (hita_jax.sharding), so NNX's eager sharding, which needs a mesh at construction, stays off.
_flax.config.update('flax_always_shard_variable', False)

__version__ = '0.1.0'
