"""The trainer's config sections with every default declared, shared by all stage configs.

`train_config()`, `mesh_config()` and `init_from_config()` return the
`config.train`, `config.mesh` and `config.init_from` sections the trainer
(`dreamlite_jax.training.trainer.train`) reads. Stage configs overlay a few
fields; nothing in the trainer falls back to a hidden default.
"""
from __future__ import annotations

import ml_collections


def train_config(**overrides) -> ml_collections.ConfigDict:
  """`config.train`: optimiser, schedule, precision, EMA, cadence of logs/checkpoints."""
  config = ml_collections.ConfigDict(dict(
      steps=1000,                 # total optimiser steps of the stage
      batch_size=8,               # global batch (all hosts together)
      accum_steps=1,              # gradient accumulation: microbatch = batch_size / accum_steps
      lr=1e-4,
      schedule="cosine",          # 'cosine' (to lr * end_lr_ratio) or 'constant' after warmup
      warmup_steps=100,
      end_lr_ratio=0.0,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.01,
      grad_clip=1.0,              # global-norm clipping; 0 disables
      ema_decay=0.9999,
      compute_dtype="float32",    # 'bfloat16' = mixed precision (fp32 master params)
      log_every=10,
      checkpoint_every=1000,
      keep_checkpoints=3,
      async_checkpoints=True,
      sample_every=0,             # 0 = no periodic sample grids
      sample_with_ema=True,
      progress_bar=True,
  ))
  config.update(overrides)
  return config


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1,
                max_replicated_fraction: float = 0.05) -> ml_collections.ConfigDict:
  """`config.mesh`: axis sizes (one may be -1 = all remaining devices) and the
  largest fraction of parameter bytes allowed to stay replicated over fsdp x tensor."""
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor,
                                        max_replicated_fraction=max_replicated_fraction))


def init_from_config(workdir: str = "", step: int = -1, ema_as_params: bool = False,
                     model: str = "") -> ml_collections.ConfigDict:
  """`config.init_from`: where a stage's first state comes from ('' and '' = scratch).

  `workdir`: the previous stage's directory (the job sets it from `parent`); `model`:
  any model to start from instead: a training run, a job's stage directory, or a
  diffusers DreamLite folder such as the release (U-Net params and EMA from it, fresh
  optimiser); at most one of the two. `step`: the run's step (-1 = latest);
  `ema_as_params`: start the params from its EMA.
  """
  return ml_collections.ConfigDict(dict(workdir=workdir, step=step, ema_as_params=ema_as_params,
                                        model=model))
