"""Flax NNX modules, one file per paper concept, plus the jitted sampler (`sampler`) and the
PyTorch/kornia-exact resize kernels (`resize`). Nothing here reads files: weights come through
`hita_jax.pretrained`."""
