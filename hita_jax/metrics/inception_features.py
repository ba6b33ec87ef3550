"""Inception activations of uint8 images, batched and sharded over the devices of a mesh: pool3
(FID, precision/recall), the sFID spatial features and the IS logits."""
from __future__ import annotations

import math
import time
from typing import Callable

import jax
import numpy as np
from flax import nnx

from hita_jax import sharding
from hita_jax.models.inception import InceptionV3, adm_preprocess, sfid_features


class InceptionRunner:
  """Batched, device-sharded Inception features of uint8 images."""

  def __init__(self, model: InceptionV3, batch_size: int = 500, mesh=None):
    self.mesh = mesh or sharding.make_mesh([('data', -1)])
    n = self.mesh.devices.size
    self.batch_size = max(n, int(math.ceil(batch_size / n)) * n)
    self.has_logits = bool(model.has_logits[...])
    graphdef, state = nnx.split(model)
    self.in_sharding = sharding.batch_sharding(self.mesh, [('batch', ('data',))], 4)

    @jax.jit
    def features(state, images_u8):
      m = nnx.merge(graphdef, state, copy=True)
      with jax.default_matmul_precision('highest'):
        out = m(adm_preprocess(images_u8))
      return out['pool3'], sfid_features(out['spatial']), out['logits']
    rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self._state = jax.tree.map(lambda x: sharding.put(x, rep), state)
    self._features = features

  def __call__(self, images: np.ndarray, progress: Callable[[int, int], None] | None = None):
    n = len(images)
    pools, spatials, logits = [], [], []
    for i in range(0, n, self.batch_size):
      batch = np.asarray(images[i:i + self.batch_size])
      real = len(batch)
      if real < self.batch_size:  # pad the last batch to the compiled shape
        batch = np.concatenate([batch, np.zeros((self.batch_size - real,) + batch.shape[1:], batch.dtype)])
      p, s, l = self._features(self._state, sharding.put(batch, self.in_sharding))
      p, s, l = sharding.to_host((p, s, l))  # the mesh may span several processes
      pools.append(p[:real])
      spatials.append(s[:real])
      logits.append(l[:real])
      if progress:
        progress(min(i + self.batch_size, n), n)
    return (np.concatenate(pools).astype(np.float64), np.concatenate(spatials).astype(np.float64),
            np.concatenate(logits).astype(np.float64))


def progress_printer(label: str):
  """A `progress(done, total)` callback printing images/s and ETA."""
  t0 = time.time()

  def report(done, total):
    el = time.time() - t0
    eta = el / max(done, 1) * (total - done)
    print(f'  {label}: {done}/{total} images, {done / max(el, 1e-9):.1f} img/s, ETA {eta:.0f}s',
          flush=True)
  return report
