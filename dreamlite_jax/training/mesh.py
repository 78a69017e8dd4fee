"""The device mesh and the one table that maps logical axis names to mesh axes.

Models annotate every parameter with logical names (`nn.with_logical_partitioning`);
this module turns those names into `NamedSharding`s on a `('data', 'fsdp',
'tensor')` mesh. The mapping is shape-aware: a mesh axis that does not divide
a dimension is not used for it (the next rule for that name is tried), so tiny
test models and odd channel counts shard as far as they can instead of failing.
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax._src import distributed  # the coordination-service client (no public barrier)
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dreamlite_jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
# Mesh axes a batch is split over (data parallel, and FSDP is data parallel too).
BATCH_AXES = ("data", "fsdp")

# The one table. Rules are tried in order; a logical name may appear more than
# once, the later entries being fallbacks when the earlier mesh axis is taken by
# another dimension of the same array or does not divide this dimension
# (depthwise conv kernels have conv_in = 1, so their conv_out takes 'fsdp').
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("conv_in", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("conv_out", "tensor"),
    ("vocab", "tensor"),
    ("mlp", "fsdp"),
    ("heads", "fsdp"),
    ("conv_out", "fsdp"),
    ("vocab", "fsdp"),
    ("kv", None),
    ("conv_height", None),
    ("conv_width", None),
    ("norm", None),
)


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Resolves `config.mesh.{data,fsdp,tensor}` (one may be -1 = the rest)."""
  sizes = []
  for axis in MESH_AXES:
    if axis not in mesh_config:
      raise ConfigError(f"config.mesh.{axis} is missing")
    size = mesh_config[axis]
    if not isinstance(size, int) or (size < 1 and size != -1):
      raise ConfigError(f"config.mesh.{axis} = {size!r}: must be a positive int or -1")
    sizes.append(size)
  if sizes.count(-1) > 1:
    raise ConfigError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f"config.mesh: {num_devices} devices are not divisible by the "
                        f"fixed axes {dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"config.mesh: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                      f"devices, have {num_devices}")
  return tuple(sizes)


def make_mesh(mesh_config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the `('data', 'fsdp', 'tensor')` mesh over `devices` (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    # Device kinds without a known physical topology (CPU) fall back to plain order.
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def logical_to_mesh_spec(logical: P | None, shape: Sequence[int], mesh: Mesh,
                         rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> P:
  """Maps a logical PartitionSpec to a mesh PartitionSpec for an array of `shape`.

  Each dimension takes the first rule for its name whose mesh axes are still
  free in this array, all have size > 1, and whose product divides the dimension.
  """
  if logical is None or len(logical) == 0:
    return P()
  if len(logical) != len(shape):
    raise ValueError(f"logical axes {tuple(logical)} do not match array shape {tuple(shape)}")
  known = {name for name, _ in rules}
  used: set[str] = set()
  out: list[Any] = []
  for name, dim in zip(logical, shape):
    if name is None:
      out.append(None)
      continue
    if name not in known:
      raise ValueError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES "
                       f"(known: {sorted(known)})")
    chosen = None
    for rule_name, target in rules:
      if rule_name != name or target is None:
        continue
      axes = (target,) if isinstance(target, str) else tuple(target)
      axes = tuple(a for a in axes if mesh.shape[a] > 1)
      if not axes or used & set(axes):
        continue
      if dim % math.prod(mesh.shape[a] for a in axes):
        continue
      chosen = axes[0] if len(axes) == 1 else axes
      used.update(axes)
      break
    out.append(chosen)
  return P(*out)


def _is_spec_leaf(x) -> bool:
  return x is None or isinstance(x, P)


def logical_shardings(abstract_boxed: Any, mesh: Mesh) -> Any:
  """NamedShardings for a tree that still holds flax `LogicallyPartitioned` boxes.

  `abstract_boxed` is typically `jax.eval_shape(init)` output; returns the tree
  of the *unboxed* values with a `NamedSharding` per leaf.
  """
  logical = nn.get_partition_spec(abstract_boxed)
  shapes = nn.unbox(abstract_boxed)
  return jax.tree.map(
      lambda spec, x: NamedSharding(mesh, logical_to_mesh_spec(spec, x.shape, mesh)),
      logical, shapes, is_leaf=_is_spec_leaf)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of every batch leaf: dim 0 split over ('data', 'fsdp')."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Host-local numpy batch `[B_local, ...]` -> global jax.Arrays `[B_local * hosts, ...]`."""
  sharding = batch_sharding(mesh)

  def put(path, x):
    x = np.asarray(x)
    if x.dtype.kind not in "biuf":
      raise TypeError(f"batch{jax.tree_util.keystr(path)} has dtype {x.dtype}: the train step "
                      f"takes numeric arrays only (encode strings before the trainer, e.g. "
                      f"with data_pipelines.loader.map_batches)")
    if x.ndim == 0:
      raise ValueError(f"batch{jax.tree_util.keystr(path)} is a scalar; every batch leaf needs "
                       f"a leading batch axis")
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree_util.tree_map_with_path(put, batch)


_BARRIERS = itertools.count()


def barrier(tag: str, timeout_s: int = 3600) -> None:
  """Waits until every process reaches this point, through the coordination service.

  A device collective gives its peers 30 s to arrive (gloo on CPU), so processes that
  compiled or sampled at different speeds (one hit the compilation cache, one did not)
  meet here first. Every process calls barriers in the same order; ids are numbered.
  """
  if jax.process_count() == 1:
    return
  distributed.global_state.client.wait_at_barrier(f"{tag}#{next(_BARRIERS)}",
                                                  timeout_s * 1000)


def host_row_range(n: int, process_index: int, process_count: int) -> tuple[int, int]:
  """(start, stop) of process `process_index`'s contiguous block of `n` global rows split
  over `process_count` processes: blocks in process order, so a global batch is the same
  whatever the process count (the RL rollouts and `data_pipelines.loader` split by it)."""
  if n % process_count:
    raise ValueError(f"{n} global rows do not split over {process_count} processes")
  per_host = n // process_count
  return process_index * per_host, (process_index + 1) * per_host


def host_rows(n: int) -> slice:
  """This process's contiguous block of `n` global rows (`host_row_range`)."""
  return slice(*host_row_range(n, jax.process_index(), jax.process_count()))


def gather_rows(x: np.ndarray) -> np.ndarray:
  """Every process's block of rows (host-local numpy), concatenated in process order."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x
  barrier("gather_rows")
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def put_global(x: Any, sharding: NamedSharding) -> jax.Array:
  """A host value, the same on every process, as a global array laid out by `sharding`
  (a fresh buffer; `jax.device_put` takes only shardings of this process's devices)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def host_value(x: jax.Array) -> np.ndarray:
  """A replicated (possibly multi-process) array -> numpy, from this host's copy."""
  return np.asarray(x.addressable_data(0))


@functools.lru_cache(maxsize=None)
def _replicate_on(mesh: Mesh):
  return jax.jit(lambda leaves: leaves, out_shardings=NamedSharding(mesh, P()))


def to_host(tree: Any) -> Any:
  """Arrays (sharded over any number of processes) -> full numpy copies on every process.

  Leaves spread over other processes are replicated in one collective program (every
  process must call this with the same tree); the rest are copied as they are.
  """
  leaves, treedef = jax.tree.flatten(tree)
  remote = [i for i, x in enumerate(leaves)
            if isinstance(x, jax.Array) and not x.is_fully_addressable]
  if remote:
    barrier("to_host")
    gathered = _replicate_on(leaves[remote[0]].sharding.mesh)([leaves[i] for i in remote])
    for i, x in zip(remote, gathered):
      leaves[i] = x.addressable_data(0)
  return treedef.unflatten([np.asarray(jax.device_get(x)) for x in leaves])


def wait_on_cpu_mesh(tree: Any, mesh: Mesh) -> Any:
  """Blocks until `tree` is computed when `mesh` spans several CPU devices; returns it.

  XLA:CPU runs every device of a multi-device CPU mesh on one host thread pool,
  and a collective holds its thread until all participants arrive. With the next
  step already dispatched, its device tasks can take the threads the previous
  step's all-reduce is waiting for, and the run aborts after 40 s ("Expected 8
  threads to join the rendezvous"; 2 of 3 runs of the 8-device distillation toy
  test on 2 cores). Waiting for each step first avoids it; GPUs and TPUs are not
  affected, so there this is a no-op and steps stay asynchronous.
  """
  if mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu":
    jax.block_until_ready(tree)
  return tree


def replicated_fraction(tree: Any, shardings: Any, mesh: Mesh) -> tuple[float, list[tuple[str, int]]]:
  """Fraction of bytes in `tree` not split over the model-parallel axes (fsdp, tensor).

  Returns (fraction, [(path, bytes)] of the replicated leaves, largest first).
  """
  model_axes = {a for a in ("fsdp", "tensor") if mesh.shape[a] > 1}
  total = 0
  offenders: list[tuple[str, int]] = []
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  flat_shardings = jax.tree.leaves(shardings)
  for (path, leaf), sharding in zip(leaves, flat_shardings):
    nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    total += nbytes
    spec_axes = set()
    for entry in sharding.spec:
      if entry is not None:
        spec_axes.update((entry,) if isinstance(entry, str) else entry)
    if model_axes and not (spec_axes & model_axes):
      offenders.append((jax.tree_util.keystr(path), nbytes))
  offenders.sort(key=lambda kv: -kv[1])
  replicated_bytes = sum(b for _, b in offenders)
  return (replicated_bytes / total if total else 0.0), offenders


def assert_params_sufficiently_sharded(params: Any, shardings: Any, mesh: Mesh,
                                       max_fraction: float) -> float:
  """Fails when more than `max_fraction` of param bytes are replicated (maxtext's check).

  With fsdp * tensor == 1 nothing can be sharded and the check passes.
  Returns the measured fraction.
  """
  fraction, offenders = replicated_fraction(params, shardings, mesh)
  if mesh.shape["fsdp"] * mesh.shape["tensor"] > 1 and fraction > max_fraction:
    worst = ", ".join(f"{name} ({nbytes} B)" for name, nbytes in offenders[:5])
    raise ValueError(
        f"{fraction:.1%} of parameter bytes are replicated over the fsdp/tensor axes "
        f"(config.mesh.max_replicated_fraction = {max_fraction}); largest: {worst}")
  return fraction
