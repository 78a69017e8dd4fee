"""What the two TFDS folder builders (`t2i_folder`, `edit_triplets`) share.

A builder config (bucket resolution, aspect ratios, tiny-image threshold,
manifest name), the prepare step that writes the skip report next to the
data, and the random-access reader that the grain loader consumes. Data are
written as ArrayRecord so `builder.as_data_source` gives random access (what
grain needs for global shuffling, host sharding and exact resume).
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data_pipelines import images
from data_pipelines import manifests

SKIP_REPORT_FILE = "skip_report.json"


@dataclasses.dataclass
class FolderConfig(tfds.core.BuilderConfig):
  """How a folder is turned into bucketed examples.

  Attributes:
    resolution: bucket side for aspect ratio 1 (buckets hold ~resolution**2 pixels).
    aspect_ratios: width/height of the buckets.
    min_side: images with a shorter side below this are skipped as tiny.
    manifest: jsonl file name inside the folder.
  """
  resolution: int = 256
  aspect_ratios: tuple[float, ...] = images.DEFAULT_ASPECT_RATIOS
  min_side: int = 64
  manifest: str = ""

  @property
  def buckets(self) -> list[images.Size]:
    return images.make_buckets(self.resolution, self.aspect_ratios)


def make_config(resolution: int, aspect_ratios: Sequence[float], min_side: int,
                manifest: str) -> FolderConfig:
  """A config whose name encodes its settings, so different settings never share a directory."""
  key = json.dumps([resolution, [round(a, 6) for a in aspect_ratios], min_side, manifest])
  digest = hashlib.sha1(key.encode()).hexdigest()[:8]
  return FolderConfig(name=f"r{resolution}_{digest}", resolution=resolution,
                      aspect_ratios=tuple(aspect_ratios), min_side=min_side, manifest=manifest,
                      description=f"resolution {resolution}, aspect ratios {list(aspect_ratios)}, "
                                  f"min side {min_side}, manifest {manifest}")


class FileCodePath:
  """Builder mixin: `code_path` from the class's source file.

  TFDS 4.9.10 resolves `code_path` of a builder living in a package through the
  `importlib_resources` backport, which this environment does not ship; the
  plain-file answer is the same path without it.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(inspect.getfile(cls))


def config_arg(builder_cls: type, config: FolderConfig) -> FolderConfig | str:
  """TFDS refuses a config object equal to a predefined one; pass that one by name."""
  return config.name if config.name in builder_cls.builder_configs else config


def bucket_feature() -> tfds.features.Tensor:
  return tfds.features.Tensor(shape=(2,), dtype=np.int32)


def prepare(builder: tfds.core.GeneratorBasedBuilder, root: str | os.PathLike) -> manifests.SkipReport:
  """Builds `builder` from the folder `root` (once) and returns its skip report.

  The report is saved as `skip_report.json` in the dataset directory and logged,
  so a later run reading the prepared data still sees what was dropped.
  """
  root = Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f"{builder.name}: dataset root {root} is not a directory")
  report_path = Path(builder.data_dir) / SKIP_REPORT_FILE
  if not report_path.exists():
    if builder.is_prepared():
      raise FileNotFoundError(f"{builder.data_dir} is prepared but has no {SKIP_REPORT_FILE}; "
                              "delete the directory and prepare again")
    builder.skip_report = manifests.SkipReport()
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
    builder.skip_report.save(report_path)
  report = manifests.SkipReport.load(report_path)
  manifests.log_report(f"{builder.name}/{builder.builder_config.name} from {root}", report)
  return report


class BucketedSource:
  """Random-access reader of a prepared folder builder's split (grain-compatible).

  `__getitem__` returns the builder's record with text fields as `str` and
  `bucket` as a `(height, width)` tuple; images are uint8 `[H, W, 3]` that
  already cover their bucket.
  """

  _text_fields: tuple[str, ...] = ()
  _image_fields: tuple[str, ...] = ()

  def __init__(self, builder: tfds.core.GeneratorBasedBuilder, split: str = "train"):
    self._builder = builder
    self._split = split
    self._source = builder.as_data_source(split)
    self._bucket_ids: np.ndarray | None = None
    self.buckets: list[images.Size] = builder.builder_config.buckets

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = dict(self._source[index])
    for key in self._text_fields:
      if isinstance(record[key], bytes):
        record[key] = record[key].decode("utf-8")
    record["bucket"] = (int(record["bucket"][0]), int(record["bucket"][1]))
    return record

  def bucket_ids(self) -> np.ndarray:
    """int32 `[N]`: index into `self.buckets` of every record (images are not decoded)."""
    if self._bucket_ids is None:
      skip = {k: tfds.decode.SkipDecoding() for k in self._image_fields}
      raw = self._builder.as_data_source(self._split, decoders=skip)
      lookup = {b: i for i, b in enumerate(self.buckets)}
      self._bucket_ids = np.array(
          [lookup[(int(r["bucket"][0]), int(r["bucket"][1]))] for r in raw], np.int32)
    return self._bucket_ids

  def __repr__(self) -> str:
    return (f"{type(self).__name__}({self._builder.name}/{self._builder.builder_config.name}, "
            f"split={self._split}, n={len(self)})")
