"""The pretraining and SFT stages of the tiny job (pretrain_t2i, pretrain_edit, pretrain_joint, sft).

All four are the same code: the flow-matching loss (`pretrain_loss`) on the
job's shapes data (`shapes_data`), trained with the shared trainer from the
parent stage's checkpoint; they differ only in their config section
(`data.edit_fraction`, steps, learning rate, dropout). At the end the stage's
EMA U-Net is scored on a small shapes evaluation (`config.eval.stage_check`),
so the report can show what every stage added.

Section fields: parent, init_from_ema, train (trainer fields), loss
(PretrainLossConfig fields), data.edit_fraction.
"""
from __future__ import annotations

import os

import jax.numpy as jnp

from dreamlite_jax.eval import shapes_stage
from dreamlite_jax import stages
from dreamlite_jax.training import checkpoints
from dreamlite_jax.training import metrics as metrics_lib
from dreamlite_jax.training import pretrain_loss
from dreamlite_jax.training import shapes_data
from dreamlite_jax.training import trainer


def init_unet_fn(unet, latent_hw: tuple[int, int], text_length: int, text_dim: int):
  """`rng -> params` of the U-Net on a `[1, h, 2w, 4]` canvas (boxed, for the trainer)."""
  h, w = latent_hw

  def init(rng):
    return unet.init(rng, jnp.zeros((1, h, 2 * w, 4)), jnp.zeros((1,)),
                     jnp.zeros((1, text_length, text_dim)), jnp.ones((1, text_length), jnp.int32),
                     jnp.full((1, 2), 8.0 * w))["params"]

  return init


def train_unet(ctx, config, edit_fraction: float) -> trainer.TrainResult:
  """Runs the flow-matching trainer for `config` (a `ctx.stage_config()`) in `ctx.workdir`."""
  models = ctx.models
  data = models.encoded_data()
  loss_cfg = pretrain_loss.PretrainLossConfig(**config.loss.to_dict())
  loss_fn = pretrain_loss.make_pretrain_loss(pretrain_loss.unet_predict_fn(models.unet), loss_cfg)
  latents = data["t2i_latents"] if "t2i_latents" in data else data["edit_targets"]
  init = init_unet_fn(models.unet, latents.shape[1:3], data["null_t2i_text"].shape[1],
                      data["null_t2i_text"].shape[2])
  batches = shapes_data.BatchIterator(data, config.train.batch_size, edit_fraction,
                                      seed=config.seed + _stage_salt(ctx.name),
                                      image_size=models.image_size)
  return trainer.train(config, ctx.workdir, loss_fn, batches, init)


def _stage_salt(name: str) -> int:
  # Each stage sees its own batch stream (a deterministic function of the name).
  return sum(ord(c) * 31 ** i for i, c in enumerate(name)) % 100_003


def stage_check(ctx, params) -> dict:
  """The small end-of-stage shapes evaluation (None-free nested scores), with grids."""
  check = ctx.config.eval.stage_check
  sets = shapes_stage.eval_sets(ctx.config, check.per_category, check.per_type)
  return shapes_stage.evaluate(ctx.models.pipeline(params), sets, check.sampler,
                               grid_dir=ctx.workdir, prefix="samples_")


def final_loss(workdir: str) -> float | None:
  """The last logged training loss of a stage (read back, so a resumed stage reports it too)."""
  losses = [h["loss"] for h in metrics_lib.read_metrics(workdir) if "loss" in h]
  return losses[-1] if losses else None


def run_stage(ctx) -> dict:
  """Trains one pretraining/SFT stage; returns steps, final loss and stage-check scores."""
  config = ctx.stage_config()
  result = train_unet(ctx, config, float(ctx.section.data.edit_fraction))
  stages.raise_if_preempted(result, ctx.name)
  out = {"steps": int(result.final_step), "final_loss": final_loss(ctx.workdir),
         "compile_seconds": result.compile_seconds}
  if ctx.config.eval.stage_check.enabled:
    params = checkpoints.as_numpy(result.state.ema_params)
    out["scores"] = stage_check(ctx, params)
    out["sample_grids"] = ["samples_t2i.png", "samples_edit.png"]
  return out
