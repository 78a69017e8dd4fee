"""TFDS builder for a user folder of images with `captions.jsonl` ({"file", "caption"} lines).

Usage:
  builder, report = t2i_folder.build(root="/data/my_images", data_dir="/data/tfds")
  source = t2i_folder.T2IFolderSource(builder)   # random access, feeds loader.make_loader

Each valid image is assigned an aspect-ratio bucket, resized to cover it and
stored (JPEG) with its caption; the final crop (centre or random) happens in
the loader. Invalid items are skipped and counted (see `manifests.SKIP_REASONS`).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import folder_datasets
from data_pipelines import images
from data_pipelines import manifests


class T2IFolder(folder_datasets.FileCodePath, tfds.core.GeneratorBasedBuilder):
  """Image/caption pairs from a local folder (the folder is the TFDS manual dir)."""

  name = "t2i_folder"
  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Pass the folder holding the images and captions.jsonl as the manual dir "
      "(t2i_folder.build(root=...)).")
  BUILDER_CONFIGS = [folder_datasets.make_config(256, images.DEFAULT_ASPECT_RATIOS, 64,
                                                 "captions.jsonl")]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Images with captions, bucketed by aspect ratio.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "caption": tfds.features.Text(),
            "file": tfds.features.Text(),
            "bucket": folder_datasets.bucket_feature(),
        }),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    return {"train": self._generate_examples(dl_manager.manual_dir)}

  def _generate_examples(self, root):
    config = self.builder_config
    buckets = config.buckets
    report = getattr(self, "skip_report", None) or manifests.SkipReport()
    items = manifests.iter_t2i_items(root, config.manifest, config.min_side, report)
    for n, item in enumerate(items):
      bucket = buckets[images.nearest_bucket(*item.image.shape[:2], buckets)]
      # Key by position: a manifest may list the same file twice with two captions.
      yield n, {"image": images.resize_to_cover(item.image, bucket), "caption": item.caption,
                "file": item.file, "bucket": np.array(bucket, np.int32)}


def build(root: str | os.PathLike, data_dir: str | os.PathLike, *, resolution: int = 256,
          aspect_ratios: Sequence[float] = images.DEFAULT_ASPECT_RATIOS, min_side: int = 64,
          manifest: str = "captions.jsonl") -> tuple[T2IFolder, manifests.SkipReport]:
  """Prepares (once) the folder `root` into `data_dir`; returns the builder and skip report."""
  config = folder_datasets.make_config(resolution, aspect_ratios, min_side, manifest)
  builder = T2IFolder(config=folder_datasets.config_arg(T2IFolder, config), data_dir=os.fspath(data_dir), file_format="array_record")
  report = folder_datasets.prepare(builder, root)
  return builder, report


class T2IFolderSource(folder_datasets.BucketedSource):
  """Random access to a prepared `T2IFolder`.

  Items: {"image": uint8 [H, W, 3] covering "bucket", "caption": str, "file": str,
  "bucket": (height, width)}.
  """

  _text_fields = ("caption", "file")
  _image_fields = ("image",)
