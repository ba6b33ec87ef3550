"""`python -m tests.nonfinite_driver WORKDIR`: the tiny tokenizer run of tests/test_nonfinite.py with
all-white (then NaN inside the step) batches at steps 2, 4 and 5 and max_nonfinite_steps=2. Exits 3
with the NonFiniteError's message on stdout."""
import sys

import jax.numpy as jnp
import numpy as np

from hita_jax import errors, training
from hita_jax.tasks import train_tokenizer
from tests.faults_utils import tokenizer_config

POISONED = {2, 4, 5}


def main(workdir):
  real_unit, real_batch, calls = train_tokenizer.to_unit, training.global_batch, [0]
  # an all-white batch becomes NaN pixels inside the jitted step
  train_tokenizer.to_unit = lambda x: jnp.where(jnp.all(x == 255), jnp.nan, real_unit(x))

  def global_batch(local, shardings):
    calls[0] += 1
    if calls[0] in POISONED:
      local = {**local, 'image': np.full_like(local['image'], 255)}
    return real_batch(local, shardings)
  training.global_batch = global_batch
  try:
    train_tokenizer.run(tokenizer_config(steps=8, max_nonfinite_steps=2), workdir)
  except errors.NonFiniteError as e:
    print(e, flush=True)
    sys.exit(3)


if __name__ == '__main__':
  main(sys.argv[1])
