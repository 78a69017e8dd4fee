"""Precomputed VAE latents and text embeddings in ArrayRecord shards.

Pretraining at scale should not run the 2B text encoder (or the VAE encoder)
every step. A cache directory holds ArrayRecord shards of one record per example
and `cache_info.json`; `CachedSource` reads them back as a random-access source
for `loader.make_loader(..., convert=loader.passthrough)`, so caches get the same
shuffling, host sharding, mixing and exact resume as raw data.

Two writers:
  * `python -m data_pipelines.build_cache` (the real one): a folder or TFDS
    dataset, encoded with a VAE and Qwen3-VL from local weight folders, sharded
    across hosts and resumable. It writes a cache *root* with one cache per image
    side, `<root>/<side>/`, and its progress under `<root>/build_state/`.
  * `write_cache(source, encode_fn, out_dir)`: one process, one size, an injected
    `encode_fn(batch)`; for tests and small experiments.

Records are msgpack dicts of numpy arrays (flax.serialization): dtype and
shape round-trip exactly. Shards are written to a temporary name and renamed
when complete, and `cache_info.json` is written last, so a cache whose writer
died (or whose other hosts have not finished) is refused instead of read
half-empty.
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
# `build_cache`'s progress, next to the per-side caches of a cache root.
BUILD_DIR = "build_state"
EncodeFn = Callable[[dict[str, np.ndarray]], Mapping[str, Any]]


def _shard_name(i: int, n: int) -> str:
  return f"cache.array_record-{i:05d}-of-{n:05d}"


def done_marker(root: str | os.PathLike, index: int, count: int) -> Path:
  """The file `build_cache` process `index` of `count` writes when its shards are complete."""
  return Path(root) / BUILD_DIR / f"process-{index:05d}-of-{count:05d}.done.json"


def record_features(record: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """`{key: {"dtype", "shape"}}` of one record (`{"dtype": "str"}` for strings)."""
  return {k: ({"dtype": "str"} if isinstance(v, str) else
              {"dtype": str(np.asarray(v).dtype), "shape": list(np.shape(v))})
          for k, v in record.items()}


def write_json_atomic(path: str | os.PathLike, value: Any) -> None:
  """Writes JSON to a temporary name, then renames: readers see all of it or nothing."""
  path = Path(path)
  tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
  tmp.write_text(json.dumps(value, indent=2))
  os.replace(tmp, path)


class ShardWriter:
  """Writes one ArrayRecord shard under a temporary name; `commit()` renames it into place.

  A writer that dies leaves only `<name>.tmp-<pid>`, never a short shard under the
  final name; `abort()` removes the temporary file.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    self.tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
    self.count = 0
    self._writer = array_record_module.ArrayRecordWriter(str(self.tmp), "group_size:1")

  def write(self, record: Mapping[str, Any]) -> None:
    self._writer.write(serialization.msgpack_serialize(dict(record)))
    self.count += 1

  def commit(self) -> None:
    self._writer.close()
    os.replace(self.tmp, self.path)

  def abort(self) -> None:
    self._writer.close()
    self.tmp.unlink(missing_ok=True)


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
        features = record_features(record)
      writer.write(serialization.msgpack_serialize(record))
  writer.close()
  info = {"num_examples": n, "shards": shards, "features": features, "size": list(size)}
  (out / INFO_FILE).write_text(json.dumps(info, indent=2))
  return info


def _missing_info_message(cache_dir: Path) -> str:
  """Why `cache_dir` has no `cache_info.json`, as specifically as the directory tells."""
  head = f"{cache_dir} has no {INFO_FILE}"
  if not cache_dir.is_dir():
    return f"{head}: no such directory"
  sides = sorted(int(p.name) for p in cache_dir.iterdir()
                 if p.name.isdigit() and (p / INFO_FILE).is_file())
  if sides:
    return (f"{head}: it is a cache root; open one side's cache, e.g. {cache_dir / str(sides[0])} "
            f"(sides: {sides})")
  state = cache_dir.parent / BUILD_DIR
  args_file = state / "args.json"
  if args_file.is_file():
    count = int(json.loads(args_file.read_text()).get("process_count", 1))
    waiting = [i for i in range(count) if not done_marker(cache_dir.parent, i, count).is_file()]
    who = (f"processes {waiting} of {count} have not finished" if waiting else
           f"all {count} processes finished but none wrote the cache info")
    return (f"{head}: its build (python -m data_pipelines.build_cache --out {cache_dir.parent}) is "
            f"incomplete: {who}; re-run them with the same arguments")
  return f"{head}: not a cache, or its writer did not finish"


class CachedSource:
  """Random access to a cache written by `build_cache` (one side of a root) or `write_cache`.

  `__getitem__` returns the stored record: numpy arrays with the dtypes and
  shapes in `info["features"]`, strings as str.

  Raises (at construction) FileNotFoundError when the cache is incomplete: no
  `cache_info.json` (saying which build processes have not finished), or shard
  files missing.
  """

  def __init__(self, cache_dir: str | os.PathLike):
    self.cache_dir = Path(cache_dir)
    info_path = self.cache_dir / INFO_FILE
    if not info_path.is_file():
      raise FileNotFoundError(_missing_info_message(self.cache_dir))
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
