"""Grain input pipelines: mix, shuffle, shard by host, convert, batch, resume exactly.

One global example stream is defined identically on every host:

  per source: shuffle(seed) -> repeat   (each epoch reshuffled)
  mix sources at fixed proportions      (the joint T2I/edit stage)
  convert raw records -> training examples (random crops seeded by global position)
  host h keeps rows [h * B/P, (h + 1) * B/P) of every global batch of B
  batch per_host = B / P                  (P = process_count)

so hosts see disjoint examples whose union is the global stream, and global
batch `k`, host batches concatenated in process order, is the same whatever P
is: a run on 2 hosts trains on exactly the batches of a run on 1. The iterator's state is the
number of batches consumed (plus a fingerprint of the settings), a small JSON
dict a checkpoint stores; restoring it makes the next batch the very one that
would have come next.

Bucketed sources (folder datasets exposing `buckets` and `bucket_ids()`) get one
such stream per bucket, batched at the bucket's size, and batches from the
buckets interleaved in proportion to their sizes (a bucket too small to fill one
global batch is left out with a warning naming it).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import grain
import jax
import numpy as np

from data_pipelines import training_example
from dreamlite_jax.training import mesh as mesh_lib

Convert = Callable[[Mapping[str, Any], tuple[int, int], str, np.random.Generator], dict]


class Source(Protocol):
  def __len__(self) -> int: ...
  def __getitem__(self, index: int) -> Mapping[str, Any]: ...


class _Subset:
  """The records of `source` at `indices` (one bucket of a bucketed source)."""

  def __init__(self, source: Source, indices: np.ndarray):
    self._source, self._indices = source, indices

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int):
    return self._source[int(self._indices[index])]


def raw_to_training(raw: Mapping[str, Any], size: tuple[int, int], crop: str,
                    rng: np.random.Generator) -> dict:
  """Default conversion: `training_example.to_training_example`."""
  return training_example.to_training_example(raw, size, crop, rng)


def passthrough(raw: Mapping[str, Any], size: tuple[int, int], crop: str,
                rng: np.random.Generator) -> dict:
  """Conversion for sources that already yield training records (embedding caches)."""
  del size, crop, rng
  return dict(raw)


@dataclasses.dataclass(frozen=True)
class LoaderSettings:
  """Everything that defines the example stream; part of the saved iterator state."""
  global_batch_size: int
  per_host_batch_size: int
  seed: int
  size: tuple[int, int]
  crop: str
  weights: tuple[float, ...]
  source_lengths: tuple[int, ...]
  num_epochs: int | None
  process_index: int
  process_count: int
  bucketed: bool


class DataIterator:
  """Iterator of batches (dicts of numpy arrays) with an exactly restorable state."""

  def __init__(self, dataset: grain.MapDataset, settings: LoaderSettings,
               read_options: grain.ReadOptions):
    self.settings = settings
    self.dataset = dataset
    self._read_options = read_options
    self._iter = iter(dataset.to_iter_dataset(read_options))

  def __iter__(self) -> "DataIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iter)

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable state: grain's position plus the settings it is valid for."""
    return {"grain": self._iter.get_state(),
            "settings": json.loads(json.dumps(dataclasses.asdict(self.settings)))}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Restores a state from `get_state`; the next batch is the one that followed it.

    Raises:
      ValueError: naming each setting that differs from the one the state was saved with.
    """
    mine = json.loads(json.dumps(dataclasses.asdict(self.settings)))
    saved = state["settings"]
    diff = [f"{k}: saved {saved.get(k)!r} != current {v!r}" for k, v in mine.items()
            if saved.get(k) != v]
    if diff:
      raise ValueError("data iterator state does not match this loader: " + "; ".join(diff))
    self._iter.set_state(state["grain"])


class MappedIterator:
  """A `DataIterator` whose batches pass through `fn`, keeping get_state/set_state.

  For per-batch work that belongs next to the step, not in the loader: e.g.
  encoding prompts and images online, or dropping the string `prompt` field
  before the batch is sharded onto devices.
  """

  def __init__(self, base: "DataIterator | MappedIterator",
               fn: Callable[[dict[str, np.ndarray]], dict[str, Any]]):
    self.base, self.fn = base, fn

  def __iter__(self) -> "MappedIterator":
    return self

  def __next__(self) -> dict[str, Any]:
    return self.fn(next(self.base))

  def get_state(self) -> dict[str, Any]:
    return self.base.get_state()

  def set_state(self, state: Mapping[str, Any]) -> None:
    self.base.set_state(state)


def map_batches(it: "DataIterator | MappedIterator",
                fn: Callable[[dict[str, np.ndarray]], dict[str, Any]]) -> MappedIterator:
  """`it` with every batch replaced by `fn(batch)`; its saved state stays exact."""
  return MappedIterator(it, fn)


def _stream(sources: Sequence[Source], weights: Sequence[float], seed: int,
            num_epochs: int | None) -> grain.MapDataset:
  """Global raw-record stream: per-source shuffle+repeat, then proportional mix."""
  parts = []
  for i, src in enumerate(sources):
    ds = grain.MapDataset.source(src).shuffle(seed=(seed * 1_000_003 + i) % 2**32)
    parts.append(ds.repeat(num_epochs))
  if len(parts) == 1:
    return parts[0]
  return grain.MapDataset.mix(parts, weights=list(weights))


class _HostRows(grain.MapDataset):
  """This host's rows of every global batch: its block `mesh.host_row_range`."""

  _MUTATES_ELEMENT_SPEC = False

  def __init__(self, parent: grain.MapDataset, global_batch: int, index: int, count: int):
    super().__init__(parent)
    self._start, stop = mesh_lib.host_row_range(global_batch, index, count)
    self._global_batch, self._per_host, self._index = global_batch, stop - self._start, index
    self._length = len(parent) // global_batch * self._per_host

  def __len__(self) -> int:
    return self._length

  def _parent_index(self, i: int) -> int:
    batch, row = divmod(i, self._per_host)
    return batch * self._global_batch + self._start + row

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._parent_index(index)]

  def _getitems(self, indices):
    return self._parent._getitems([self._parent_index(i) for i in indices])  # pylint: disable=protected-access

  def __str__(self) -> str:
    return f"_HostRows(process {self._index}, {self._per_host} of {self._global_batch})"


def _host_batches(stream: grain.MapDataset, size: tuple[int, int], crop: str, seed: int,
                  convert: Convert, process_index: int, process_count: int,
                  per_host: int) -> grain.MapDataset:
  ds = stream.random_map(lambda raw, rng: convert(raw, size, crop, rng), seed=seed)
  ds = _HostRows(ds, per_host * process_count, process_index, process_count)
  return ds.batch(per_host, drop_remainder=True, batch_fn=training_example.collate)


def make_loader(sources: Sequence[Source], *, global_batch_size: int,
                weights: Sequence[float] | None = None, seed: int = 0,
                size: Sequence[int] = (64, 64), crop: str = "center",
                num_epochs: int | None = None, bucketed: bool = False,
                convert: Convert = raw_to_training,
                process_index: int | None = None, process_count: int | None = None,
                num_threads: int = 4, prefetch: int = 8) -> DataIterator:
  """Batches for this host from `sources` mixed at `weights`.

  Args:
    sources: random-access sources of raw records (shapes, folder datasets) or,
      with `convert=passthrough`, of training records (embedding caches).
    global_batch_size: examples per step over all hosts; must divide by process_count.
    weights: mixing proportions, e.g. `[0.7, 0.3]` for 30% edits (default uniform).
    seed: shuffle, mix and crop seed (identical on all hosts).
    size: output `(height, width)`; ignored for bucketed sources.
    crop: "center" or "random".
    num_epochs: None repeats forever; with n, iteration stops after n epochs.
    bucketed: batch per aspect-ratio bucket (sources need `buckets`/`bucket_ids()`).
    convert: raw record -> training record (see `training_example`).
    process_index / process_count: this host and the host count
      (default `jax.process_index()` / `jax.process_count()`).
    num_threads / prefetch: grain read threads and prefetch buffer.

  Returns:
    A `DataIterator` of dicts {"target": float32 [B, H, W, 3], "condition":
    float32 [B, H, W, 3], "is_edit": float32 [B], "prompt": object [B]} with
    B = global_batch_size / process_count (cache records: whatever they hold).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not sources:
    raise ValueError("make_loader needs at least one source")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                     f"process_count={process_count}")
  weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
  if len(weights) != len(sources) or any(w <= 0 for w in weights):
    raise ValueError(f"weights={weights} must be {len(sources)} positive numbers")
  for i, src in enumerate(sources):
    if len(src) == 0:
      raise ValueError(f"source {i} ({src!r}) is empty")
  per_host = global_batch_size // process_count
  size = (int(size[0]), int(size[1]))
  settings = LoaderSettings(global_batch_size, per_host, seed, size, crop, tuple(weights),
                            tuple(len(s) for s in sources), num_epochs, process_index,
                            process_count, bucketed)
  host = dict(convert=convert, process_index=process_index, process_count=process_count,
              per_host=per_host)

  if not bucketed:
    dataset = _host_batches(_stream(sources, weights, seed, num_epochs), size, crop, seed, **host)
  else:
    dataset = _bucketed_batches(sources, weights, seed, num_epochs, crop, global_batch_size, host)
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  return DataIterator(dataset, settings, options)


def _bucketed_batches(sources, weights, seed, num_epochs, crop, global_batch_size,
                      host) -> grain.MapDataset:
  """One batched stream per bucket, interleaved by bucket size."""
  buckets = list(sources[0].buckets)
  for src in sources:
    if not hasattr(src, "bucket_ids") or list(src.buckets) != buckets:
      raise ValueError(f"bucketed loading needs sources with the same `buckets` and a "
                       f"`bucket_ids()` method; {src!r} does not match {buckets}")
  ids = [np.asarray(src.bucket_ids()) for src in sources]
  per_bucket, counts = [], []
  for b, bucket in enumerate(buckets):
    subs = [(_Subset(src, np.flatnonzero(i == b)), w) for src, i, w in zip(sources, ids, weights)]
    subs = [(s, w) for s, w in subs if len(s)]
    n = sum(len(s) for s, _ in subs)
    if n < global_batch_size:  # Cannot fill one global batch: left out, loudly.
      if n:
        logging.warning("bucket %s holds %d examples, fewer than one global batch (%d): "
                        "left out of the stream; use fewer buckets or a smaller batch",
                        bucket, n, global_batch_size)
      continue
    stream = _stream([s for s, _ in subs], [w for _, w in subs], seed + b, num_epochs)
    per_bucket.append(_host_batches(stream, bucket, crop, seed + b, **host))
    counts.append(n)
  if not per_bucket:
    raise ValueError(f"no bucket of {buckets} holds a full global batch of {global_batch_size}")
  if len(per_bucket) == 1:
    return per_bucket[0]
  return grain.MapDataset.mix(per_bucket, weights=counts)
