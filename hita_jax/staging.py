"""A training step as several jitted programs compiled at once, from a thread each.

Why: XLA compiles one program on one thread. The tokenizer trainer's step is one large program
(~33k fusions), and priority fusion alone prices each fusion for ~1 ms (2026-12-06 H200 lease), so
its compile is serial CPU work however many cores the host has. Cut into programs that are
compiled side by side (jaxlib releases the GIL while it compiles; the GPU autotuner still times its
candidates one program at a time), the same work takes less wall time. The price is what crosses
the cuts: the forward's residuals are written out once for the backward program, as in one program.

- `Carry`: values a program hands to a later one (e.g. a `jax.vjp` pullback, a pytree of residual
  arrays), minus the leaves that are the producer's own inputs. jit returns such leaves as the very
  same buffers, and the consumer may donate those inputs (the train state): passing them twice
  would donate a buffer that is also read. The consumer takes them from its own arguments instead.
- `leading_axis_shardings`: shardings for intermediate values before anything is compiled (the
  consumer is lowered from shapes while the producer compiles): arrays whose leading axis is the
  global batch are split over the batch axes, the rest replicated.
- `compile_all`: lowered programs compiled from a thread each.
"""
from __future__ import annotations

import concurrent.futures
import time

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from hita_jax import sharding


class Carry:
  """Packs a pytree inside the producer's trace and rebuilds it inside the consumer's.

  `pack(tree, inputs)` returns the leaves of `tree` that are not leaves of `inputs` (the producer's
  arguments, by identity) and remembers the tree's structure; `unpack(packed, inputs)`, traced
  after the producer, rebuilds the tree from `packed` and the consumer's copy of `inputs` (the same
  values, passed again). The structure is the last trace's: trace the producer before the consumer."""

  def __init__(self):
    self.treedef = None
    self.plan = None

  def pack(self, tree, inputs) -> list:
    leaves, self.treedef = jax.tree.flatten(tree)
    where = {id(x): i for i, x in enumerate(jax.tree.leaves(inputs))}
    self.plan = [where.get(id(leaf)) for leaf in leaves]
    return [leaf for leaf, i in zip(leaves, self.plan) if i is None]

  def unpack(self, packed, inputs):
    if self.treedef is None:
      raise RuntimeError('Carry.unpack before any pack: trace the producing program first')
    ins = jax.tree.leaves(inputs)
    it = iter(packed)
    leaves = [next(it) if i is None else ins[i] for i in self.plan]
    if next(it, None) is not None:
      raise RuntimeError('Carry.unpack: more packed values than the last pack made')
    return jax.tree.unflatten(self.treedef, leaves)


def leading_axis_shardings(tree, batch_sharding: NamedSharding, batch_size: int):
  """A sharding per array of `tree` (shapes): the batch axes of `batch_sharding` on the leading
  axis where it is the global batch (and divides), replicated otherwise."""
  mesh = batch_sharding.mesh
  axes = batch_sharding.spec[0] if len(batch_sharding.spec) else None
  shards = sharding.batch_shards(batch_sharding)

  def pick(a):
    if axes is not None and a.ndim and a.shape[0] == batch_size and batch_size % shards == 0:
      return NamedSharding(mesh, P(axes, *([None] * (a.ndim - 1))))
    return NamedSharding(mesh, P())
  return jax.tree.map(pick, tree)


def with_shardings(shapes, shardings):
  """ShapeDtypeStructs of `shapes` carrying `shardings` (a tree of shardings like `shapes`, or a
  prefix of it): to lower a consumer before its producer has run."""
  def one(s, sub):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), sub)
  return jax.tree.map(one, shardings, shapes, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))


def compile_all(lowered: list, parallel: bool = True) -> tuple[list, dict]:
  """Compiles each lowered program, from a thread each when `parallel`, -> (executables, timing):
  `timing` holds the wall time and each program's own compile time (their sum over the wall is how
  much the compiles overlapped)."""
  def one(low):
    t = time.perf_counter()
    exe = low.compile()
    return exe, time.perf_counter() - t

  t0 = time.perf_counter()
  if parallel and len(lowered) > 1:
    with concurrent.futures.ThreadPoolExecutor(len(lowered)) as pool:
      done = list(pool.map(one, lowered))
  else:
    done = [one(low) for low in lowered]
  wall = time.perf_counter() - t0
  return [exe for exe, _ in done], {'compile_wall_s': wall, 'compile_each_s': [s for _, s in done]}
