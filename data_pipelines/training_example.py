"""The one conversion from a raw source record to the training example format.

Every source (synthetic shapes, TFDS folder datasets) yields raw records; the
trainer wants one format for both tasks, so T2I and edit examples can share a
batch in the joint stage:

  {"target":    float32 [H, W, 3] in [-1, 1]   image to generate,
   "condition": float32 [H, W, 3] in [-1, 1]   edit source; zeros for T2I,
   "is_edit":   float32 []                     1.0 for edits, 0.0 for T2I,
   "prompt":    str                            caption or edit instruction}

Raw records:
  T2I:  {"image": uint8 [H, W, 3], "caption": str, ...}
  edit: {"source": uint8 [H, W, 3], "target": uint8 [H, W, 3], "instruction": str, ...}
Extra keys (category, metadata, bucket) are dropped.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from data_pipelines import images

TRAINING_KEYS = ("target", "condition", "is_edit", "prompt")


def _text(value: Any, field: str) -> str:
  if isinstance(value, bytes):  # TFDS Text features decode to bytes.
    value = value.decode("utf-8")
  if not isinstance(value, str):
    raise TypeError(f"raw record field {field!r} must be str or bytes, got {type(value).__name__}")
  return value


def _uint8_image(value: Any, field: str) -> np.ndarray:
  arr = np.asarray(value)
  if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
    raise ValueError(f"raw record field {field!r} must be uint8 [H, W, 3], "
                     f"got {arr.dtype} {arr.shape}")
  return arr


def to_training_example(raw: Mapping[str, Any], size: Sequence[int], crop: str = "center",
                        rng: np.random.Generator | None = None) -> dict[str, Any]:
  """Converts one raw T2I or edit record to the training format at `size` = (H, W).

  Images not already `size` are resized to cover it and cropped (`crop` is
  "center" or "random"; random needs `rng`). Edit source and target share
  the crop.
  """
  size = (int(size[0]), int(size[1]))
  if "instruction" in raw:
    source = _uint8_image(raw["source"], "source")
    target = _uint8_image(raw["target"], "target")
    target, source = images.fit([target, source], size, crop, rng)
    return {"target": images.to_unit_range(target), "condition": images.to_unit_range(source),
            "is_edit": np.float32(1.0), "prompt": _text(raw["instruction"], "instruction")}
  if "caption" in raw:
    (image,) = images.fit([_uint8_image(raw["image"], "image")], size, crop, rng)
    return {"target": images.to_unit_range(image),
            "condition": np.zeros(size + (3,), np.float32),
            "is_edit": np.float32(0.0), "prompt": _text(raw["caption"], "caption")}
  raise KeyError(f"raw record has neither 'caption' (T2I) nor 'instruction' (edit); "
                 f"keys: {sorted(raw)}")


def collate(examples: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
  """Stacks examples into a batch: arrays `[B, ...]`, strings as an object array `[B]`.

  Raises:
    ValueError: naming the key whose shapes differ across the batch.
  """
  if not examples:
    raise ValueError("cannot collate an empty batch")
  batch: dict[str, np.ndarray] = {}
  for key in examples[0]:
    values = [ex[key] for ex in examples]
    if isinstance(values[0], (str, bytes)):
      batch[key] = np.array(values, dtype=object)
      continue
    shapes = {np.shape(v) for v in values}
    if len(shapes) > 1:
      raise ValueError(f"cannot batch key {key!r}: shapes differ {sorted(shapes)}")
    batch[key] = np.stack(values)
  return batch
