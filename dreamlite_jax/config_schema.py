"""Validation of a loaded experiment config; every error names its field."""
from __future__ import annotations

import ml_collections

from dreamlite_jax.config import ConfigError, require

_POSITIVE_INT_FIELDS = ("train.batch_size", "train.steps")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the fields that every stage relies on; raises ConfigError."""
  for field in _POSITIVE_INT_FIELDS:
    if _has(config, field):
      require(config, field, lambda v: isinstance(v, int) and v > 0, "must be a positive int")
  if _has(config, "train.lr"):
    require(config, "train.lr", lambda v: isinstance(v, (int, float)) and v >= 0, "must be >= 0")


def _has(config, field: str) -> bool:
  node = config
  for part in field.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True
