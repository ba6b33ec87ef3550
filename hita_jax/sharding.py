"""One device mesh from the config, logical axis names -> mesh axes, params born sharded.

Parameters carry logical axis names (`out_sharding` metadata, e.g. ('embed', 'mlp')); the config's
`logical_axis_rules` map each name to mesh axes. A dimension stays replicated when its mesh axes are
already used by another dimension of the same array or do not divide it, so one rule table serves
tiny CPU models and full-size pods alike.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from hita_jax.errors import UserError

Rules = Sequence[tuple[str, Any]]

# The one logical-rules table (configs copy it into `config.logical_axis_rules`, where a run can
# override it): batch over data x fsdp, weights' model dims over fsdp, heads/mlp/vocab over tensor.
DEFAULT_RULES: tuple = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('vocab', 'tensor'),
    ('conv_out', 'fsdp'),
    ('conv_in', None),
    ('norm', None),
    ('layers', None),
)


def parse_mesh_spec(spec) -> list[tuple[str, int]]:
  """'data=-1,fsdp=4,tensor=1' (the config / command-line form) or [('data', -1), ...]."""
  if isinstance(spec, str):
    out = []
    for part in filter(None, (p.strip() for p in spec.split(','))):
      name, sep, size = part.partition('=')
      if not sep:
        raise UserError(f'mesh spec {spec!r}: expected name=size items, e.g. data=-1,fsdp=4')
      out.append((name.strip(), int(size)))
    return out
  return [(str(a), int(s)) for a, s in spec]


def make_mesh(axes, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """`axes` like 'data=-1,fsdp=1,tensor=1' or [('data', -1), ('fsdp', 1)]; one -1 takes the
  remaining devices. Axis types are Auto (GSPMD-style propagation), which the logical-rules style
  needs."""
  axes = parse_mesh_spec(axes)
  devices = list(jax.devices() if devices is None else devices)
  names = [a for a, _ in axes]
  sizes = [int(s) for _, s in axes]
  if len(set(names)) != len(names):
    raise UserError(f'mesh axis names must be unique: {names}')
  if sizes.count(-1) > 1:
    raise UserError(f'at most one mesh axis may be -1: {list(axes)}')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise UserError(f'{len(devices)} devices cannot be split as {list(axes)}')
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise UserError(f'mesh {dict(zip(names, sizes))} needs {math.prod(sizes)} devices, '
                     f'{len(devices)} available; use -1 for one axis to fill')
  try:
    dev = mesh_utils.create_device_mesh(sizes, devices=devices)
  except Exception:  # e.g. CPU device counts the topology helper does not know
    dev = np.asarray(devices).reshape(sizes)
  return Mesh(dev, tuple(names), axis_types=(AxisType.Auto,) * len(names))


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: Rules) -> P:
  """Logical axis names of one array -> PartitionSpec on `mesh` (see module docstring)."""
  if not names:
    return P()
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name, dim in zip(names, shape):
    axes = table.get(name) if name is not None else None
    if axes is None:
      out.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
    while axes and dim % math.prod(mesh.shape[a] for a in axes):
      axes = axes[:-1]
    if not axes:
      out.append(None)
      continue
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else axes)
  return P(*out)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
  """A State of NamedShardings mirroring `state` (abstract or concrete)."""
  flat = []
  for path, var in nnx.to_flat_state(state):
    names = var.get_metadata().get('out_sharding')
    spec = logical_to_spec(names, var.shape, mesh, rules)
    flat.append((path, var.replace(NamedSharding(mesh, spec))))
  return nnx.from_flat_state(flat)


@contextlib.contextmanager
def cheap_tracer_probes():
  """Makes `getattr(tracer, 'sharding', None)` cheap while tracing.

  flax's `Variable.set_value` (every RNG-stream count update, e.g. each initializer or dropout
  call) probes the new value's `.sharding`; on a tracer JAX raises an AttributeError whose message
  walks the whole jaxpr traced so far (`find_progenitors`), so tracing a large model costs O(ops^2):
  80 s of the 234-s Hita-V build on the 2-core CPU. The probe only needs the AttributeError, so
  the message is dropped while this is active (JAX internals: left alone where they moved)."""
  try:
    from jax._src import core as jax_core
    original = jax_core.Tracer.__dict__['sharding']
  except (ImportError, AttributeError, KeyError):
    yield
    return

  def sharding(self):
    raise AttributeError(f"'sharding' is not available on a tracer ({type(self).__name__})")

  jax_core.Tracer.sharding = property(sharding)
  try:
    yield
  finally:
    jax_core.Tracer.sharding = original


def create_sharded(make_module: Callable[[], nnx.Module], mesh: Mesh | None,
                   rules: Rules | None) -> nnx.Module:
  """Builds the module in one jitted init, every variable born sharded on `mesh` (no full copy on
  one device); with `mesh=None` on the default device (`create_jitted`)."""
  with cheap_tracer_probes():
    graphdef, abs_state = nnx.split(nnx.eval_shape(make_module))
    shardings = None if mesh is None else state_shardings(abs_state, mesh, rules)

    def init():
      return nnx.split(make_module())[1]

    state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def create_jitted(make_module: Callable[[], nnx.Module]) -> nnx.Module:
  """The module built by one jitted init on the default device. Built eagerly, each initializer
  runs op by op and compiles once per distinct shape: the official fixtures' tokenizer took 263
  compiles, 65 s of a 78 s load on the 2-core CPU machine, weights loaded over them afterwards."""
  return create_sharded(make_module, None, None)


def put(x, target: jax.sharding.Sharding):
  """jax.device_put that also works across processes: an array held whole by this process (read
  from a file, made on its first device) becomes a global array from the shards each process
  holds itself (every process has the same value, e.g. the same weights file)."""
  if (jax.process_count() == 1 or target.is_fully_addressable
      or (isinstance(x, jax.Array) and not x.is_fully_addressable)):
    return jax.device_put(x, target)
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # typed keys travel as their raw data
    data = put(jax.random.key_data(x), target)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, target, lambda index: host[index])


def shard_module(module: nnx.Module, mesh: Mesh, rules: Rules) -> nnx.Module:
  """Moves an existing module's variables onto `mesh` following the rules (in place)."""
  state = nnx.state(module)
  nnx.update(module, jax.tree.map(put, state, state_shardings(state, mesh, rules)))
  return module


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int) -> NamedSharding:
  """Sharding of a (batch, ...) input: batch over the `batch` rule's axes, the rest replicated."""
  axes = dict(rules).get('batch', ('data', 'fsdp'))
  axes = (axes,) if isinstance(axes, str) else tuple(a for a in axes if a in mesh.shape)
  return NamedSharding(mesh, P(axes or None, *([None] * (ndim - 1))))


def batch_shards(sharding: NamedSharding) -> int:
  """How many pieces the leading (batch) dimension of an input with this sharding is split into."""
  axes = sharding.spec[0] if len(sharding.spec) else None
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(sharding.mesh.shape[a] for a in axes)


def commit_to_mesh(tree, mesh: Mesh):
  """Leaves not yet laid out on `mesh` (e.g. a step counter from `jnp.zeros`, optimizer state of
  `jax.jit(tx.init)` on one device) are replicated on it. A jitted step returns NamedShardings;
  inputs with any other sharding would make its second call compile again."""
  rep = NamedSharding(mesh, P())

  def commit(x):
    if isinstance(x, jax.Array) and not (isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh):
      return put(x, rep)
    return x
  return jax.tree.map(commit, tree)


def to_host(tree):
  """numpy copies of a tree's arrays on every process. An array spread over several processes is
  gathered with `process_allgather` (np.asarray would fail on its non-addressable shards)."""
  from jax.experimental import multihost_utils

  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(get, tree)


def is_main_process() -> bool:
  """Process 0 writes files (logs, images, JSON); every process computes."""
  return jax.process_index() == 0


def sync(name: str):
  """A barrier across processes (a no-op with one), e.g. before process 0 reads what all wrote."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def broadcast_from_main(x: np.ndarray) -> np.ndarray:
  """Process 0's value of a host array on every process (e.g. which files exist on its disk)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(x)))


def optimizer_shardings(tx, params, mesh: Mesh):
  """Shardings of `tx.init(params)`: every sub-tree shaped like the parameters (Adam's moments) is
  placed like them, the rest (counters) replicated. `jax.jit(tx.init)` alone lets XLA choose, and
  it replicates the freshly zeroed moments: a full AdamW state on every device under FSDP."""
  param_sh = jax.tree.map(lambda x: x.sharding, params)
  treedef = jax.tree.structure(params)
  rep = NamedSharding(mesh, P())
  like = lambda x: jax.tree.structure(x) == treedef
  return jax.tree.map(lambda x: param_sh if like(x) else rep, jax.eval_shape(tx.init, params),
                      is_leaf=like)


def init_optimizer(tx, params, mesh: Mesh):
  """`tx.init(params)` born with `optimizer_shardings`."""
  return jax.jit(tx.init, out_shardings=optimizer_shardings(tx, params, mesh))(params)
