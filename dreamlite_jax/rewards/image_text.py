"""The host-side call every image-text reward shares.

A reward that scores images against prompts defines `tokenize(prompts) -> (ids, mask)`
and `differentiable(images [B, H, W, 3] in [-1, 1], ids, mask) -> [B]` (the jax
function ReFL differentiates); `ImageTextReward` turns those into the reward interface
the RL stage calls: `reward(images, prompts, source_images=None) -> [B]` numpy.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class ImageTextReward:
  """Base of the rewards with `tokenize` and `differentiable` (CLIP, learned shapes)."""
  differentiable_available = True

  @functools.cached_property
  def _score(self) -> Callable[..., jax.Array]:
    return jax.jit(self.differentiable)

  def __call__(self, images: Any, prompts: Sequence[str], source_images: Any = None) -> np.ndarray:
    """Rewards [B] of images (uint8 [B, H, W, 3] or floats in [-1, 1]) for their prompts;
    `source_images` is unused (an edit's prompt describes the wanted result)."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
      images = images.astype(np.float32) / 127.5 - 1.0
    if len(prompts) != images.shape[0]:
      raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    ids, mask = self.tokenize(list(prompts))
    return np.asarray(self._score(jnp.asarray(images, jnp.float32), ids, mask))
