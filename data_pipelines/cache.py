"""Precomputed VAE latents and text embeddings in ArrayRecord shards.

Pretraining at scale should not run the 2B text encoder (or the VAE encoder)
every step. `write_cache` walks a source once in order, converts each record to
the training format (centre crop), calls an injected `encode_fn(batch)` (e.g.
VAE latents of target and condition, text-encoder states and mask) and stores
one record per example. `CachedSource` reads them back as a random-access
source for `loader.make_loader(..., convert=loader.passthrough)`, so caches get
the same shuffling, host sharding, mixing and exact resume as raw data.

Records are msgpack dicts of numpy arrays (flax.serialization): dtype and
shape round-trip exactly. `cache_info.json` is written last, so a cache whose
writer died is refused instead of read half-empty.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np
from array_record.python import array_record_module
from flax import serialization

from data_pipelines import loader
from data_pipelines import training_example

INFO_FILE = "cache_info.json"
EncodeFn = Callable[[dict[str, np.ndarray]], Mapping[str, Any]]


def _shard_name(i: int, n: int) -> str:
  return f"cache.array_record-{i:05d}-of-{n:05d}"


def _records(batch: Mapping[str, np.ndarray], encoded: Mapping[str, Any],
             keep: Sequence[str]) -> list[dict[str, Any]]:
  b = len(batch["prompt"])
  out = {k: batch[k] for k in keep if k not in encoded}
  for k, v in encoded.items():
    v = np.asarray(v)
    if v.ndim == 0 or v.shape[0] != b:
      raise ValueError(f"encode_fn output {k!r} has shape {v.shape}; expected leading batch dim {b}")
    out[k] = v
  return [{k: (str(v[i]) if v.dtype == object else np.asarray(v[i])) for k, v in out.items()}
          for i in range(b)]


def write_cache(source: loader.Source, encode_fn: EncodeFn, out_dir: str | os.PathLike, *,
                size: Sequence[int] = (64, 64), batch_size: int = 32,
                examples_per_shard: int = 4096,
                keep: Sequence[str] = ("prompt", "is_edit")) -> dict[str, Any]:
  """Encodes every record of `source` once and writes ArrayRecord shards to `out_dir`.

  Args:
    source: random-access raw records (T2I or edit); example i of the cache is record i.
    encode_fn: batch {"target", "condition": float32 [B, H, W, 3], "is_edit": [B],
      "prompt": object [B]} -> dict of arrays with leading dim B
      (e.g. "latents" [B, h, w, 4], "text" [B, L, D], "text_mask" [B, L]).
    size: image size `(H, W)` fed to encode_fn (centre crop).
    keep: training fields copied into each record unless encode_fn returns them.

  Returns:
    The cache info written to `cache_info.json`: num_examples, shards, features.
  """
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  if (out / INFO_FILE).exists():
    raise FileExistsError(f"{out} already holds a cache ({INFO_FILE}); choose another directory")
  n = len(source)
  if n == 0:
    raise ValueError(f"cannot cache an empty source {source!r}")
  num_shards = -(-n // examples_per_shard)
  shards = [_shard_name(i, num_shards) for i in range(num_shards)]
  features: dict[str, dict[str, Any]] = {}
  writer, shard = None, -1
  for start in range(0, n, batch_size):
    idx = range(start, min(n, start + batch_size))
    batch = training_example.collate(
        [training_example.to_training_example(source[i], size, "center") for i in idx])
    for i, record in zip(idx, _records(batch, encode_fn(batch), keep)):
      if i // examples_per_shard != shard:
        if writer is not None:
          writer.close()
        shard = i // examples_per_shard
        writer = array_record_module.ArrayRecordWriter(str(out / shards[shard]), "group_size:1")
      if not features:
        features = {k: ({"dtype": "str"} if isinstance(v, str) else
                        {"dtype": str(v.dtype), "shape": list(v.shape)}) for k, v in record.items()}
      writer.write(serialization.msgpack_serialize(record))
  writer.close()
  info = {"num_examples": n, "shards": shards, "features": features, "size": list(size)}
  (out / INFO_FILE).write_text(json.dumps(info, indent=2))
  return info


class CachedSource:
  """Random access to a cache written by `write_cache`.

  `__getitem__` returns the stored record: numpy arrays with the dtypes and
  shapes in `info["features"]`, strings as str.
  """

  def __init__(self, cache_dir: str | os.PathLike):
    self.cache_dir = Path(cache_dir)
    info_path = self.cache_dir / INFO_FILE
    if not info_path.is_file():
      raise FileNotFoundError(f"{self.cache_dir} has no {INFO_FILE}: not a cache, or its writer "
                              "did not finish")
    self.info = json.loads(info_path.read_text())
    paths = [self.cache_dir / s for s in self.info["shards"]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
      raise FileNotFoundError(f"cache {self.cache_dir}: shard files missing: {missing}")
    self._records = grain.sources.ArrayRecordDataSource([str(p) for p in paths])
    if len(self._records) != self.info["num_examples"]:
      raise ValueError(f"cache {self.cache_dir}: shards hold {len(self._records)} records, "
                       f"{INFO_FILE} says {self.info['num_examples']}")

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return serialization.msgpack_restore(self._records[index])

  def __repr__(self) -> str:
    return f"CachedSource({self.cache_dir}, n={len(self)})"
