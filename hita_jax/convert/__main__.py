"""`python -m hita_jax.convert`: this package holds the conversion library; the command line is
`python -m hita_jax.tools.convert`."""
from hita_jax import cli

cli.moved('hita_jax.convert', 'hita_jax.tools.convert')
