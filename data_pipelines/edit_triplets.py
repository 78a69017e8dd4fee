"""TFDS builder for user edit triplets: `edits.jsonl` of {"source", "target", "instruction"}.

Usage:
  builder, report = edit_triplets.build(root="/data/my_edits", data_dir="/data/tfds")
  source = edit_triplets.EditTripletsSource(builder)

The bucket follows the target image; the source is resized to the same size
so both stay pixel-aligned through the loader's shared crop. Pairs whose
aspect ratios disagree are skipped as `mismatched_pair`, like every other bad
item (see `manifests.SKIP_REASONS`).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import folder_datasets
from data_pipelines import images
from data_pipelines import manifests


class EditTriplets(folder_datasets.FileCodePath, tfds.core.GeneratorBasedBuilder):
  """(source, instruction, target) triplets from a local folder (the TFDS manual dir)."""

  name = "edit_triplets"
  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Pass the folder holding the images and edits.jsonl as the manual dir "
      "(edit_triplets.build(root=...)).")
  BUILDER_CONFIGS = [folder_datasets.make_config(256, images.DEFAULT_ASPECT_RATIOS, 64,
                                                 "edits.jsonl")]

  def _info(self) -> tfds.core.DatasetInfo:
    image = lambda: tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg")
    return tfds.core.DatasetInfo(
        builder=self,
        description="Image edit triplets, bucketed by the target's aspect ratio.",
        features=tfds.features.FeaturesDict({
            "source": image(),
            "target": image(),
            "instruction": tfds.features.Text(),
            "source_file": tfds.features.Text(),
            "target_file": tfds.features.Text(),
            "bucket": folder_datasets.bucket_feature(),
        }),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    return {"train": self._generate_examples(dl_manager.manual_dir)}

  def _generate_examples(self, root):
    config = self.builder_config
    buckets = config.buckets
    report = getattr(self, "skip_report", None) or manifests.SkipReport()
    items = manifests.iter_edit_items(root, config.manifest, config.min_side, report=report)
    for n, item in enumerate(items):
      bucket = buckets[images.nearest_bucket(*item.target.shape[:2], buckets)]
      target = images.resize_to_cover(item.target, bucket)
      source = images.resize(item.source, target.shape[:2])
      yield n, {"source": source, "target": target, "instruction": item.instruction,
                "source_file": item.source_file, "target_file": item.target_file,
                "bucket": np.array(bucket, np.int32)}


def build(root: str | os.PathLike, data_dir: str | os.PathLike, *, resolution: int = 256,
          aspect_ratios: Sequence[float] = images.DEFAULT_ASPECT_RATIOS, min_side: int = 64,
          manifest: str = "edits.jsonl") -> tuple[EditTriplets, manifests.SkipReport]:
  """Prepares (once) the folder `root` into `data_dir`; returns the builder and skip report."""
  config = folder_datasets.make_config(resolution, aspect_ratios, min_side, manifest)
  builder = EditTriplets(config=folder_datasets.config_arg(EditTriplets, config), data_dir=os.fspath(data_dir), file_format="array_record")
  report = folder_datasets.prepare(builder, root)
  return builder, report


class EditTripletsSource(folder_datasets.BucketedSource):
  """Random access to a prepared `EditTriplets`.

  Items: {"source", "target": uint8 [H, W, 3] (same size, covering "bucket"),
  "instruction", "source_file", "target_file": str, "bucket": (height, width)}.
  """

  _text_fields = ("instruction", "source_file", "target_file")
  _image_fields = ("source", "target")
