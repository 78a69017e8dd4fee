"""The rewards by name: `make_reward(name, path)` (see the package docstring)."""
from __future__ import annotations

from typing import Any

from dreamlite_jax.rewards import learned_shapes
from dreamlite_jax.rewards.clip_reward import ClipReward
from dreamlite_jax.rewards.shapes_programmatic import ShapesReward

REWARDS = ("shapes", "learned_shapes", "clip")


def make_reward(name: str, path: str = "") -> Any:
  """Builds a reward by name; `path` = weights (learned_shapes: file, clip: directory)."""
  if name == "shapes":
    return ShapesReward()
  if name == "learned_shapes":
    return learned_shapes.LearnedShapesReward(path or learned_shapes.WEIGHTS_PATH)
  if name == "clip":
    if not path:
      raise ValueError("the clip reward needs the path of a local CLIP directory")
    return ClipReward.from_pretrained(path)
  raise ValueError(f"unknown reward {name!r} (known: {REWARDS})")
