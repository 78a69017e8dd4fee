"""Where a job's U-Net stages get their batches: the job's data source.

`config.data.source` names it:
  "shapes"  the tiny job's synthetic world, rendered and encoded once per job
            (`training/shapes_data.py`, through `SharedModels.encoded_data`);
  "cache"   embedding caches of real data (`python -m data_pipelines.build_cache`):
            `data.t2i_cache` / `data.edit_cache`, one sub-cache per image side,
            read by grain (`data_pipelines/latent_batches.py`).

A pretrain-kind section mixes the two tasks at `data.t2i_weight : data.edit_weight`;
with caches it also grows the image side on `data.resolutions`. Either way the
stage gets the same loss batch (host-local rows, exact `get_state`/`set_state`),
so the loss, the step and the trainer never know which world they train on.
"""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from data_pipelines import latent_batches
from dreamlite_jax.config import ConfigError
from dreamlite_jax.training import shapes_data

SOURCES = ("shapes", "cache")


def source(config: ml_collections.ConfigDict) -> str:
  """The job's data source name; unknown names fail naming the field."""
  name = config.data.source
  if name not in SOURCES:
    raise ConfigError(f"config.data.source = {name!r}: expected one of {SOURCES}")
  return name


def edit_fraction(section: ml_collections.ConfigDict) -> float:
  """The share of edit rows of a section's `data.t2i_weight : data.edit_weight` mix."""
  t2i, edit = float(section.data.t2i_weight), float(section.data.edit_weight)
  return edit / (t2i + edit)


def first_side(config: ml_collections.ConfigDict, section: ml_collections.ConfigDict) -> int:
  """The image side (pixels) of a stage's first batches."""
  if source(config) == "shapes":
    return int(config.data.image_size)
  return int(section.data.resolutions[0][0])


def unet_batches(ctx: Any, section: ml_collections.ConfigDict, global_batch_size: int,
                 seed: int) -> Any:
  """This process's loss batches of a pretrain-kind stage (see the module docstring)."""
  config = ctx.config
  if source(config) == "shapes":
    return shapes_data.BatchIterator(ctx.models.encoded_data(), global_batch_size,
                                     edit_fraction(section), seed=seed,
                                     image_size=ctx.models.image_size,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count())
  return cache_batches(config, section, global_batch_size, seed)


def cache_batches(config: ml_collections.ConfigDict, section: ml_collections.ConfigDict,
                  global_batch_size: int, seed: int, keep_prompts: bool = False,
                  everything: bool = False) -> latent_batches.ProgressiveBatches:
  """Loss batches from the job's caches on the section's resolution schedule.

  `everything`: every process reads the whole global batch (fixed sample sets that
  all processes must agree on) instead of its own shard.
  """
  d = config.data
  shard = dict(process_index=0, process_count=1) if everything else {}

  def make(side: int):
    return latent_batches.make_batches(
        d.t2i_cache, d.edit_cache, side=side, t2i_weight=section.data.t2i_weight,
        edit_weight=section.data.edit_weight, global_batch_size=global_batch_size, seed=seed,
        keep_prompts=keep_prompts, num_threads=int(d.num_threads), prefetch=int(d.prefetch),
        **shard)

  return latent_batches.ProgressiveBatches(make, section.data.resolutions)


def text_shape(ctx: Any, section: ml_collections.ConfigDict) -> tuple[int, int]:
  """(length, dim) of the text features the stage's U-Net reads."""
  config = ctx.config
  if source(config) == "shapes":
    null = ctx.models.encoded_data()["null_t2i_text"]
    return int(null.shape[1]), int(null.shape[2])
  root = config.data.t2i_cache if float(section.data.t2i_weight) > 0 else config.data.edit_cache
  info = latent_batches.open_cache(root, first_side(config, section)).info
  length, dim = info["features"]["text"]["shape"]
  return int(length), int(dim)


def fixed_cache_batches(config: ml_collections.ConfigDict, side: int, count: int, seed: int,
                        edit_fraction: float, keep_prompts: bool = False
                        ) -> latent_batches.ProgressiveBatches:
  """Endless batches of `count` cached conditions at one image `side`, T2I and edit at
  `edit_fraction`, the whole global batch on every process: the sets every process must
  agree on (sample grids, RL prompts, the distillation pool)."""
  mix = ml_collections.ConfigDict(dict(data=dict(
      t2i_weight=1.0 - float(edit_fraction), edit_weight=float(edit_fraction),
      resolutions=((int(side), 0),))))
  return cache_batches(config, mix, count, seed, keep_prompts=keep_prompts, everything=True)


def sample_conditions(config: ml_collections.ConfigDict, section: ml_collections.ConfigDict,
                      side: int, count: int, seed: int) -> dict[str, np.ndarray]:
  """`count` fixed cached conditions at `side` (the same on every process), with prompts,
  at the section's T2I : edit mix."""
  return next(fixed_cache_batches(config, side, count, seed, edit_fraction(section),
                                  keep_prompts=True))
