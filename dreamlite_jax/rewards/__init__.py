"""Reward functions for RL fine-tuning.

Every reward is called as `reward(images, prompts, source_images=None) -> [B]`
(numpy). Those with `differentiable_available = True` also expose
`tokenize(prompts) -> (ids, mask)` and a jax `differentiable(images, ids, mask)
-> [B]` that ReFL backpropagates through (images [B, H, W, 3] in [-1, 1]).

  shapes          exact programmatic shapes reward (prompts = metadata records)
  learned_shapes  small learned image-text model for shapes (shipped weights)
  clip            CLIP cosine similarity from a local transformers/OpenCLIP directory
"""
from __future__ import annotations

from typing import Any

REWARDS = ("shapes", "learned_shapes", "clip")


def make_reward(name: str, path: str = "") -> Any:
  """Builds a reward by name; `path` = weights (learned_shapes: file, clip: directory)."""
  if name == "shapes":
    from dreamlite_jax.rewards.shapes_programmatic import ShapesReward
    return ShapesReward()
  if name == "learned_shapes":
    from dreamlite_jax.rewards import learned_shapes
    return learned_shapes.LearnedShapesReward(path or learned_shapes.WEIGHTS_PATH)
  if name == "clip":
    from dreamlite_jax.rewards.clip_reward import ClipReward
    if not path:
      raise ValueError("the clip reward needs the path of a local CLIP directory")
    return ClipReward.from_pretrained(path)
  raise ValueError(f"unknown reward {name!r} (known: {REWARDS})")
