"""Experiment configs: load an `experiments/*.py` file and apply overrides.

A config file defines `get_config()` returning an `ml_collections.ConfigDict`.
Overrides look like `--config.train.batch_size=8`; every overridden key must
already exist in the config (no silent typos), and values are parsed with the
type of the existing field.

Loading is pure: nothing here checks what the values mean. `config_schema`
validates (it imports this module, never the reverse): `stages.load_job_config`
checks a whole job before its first stage, `trainer.train` its stage config.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import os
from typing import Any, Iterable, Sequence, TypeVar

import ml_collections


class ConfigError(ValueError):
  """A config is malformed; the message names the offending field."""


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Imports `path` and returns its `get_config(arg)` (or `get_config()`).

  `arg` is big_vision's config argument: a preset name (`experiments/shapes_tiny.py`
  has "smoke" and "long"); a file whose `get_config` takes none has no presets.
  """
  if not os.path.isfile(path):
    raise ConfigError(f"config file not found: {path}")
  name = "dreamlite_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} defines no get_config()")
  if arg is None:
    return module.get_config()
  if not inspect.signature(module.get_config).parameters:
    raise ConfigError(f"config.preset = {arg!r}: {path} has no presets (its get_config() "
                      f"takes no argument)")
  return module.get_config(arg)


def _parse_value(field: str, text: str, current):
  """Parses `text` into the type of `current` (the field's existing value)."""
  if isinstance(current, bool):
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
      return True
    if low in ("0", "false", "no", "off"):
      return False
    raise ConfigError(f"config.{field}: expected a bool, got {text!r}")
  if isinstance(current, str) or current is None:
    if current is None:
      try:
        return ast.literal_eval(text)
      except (ValueError, SyntaxError):
        return text
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError) as e:
    raise ConfigError(f"config.{field}: cannot parse {text!r}") from e
  if isinstance(current, float) and isinstance(value, int):
    value = float(value)
  if isinstance(current, (list, tuple)) and isinstance(value, (list, tuple)):
    return type(current)(value)
  if not isinstance(value, type(current)):
    raise ConfigError(
        f"config.{field}: expected {type(current).__name__}, got {text!r}")
  return value


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Iterable[str]) -> ml_collections.ConfigDict:
  """Applies `a.b=v` (or `--config.a.b=v`) strings to `config` in place."""
  for item in overrides:
    item = item.removeprefix("--").removeprefix("config.")
    if "=" not in item:
      raise ConfigError(f"override {item!r} is not of the form key=value")
    key, text = item.split("=", 1)
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents):
      if part not in node:
        raise ConfigError(f"unknown config field: config.{'.'.join(parents[:i + 1])}")
      node = node[part]
    if leaf not in node:
      raise ConfigError(f"unknown config field: config.{key}")
    with node.ignore_type():
      node[leaf] = _parse_value(key, text, node[leaf])
  return config


def require(config: ml_collections.ConfigDict, field: str, check, what: str,
            prefix: str = "config"):
  """Raises ConfigError naming `<prefix>.<field>` unless `check(value)` holds.

  `prefix` is where `config` sits in the job config (e.g. `config.pretrain_t2i` for
  a stage's section), so the message names the field as the user overrides it.
  """
  node = config
  for part in field.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ConfigError(f"{prefix}.{field} is missing")
    node = node[part]
  if not check(node):
    raise ConfigError(f"{prefix}.{field} = {node!r}: {what}")


def preset_of(overrides: Sequence[str]) -> str | None:
  """The preset an override list names (`--config.preset=NAME`, the last one wins)."""
  named = [o.split("=", 1)[1] for o in overrides
           if o.lstrip("-").startswith("config.preset=")]
  return named[-1] if named else None


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads a config file at the preset the overrides name (`preset_of`), then applies the
  overrides (no validation: see the module docstring)."""
  config = load_config_file(path, preset_of(overrides))
  apply_overrides(config, overrides)
  return config


_Dataclass = TypeVar("_Dataclass")


def dataclass_from_dict(cls: type[_Dataclass], d: Any) -> _Dataclass:
  """`cls(**d)` for a frozen config dataclass, from a dict / ConfigDict (lists -> tuples).

  Unknown keys raise a ValueError that names them and the class.
  """
  d = dict(d)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise ValueError(f"unknown {cls.__name__} field(s): {unknown}")
  return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
