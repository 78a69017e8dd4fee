"""Where training metrics go: `metrics.jsonl`, TensorBoard events, PNG sample grids.

Only process 0 writes; other processes get a writer that does nothing, so the
trainer calls it unconditionally.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np
from PIL import Image


class MetricsWriter:
  """Appends one JSON line per step to `workdir/metrics.jsonl` and logs scalars to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # heavy import; only the writing host needs it
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    for name, value in values.items():
      if math.isfinite(value):
        self._tb.add_scalar(name, value, int(step))

  def flush(self) -> None:
    if self.enabled:
      self._jsonl.flush()
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
      self.enabled = False


def read_metrics(workdir: str) -> list[dict[str, float]]:
  """All lines of `workdir/metrics.jsonl` (a resumed run appends; later lines win per step)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
  """`[N, H, W, 3]` uint8 (or float in [-1, 1]) -> one `[rows*H, cols*W, 3]` uint8 grid."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"sample images must be [N, H, W, 3], got shape {images.shape}")
  if images.dtype != np.uint8:
    images = np.clip((images.astype(np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
  n, h, w, c = images.shape
  columns = columns or math.ceil(math.sqrt(n))
  rows = math.ceil(n / columns)
  grid = np.zeros((rows * h, columns * w, c), np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
  return grid


def write_grid(path: str, images: np.ndarray) -> str:
  """Saves `image_grid(images)` as a PNG at `path`; returns the path."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  grid = image_grid(images)
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
  return path
