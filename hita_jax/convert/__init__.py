"""Weight import/export between the official PyTorch layouts and hita_jax parameters."""
