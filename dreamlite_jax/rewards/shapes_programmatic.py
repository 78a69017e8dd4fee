"""The exact shapes reward: the programmatic evaluator's partial credit, per sample.

Not differentiable (colour segmentation and connected components on uint8
pixels), so it drives online RL (Flow-GRPO) and the before/after scores of the
RL stage. In the shapes world a "prompt" is the generator's metadata record
(dict or JSON string): T2I records carry a GenEval-style `spec`, edit records
an `edit_type` with source/target scenes, and edits need their source images.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from dreamlite_jax.eval import shapes_eval


def _uint8(images: Any, name: str) -> np.ndarray:
  """uint8 [B, H, W, 3] from uint8 or from floats in [-1, 1] (generator outputs)."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"{name} must be [B, H, W, 3], got {images.shape}")
  if images.dtype == np.uint8:
    return images
  return np.round(np.clip((images.astype(np.float32) + 1.0) / 2.0, 0, 1) * 255).astype(np.uint8)


class ShapesReward:
  """`reward(images, prompts, source_images=None) -> [B]` in [0, 1].

  images: uint8 or float in [-1, 1], [B, H, W, 3]; prompts: metadata records.
  `exact=True` gives 1.0 only when every check passes (the evaluator's accuracy),
  else the fraction of passed checks (a denser signal for RL).
  """
  differentiable_available = False

  def __init__(self, exact: bool = False):
    self.exact = exact

  def __call__(self, images: Any, prompts: Sequence[dict | str],
               source_images: Any = None) -> np.ndarray:
    images = _uint8(images, "images")
    if len(prompts) != len(images):
      raise ValueError(f"{len(images)} images but {len(prompts)} prompt records")
    sources = None if source_images is None else _uint8(source_images, "source_images")
    out = np.zeros(len(images), np.float32)
    for i, record in enumerate(prompts):
      meta = json.loads(record) if isinstance(record, str) else record
      if "edit_type" in meta:
        if sources is None:
          raise ValueError(f"prompt record {i} is an edit ({meta['edit_type']}) but "
                           f"source_images is None")
        checks = shapes_eval.edit_checks(sources[i], images[i], meta)
      elif "spec" in meta:
        checks = shapes_eval.t2i_checks(images[i], meta)
      else:
        raise ValueError(f"prompt record {i} has neither 'spec' (T2I) nor 'edit_type' (edit); "
                         f"keys: {sorted(meta)}")
      passed = sum(checks.values())
      out[i] = float(passed == len(checks)) if self.exact else passed / len(checks)
    return out
