"""The pretrain-kind stages of a job (pretrain_t2i, pretrain_edit, pretrain_joint, sft).

All four are the same code: the flow-matching loss (`pretrain_loss`) on the
job's data source (`dreamlite_jax.job.stage_data`: the shapes world or embedding
caches of real data), trained with the shared trainer from the parent stage's
checkpoint; they differ only in their config section (the T2I : edit mix,
resolutions, steps, learning rate, dropout). On the shapes world the stage's EMA
U-Net is scored at the end on a small shapes evaluation (`config.eval.stage_check`),
and every `stage_check.every` steps when that is set, so the report's learning curve
can show what every stage added; on caches the trainer writes sample
grids of fixed cached prompts every `train.sample_every` steps (`config.samples`: count,
seed, sampler).

Section fields: kind, parent, init_from_ema, train (trainer fields), loss
(PretrainLossConfig fields), data (t2i_weight, edit_weight; resolutions for caches).
"""
from __future__ import annotations


import jax.numpy as jnp

from dreamlite_jax.diffusion.sampling import SamplerConfig
from dreamlite_jax.job import stage_data
from dreamlite_jax.eval import shapes_scoring
from dreamlite_jax.job.preemption import raise_if_preempted
from dreamlite_jax.training import checkpoints
from dreamlite_jax.training import metrics as metrics_lib
from dreamlite_jax.training import pretrain_loss
from dreamlite_jax.training import trainer


def init_unet_fn(unet, latent_hw: tuple[int, int], text_length: int, text_dim: int):
  """`rng -> params` of the U-Net on a `[1, h, 2w, 4]` canvas (boxed, for the trainer)."""
  h, w = latent_hw

  def init(rng):
    return unet.init(rng, jnp.zeros((1, h, 2 * w, 4)), jnp.zeros((1,)),
                     jnp.zeros((1, text_length, text_dim)), jnp.ones((1, text_length), jnp.int32),
                     jnp.full((1, 2), 8.0 * w))["params"]

  return init


def train_unet(ctx, config) -> trainer.TrainResult:
  """Runs the flow-matching trainer for `config` (a `ctx.stage_config()`) in `ctx.workdir`."""
  models = ctx.models
  section = ctx.section
  loss_cfg = pretrain_loss.PretrainLossConfig(**config.loss.to_dict())
  loss_fn = pretrain_loss.make_pretrain_loss(pretrain_loss.unet_predict_fn(models.unet), loss_cfg)
  latent = stage_data.first_side(ctx.config, section) // models.vae_config.downsample_factor
  init = init_unet_fn(models.unet, (latent, latent), *stage_data.text_shape(ctx, section))
  seed = config.seed + _stage_salt(ctx.name)
  batches = stage_data.unet_batches(ctx, section, config.train.batch_size, seed)
  sample_fn, eval_fn, eval_every = None, None, 0
  if stage_data.source(ctx.config) == "cache" and config.train.sample_every:
    sample_fn = cached_sample_fn(ctx, section, batches)
  if stage_data.source(ctx.config) == "shapes" and ctx.config.eval.stage_check.enabled:
    eval_every = int(ctx.config.eval.stage_check.every)
    eval_fn = lambda params, step: curve_point(stage_check(ctx, params))
  return trainer.train(config, ctx.workdir, loss_fn, batches, init, sample_fn=sample_fn,
                       eval_fn=eval_fn, eval_every=eval_every)


def cached_sample_fn(ctx, section, batches):
  """The trainer's `sample_fn(params, step)`: fixed cached prompts (`config.samples`) sampled
  at the side the stage trains at that step; the same conditions every time."""
  samples = ctx.config.samples
  sampler = SamplerConfig.from_config(samples.sampler, "config.samples.sampler")
  conditions: dict[int, dict] = {}

  def sample(params, step):
    side = batches.side_at(step - 1)
    if side not in conditions:
      conditions[side] = stage_data.sample_conditions(ctx.config, section, side,
                                                      int(samples.count), int(samples.seed))
    c = conditions[side]
    return ctx.models.pipeline(params).sample_cached(
        c, steps=sampler.steps, guidance=sampler.guidance,
        image_guidance=sampler.image_guidance, seed=int(samples.seed))

  return sample


def _stage_salt(name: str) -> int:
  # Each stage sees its own batch stream (a deterministic function of the name).
  return sum(ord(c) * 31 ** i for i, c in enumerate(name)) % 100_003


def stage_check(ctx, params, grids: bool = False) -> dict:
  """The small shapes evaluation of a stage (None-free nested scores); `grids` writes
  the sample grids next to the stage's outputs."""
  check = ctx.config.eval.stage_check
  sets = shapes_scoring.eval_sets(ctx.config, check.per_category, check.per_type)
  sampler = SamplerConfig.from_config(check.sampler, "config.eval.stage_check.sampler")
  return shapes_scoring.evaluate(ctx.models.pipeline(checkpoints.as_numpy(params)), sets,
                                 sampler, int(check.batch_size), int(check.seed),
                                 grid_dir=ctx.workdir if grids else None, prefix="samples_")


def curve_point(scores: dict) -> dict[str, float]:
  """The learning-curve metrics of a stage check (`report.LEARNING_CURVE` plots them)."""
  return {"check_t2i": scores["t2i"]["overall"], "check_edit": scores["edit"]["accuracy"]}


def final_loss(workdir: str) -> float | None:
  """The last logged training loss of a stage (read back, so a resumed stage reports it too)."""
  losses = [h["loss"] for h in metrics_lib.read_metrics(workdir) if "loss" in h]
  return losses[-1] if losses else None


def run_stage(ctx) -> dict:
  """Trains one pretraining/SFT stage; returns steps, final loss and stage-check scores."""
  config = ctx.stage_config()
  result = train_unet(ctx, config)
  raise_if_preempted(result, ctx.name)
  out = {"steps": int(result.final_step), "final_loss": final_loss(ctx.workdir),
         "compile_seconds": result.compile_seconds}
  if stage_data.source(ctx.config) == "shapes" and ctx.config.eval.stage_check.enabled:
    out["scores"] = stage_check(ctx, result.state.ema_params, grids=True)
    out["sample_grids"] = ["samples_t2i.png", "samples_edit.png"]
  return out
