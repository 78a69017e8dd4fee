"""Validation of a loaded experiment config; every error names its field.

`validate` checks every field it knows that the config has (stage configs,
the tiny default, test configs). `validate_trainer` additionally requires the
sections the trainer reads (`seed`, `train`, `mesh`, `init_from`) to be complete.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import ml_collections

from dreamlite_jax.config import ConfigError, require

_POSITIVE_INT_FIELDS = ("train.batch_size", "train.steps")

_is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
_is_num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)

# field -> (check, what it must be). Checked when present.
_TRAIN_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (_is_int, "must be an int"),
    "train.accum_steps": (lambda v: _is_int(v) and v > 0, "must be a positive int"),
    "train.schedule": (lambda v: v in ("cosine", "constant"), "must be 'cosine' or 'constant'"),
    "train.warmup_steps": (lambda v: _is_int(v) and v >= 0, "must be an int >= 0"),
    "train.end_lr_ratio": (lambda v: _is_num(v) and 0 <= v <= 1, "must be in [0, 1]"),
    "train.b1": (lambda v: _is_num(v) and 0 <= v < 1, "must be in [0, 1)"),
    "train.b2": (lambda v: _is_num(v) and 0 <= v < 1, "must be in [0, 1)"),
    "train.eps": (lambda v: _is_num(v) and v > 0, "must be > 0"),
    "train.weight_decay": (lambda v: _is_num(v) and v >= 0, "must be >= 0"),
    "train.grad_clip": (lambda v: _is_num(v) and v >= 0, "must be >= 0 (0 = no clipping)"),
    "train.ema_decay": (lambda v: _is_num(v) and 0 <= v <= 1, "must be in [0, 1]"),
    "train.compute_dtype": (lambda v: v in ("float32", "bfloat16", "float16"),
                            "must be 'float32', 'bfloat16' or 'float16'"),
    "train.log_every": (lambda v: _is_int(v) and v > 0, "must be a positive int"),
    "train.checkpoint_every": (lambda v: _is_int(v) and v > 0, "must be a positive int"),
    "train.keep_checkpoints": (lambda v: _is_int(v) and v > 0, "must be a positive int"),
    "train.async_checkpoints": (lambda v: isinstance(v, bool), "must be a bool"),
    "train.sample_every": (lambda v: _is_int(v) and v >= 0, "must be an int >= 0 (0 = off)"),
    "train.sample_with_ema": (lambda v: isinstance(v, bool), "must be a bool"),
    "train.progress_bar": (lambda v: isinstance(v, bool), "must be a bool"),
    "mesh.data": (lambda v: _is_int(v) and (v >= 1 or v == -1), "must be a positive int or -1"),
    "mesh.fsdp": (lambda v: _is_int(v) and (v >= 1 or v == -1), "must be a positive int or -1"),
    "mesh.tensor": (lambda v: _is_int(v) and (v >= 1 or v == -1), "must be a positive int or -1"),
    "mesh.max_replicated_fraction": (lambda v: _is_num(v) and 0 <= v <= 1, "must be in [0, 1]"),
    "init_from.workdir": (lambda v: isinstance(v, str), "must be a path string ('' = scratch)"),
    "init_from.step": (lambda v: _is_int(v) and v >= -1, "must be an int >= -1 (-1 = latest)"),
    "init_from.ema_as_params": (lambda v: isinstance(v, bool), "must be a bool"),
    "data.t2i_weight": (lambda v: _is_num(v) and v >= 0, "must be >= 0"),
    "data.edit_weight": (lambda v: _is_num(v) and v >= 0, "must be >= 0"),
    "data.t2i_cache": (lambda v: isinstance(v, str), "must be a path string"),
    "data.edit_cache": (lambda v: isinstance(v, str), "must be a path string"),
    "data.crop": (lambda v: v in ("center", "random"), "must be 'center' or 'random'"),
    "data.resolutions": (lambda v: _valid_resolutions(v),
                         "must be ((side_px, first_step), ...) with sides multiples of 64, "
                         "the first starting at step 0 and start steps increasing"),
}

# Stages whose `config.loss` holds `pretrain_loss.PretrainLossConfig` fields.
PRETRAIN_STAGES = ("pretrain_t2i", "pretrain_edit", "pretrain_joint", "sft")

# The fields `train()` reads; all must exist.
TRAINER_FIELDS = ("seed",) + tuple(
    f"train.{k}" for k in ("steps", "batch_size", "accum_steps", "lr", "schedule", "warmup_steps",
                           "end_lr_ratio", "b1", "b2", "eps", "weight_decay", "grad_clip",
                           "ema_decay", "compute_dtype", "log_every", "checkpoint_every",
                           "keep_checkpoints", "async_checkpoints", "sample_every",
                           "sample_with_ema", "progress_bar")) + (
    "mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.max_replicated_fraction",
    "init_from.workdir", "init_from.step", "init_from.ema_as_params")


def _valid_resolutions(value) -> bool:
  try:
    pairs = [(int(side), int(start)) for side, start in value]
  except (TypeError, ValueError):
    return False
  if not pairs or pairs[0][1] != 0:
    return False
  starts = [s for _, s in pairs]
  return all(side > 0 and side % 64 == 0 for side, _ in pairs) and starts == sorted(set(starts))


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the fields that every stage relies on; raises ConfigError."""
  for field in _POSITIVE_INT_FIELDS:
    if _has(config, field):
      require(config, field, lambda v: isinstance(v, int) and v > 0, "must be a positive int")
  if _has(config, "train.lr"):
    require(config, "train.lr", lambda v: isinstance(v, (int, float)) and v >= 0, "must be >= 0")
  for field, (check, what) in _TRAIN_FIELDS.items():
    if _has(config, field):
      require(config, field, check, what)
  if _has(config, "train.batch_size") and _has(config, "train.accum_steps"):
    require(config, "train.accum_steps", lambda v: config.train.batch_size % v == 0,
            f"must divide config.train.batch_size = {config.train.batch_size}")
  if _has(config, "train.warmup_steps") and _has(config, "train.steps"):
    require(config, "train.warmup_steps", lambda v: v <= config.train.steps,
            f"must be <= config.train.steps = {config.train.steps}")
  if _has(config, "mesh.data"):
    axes = [config.mesh.get(a) for a in ("data", "fsdp", "tensor")]
    if axes.count(-1) > 1:
      raise ConfigError(f"config.mesh: at most one of data/fsdp/tensor may be -1, got {axes}")
  if _has(config, "data.t2i_weight") and _has(config, "data.edit_weight"):
    require(config, "data.edit_weight", lambda v: v + config.data.t2i_weight > 0,
            "data.t2i_weight + data.edit_weight must be > 0")
  if _has(config, "model.unet"):
    _validate_dataclass_fields(config, "model.unet", "dreamlite_jax.models.unet", "UNetConfig")
  if _has(config, "model.unet.dtype") and _has(config, "train.compute_dtype"):
    require(config, "model.unet.dtype", lambda v: v == config.train.compute_dtype,
            f"must equal config.train.compute_dtype = {config.train.compute_dtype!r}")
  if _has(config, "model.vae"):
    _validate_dataclass_fields(config, "model.vae", "dreamlite_jax.models.vae", "VAEConfig")
  if _has(config, "loss") and config.get("stage") in PRETRAIN_STAGES:
    _validate_dataclass_fields(config, "loss", "dreamlite_jax.training.pretrain_loss",
                               "PretrainLossConfig")


def validate_trainer(config: ml_collections.ConfigDict) -> None:
  """`validate` plus: every field the trainer reads exists."""
  for field in TRAINER_FIELDS:
    if not _has(config, field):
      raise ConfigError(f"config.{field} is missing (the trainer needs it; see "
                        f"experiments/train_defaults.py)")
  validate(config)


def _validate_dataclass_fields(config, field: str, module_name: str, class_name: str) -> None:
  """`config.<field>` must hold exactly the fields of the model's config dataclass."""
  import importlib
  cls = getattr(importlib.import_module(module_name), class_name)
  known = {f.name for f in dataclasses.fields(cls)}
  section = config
  for part in field.split("."):
    section = section[part]
  given = set(section.keys())
  unknown = sorted(given - known)
  if unknown:
    raise ConfigError(f"config.{field}.{unknown[0]}: not a field of {class_name} "
                      f"(unknown: {unknown})")
  try:
    build = getattr(cls, "from_dict", None) or (lambda d: cls(**d))
    build(section.to_dict())
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.{field}: {class_name} rejects it: {e}") from e


def _has(config, field: str) -> bool:
  node = config
  for part in field.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True
