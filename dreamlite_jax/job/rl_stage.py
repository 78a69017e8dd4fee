"""The `rl` stage of a job: Flow-GRPO, DiffusionNFT or ReFL from the SFT checkpoint.

`rl.method` (required) picks the algorithm: "flow_grpo" (alias "grpo") and "nft"
(DiffusionNFT, `training/rl_nft.py`) are online RL; "refl" backpropagates a
differentiable reward through a one-step x0 prediction at a late timestep, with the
thresholds and regulariser weight of `rl.refl` (`ReFLConfig` fields).

Where prompts and rewards come from follows the job's data source:
  shapes  (`training/rl_shapes.py`) prompts from the shapes generator, text features from
          the job's text encoder; Flow-GRPO and DiffusionNFT are rewarded by the exact
          programmatic shapes reward (ReFL by `rl.reward`), and the stage is scored
          before/after with the exact shapes evaluator (`eval.per_category`,
          `eval.per_type`, `eval.sampler`, `eval.batch_size`, `eval.seed`);
  cache   (`training/rl_cached.py`) prompts from the job's embedding caches at
          `rl.data.size` (T2I and edit at `edit_fraction`; their cached text and
          null-text features and edit source latents: no text encoder runs), rewarded by
          `rl.reward` (e.g. "clip": CLIP similarity of the image and the prompt string,
          loaded from a local folder), and scored before/after as the mean reward of a
          fixed set of `eval.count` cached prompts sampled with `eval.sampler` from the
          same noise both times (grids `samples_before.png`, `samples.png`).
The reward loads before any rollout; an unknown or non-loadable one fails naming
`rl.reward.name` / `rl.reward.path`.

The stage runs through the trainer's loop (`trainer.run`): its data iterator is
`rl_rollouts.Rollouts`. One online iteration draws `prompts_per_iteration` prompts,
samples G results each with the current params and `rl.sampler` (GRPO: SDE rollouts
with per-step log-probs; NFT: the pipeline's ODE sampler), decodes and rewards them, takes
group-relative advantages and `num_minibatches` train steps (GRPO: the clipped loss
with a KL to the SFT model; NFT: the negative-aware flow-matching loss); a ReFL
iteration is one train step on prompts_per_iteration examples. The trainer's
`train.steps`, `batch_size` and `checkpoint_every` follow from `iterations`, the rows
per update and `checkpoint_every` (in iterations). On several processes each one rolls
out its own block of every iteration's prompts. Checkpoints hold the prompt stream's
state, so a re-run (or a preempted one) resumes at the last saved iteration with the
next prompts. Reported: reward before/after, the train reward, the distance to the
reference (GRPO: KL; NFT: mean squared velocity change) and a sample diversity figure
(mean per-pixel std within a prompt's group), first vs last iteration.

Section fields: kind, parent, use_ema, method, iterations, prompts_per_iteration,
edit_fraction, num_minibatches, checkpoint_every, sampler (the rollouts' `SamplerConfig`:
steps, guidance, image_guidance; ReFL's schedule is `refl.num_steps`), grpo (GRPOConfig
fields), nft (NFTConfig fields), refl (ReFLConfig fields), reward (name, path), train
(trainer fields; steps, batch_size, checkpoint_every derived as above), eval (sampler,
batch_size, seed; shapes: per_category, per_type; cache: count), data.size (cache only).
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections

from dreamlite_jax.job import stage_data
from dreamlite_jax import config_schema
from dreamlite_jax.config import ConfigError
from dreamlite_jax.diffusion.sampling import SamplerConfig
from dreamlite_jax.eval import shapes_scoring
from dreamlite_jax.job.preemption import raise_if_preempted
from dreamlite_jax.rewards.registry import make_reward
from dreamlite_jax.rewards.shapes_programmatic import ShapesReward
from dreamlite_jax.training import checkpoints as ckpt
from dreamlite_jax.training import mesh as mesh_lib
from dreamlite_jax.training import metrics as metrics_lib
from dreamlite_jax.training import pretrain_loss
from dreamlite_jax.job import pretrain_stage
from dreamlite_jax.training import rl_cached
from dreamlite_jax.training import rl_grpo
from dreamlite_jax.training import rl_nft
from dreamlite_jax.training import rl_refl
from dreamlite_jax.training import rl_rollouts
from dreamlite_jax.training import rl_shapes
from dreamlite_jax.training import trainer

PROMPT_SEED = 7_000_003  # RL prompts: training pairs, a stream apart from SFT data and eval
EVAL_SEED = 7_100_003    # the fixed cached prompts scored before and after
METHODS = {"grpo": "flow_grpo", "flow_grpo": "flow_grpo", "nft": "nft", "refl": "refl"}


def method_of(name: str, section: ml_collections.ConfigDict) -> str:
  """The section's algorithm; missing or unknown fails naming `config.<name>.method`."""
  method = section.get("method")
  if method is None:
    raise ConfigError(f"config.{name}.method is required: one of {sorted(METHODS)}")
  if str(method) not in METHODS:
    raise ConfigError(f"config.{name}.method = {method!r}; expected one of {sorted(METHODS)}")
  return METHODS[str(method)]


def load_reward(name: str, section: ml_collections.ConfigDict, method: str, cached: bool):
  """The reward of the run, loaded before any rollout: the exact shapes reward for the
  online methods on the shapes world, else `rl.reward` (from local weights)."""
  if method != "refl" and not cached:
    return ShapesReward()
  where = (f"config.{name}.reward (name={section.reward.name!r}, "
           f"path={section.reward.path!r})")
  if cached and section.reward.name == "shapes":
    raise ConfigError(f"{where}: the shapes reward reads shapes metadata; prompts from "
                      f"embedding caches need an image-text reward (e.g. clip)")
  try:
    reward = make_reward(str(section.reward.name), str(section.reward.path))
  except (ValueError, OSError, KeyError) as e:
    raise ConfigError(f"{where}: {e}") from e
  if method == "refl" and not getattr(reward, "differentiable_available", False):
    raise ConfigError(f"config.{name}.reward.name = {section.reward.name!r} is not "
                      f"differentiable; ReFL needs one of learned_shapes, clip")
  return reward


def prompt_stream(config: ml_collections.ConfigDict, section: ml_collections.ConfigDict,
                  count: int, seed: int, size: int):
  """Endless batches of `count` cached conditions with prompts at `size`, T2I and edit at
  the section's edit_fraction (every process reads the same global batch)."""
  return stage_data.fixed_cache_batches(config, size, count, seed, section.edit_fraction,
                                        keep_prompts=True)


def _check_rows(name: str, section, method: str, grpo, nft, sampler: SamplerConfig,
                shards: int, processes: int) -> tuple[int, int]:
  """An iteration's prompts split over the processes; its update rows split into
  num_minibatches minibatches (ReFL: one step on prompts_per_iteration rows), each a
  multiple of the mesh's data shards. Returns (rows per iteration, updates per iteration)."""
  prompts, minibatches = int(section.prompts_per_iteration), int(section.num_minibatches)
  if prompts % processes:
    raise ConfigError(f"config.{name}.prompts_per_iteration = {prompts}: must be divisible by "
                      f"jax.process_count() = {processes} (each process rolls out its prompts)")
  if method == "refl":
    rows, what, minibatches = prompts, "prompts_per_iteration", 1
  elif method == "nft":
    rows = prompts * nft.group_size * nft.noise_draws
    what = "prompts_per_iteration * nft.group_size * nft.noise_draws"
  else:
    rows = prompts * grpo.group_size * sampler.steps
    what = "prompts_per_iteration * grpo.group_size * sampler.steps"
  if rows % minibatches:
    raise ConfigError(f"config.{name}: {what} = {rows} is not divisible by num_minibatches")
  if (rows // minibatches) % shards:
    raise ConfigError(f"config.{name}: {rows // minibatches} update rows per step ({what}"
                      f"{'' if method == 'refl' else ' / num_minibatches'}) do not split over "
                      f"the mesh's {shards} data shards")
  return rows, minibatches


def _train_figures(metrics: list[dict]) -> dict:
  """Train reward, distance to the reference and diversity, first vs last iteration,
  from the stage's logged metrics."""
  draws = [m for m in metrics if "reward" in m]
  first, last = (draws[0], draws[-1]) if draws else ({}, {})
  steps = [m for m in metrics if "loss" in m]
  final = steps[-1] if steps else {}
  return {"train_reward_first": first.get("reward"), "train_reward_last": last.get("reward"),
          # GRPO: the KL of its SDE policy to the SFT model; NFT: the mean squared change
          # of the conditional velocity from the SFT model's on the last rows.
          "kl_to_reference": final.get("kl_ref"),
          "velocity_drift_to_reference": final.get("drift_ref"),
          "diversity_first": first.get("diversity"), "diversity_last": last.get("diversity")}


def _trainer_config(config: ml_collections.ConfigDict, section: ml_collections.ConfigDict,
                    rows_per_update: int, updates: int) -> ml_collections.ConfigDict:
  """The stage config with the trainer's step counts in RL units: `iterations` x updates
  per iteration steps of `rows_per_update` rows, a checkpoint every `checkpoint_every`
  iterations, no gradient accumulation (`config_schema.check_rl_accum_steps`)."""
  config.train.steps = int(section.iterations) * updates
  config.train.batch_size = rows_per_update
  config.train.checkpoint_every = int(section.checkpoint_every) * updates
  config.train.accum_steps = 1
  return config


def run_stage(ctx) -> dict:
  """Runs RL from the parent (SFT) checkpoint; returns steps, rl figures and scores."""
  section, name, models = ctx.section, ctx.name, ctx.models
  if not ctx.parent_workdir:
    raise ConfigError(f"config.{name}.parent must name the stage RL starts from (sft)")
  method = method_of(name, section)
  config_schema.check_rl_accum_steps(section, name)
  cached = stage_data.source(ctx.config) == "cache"
  if cached and "size" not in section.get("data", {}):
    raise ConfigError(f"config.{name}.data.size is required with data.source = 'cache': the "
                      f"image side whose caches (<cache>/<size>/) prompts are read from")
  size = int(section.data.size) if cached else models.image_size
  grpo = rl_grpo.GRPOConfig(**section.grpo.to_dict())
  nft = rl_nft.NFTConfig(**(section.nft.to_dict() if "nft" in section else {}))
  sampler = SamplerConfig.from_config(section.sampler, f"config.{name}.sampler")
  eval_sampler = SamplerConfig.from_config(section.eval.sampler, f"config.{name}.eval.sampler")
  eval_batch, eval_seed = int(section.eval.batch_size), int(section.eval.seed)
  group, prompts = grpo.group_size, int(section.prompts_per_iteration)
  mesh = mesh_lib.make_mesh(ctx.config.mesh)
  rows, updates = _check_rows(name, section, method, grpo, nft, sampler,
                              mesh.shape["data"] * mesh.shape["fsdp"], jax.process_count())
  reward = load_reward(name, section, method, cached)
  config = _trainer_config(ctx.stage_config(), section, rows // updates, updates)
  config.init_from.ema_as_params = bool(section.use_ema)

  reference = ckpt.load_params(ctx.parent_workdir, ema=bool(section.use_ema))
  predict = pretrain_loss.unet_predict_fn(models.unet)
  # Every process rolls out its block of each iteration's prompts and evaluates the
  # whole fixed set (the same figures everywhere); process 0 writes the files.
  is_main = jax.process_index() == 0
  if cached:
    conditioner = rl_cached.CachedConditioner(models)
    held = next(prompt_stream(ctx.config, section, int(section.eval.count),
                              EVAL_SEED + ctx.config.seed, size))
    stream = prompt_stream(ctx.config, section, prompts, PROMPT_SEED + ctx.config.seed, size)
    next_items = lambda it: rl_cached.items(next(stream))

    def evaluate(params, grid: str) -> dict:
      scores = rl_cached.reward_scores(models.pipeline(params), held, eval_sampler, eval_batch,
                                       eval_seed, reward, conditioner)
      images = scores.pop("images")
      if is_main:
        metrics_lib.write_grid(os.path.join(ctx.workdir, grid), images)
      return scores
  else:
    stream = None
    conditioner = rl_shapes.Conditioner(models, size)
    sets = shapes_scoring.eval_sets(ctx.config, section.eval.per_category, section.eval.per_type)
    next_items = lambda it: rl_shapes.draw_prompts(it, prompts, float(section.edit_fraction),
                                                   size, PROMPT_SEED + ctx.config.seed)
    evaluate = lambda params, grid: shapes_scoring.evaluate(
        models.pipeline(params), sets, eval_sampler, eval_batch, eval_seed,
        grid_dir=ctx.workdir if grid == "samples.png" and is_main else None, prefix="samples_")

  if method == "refl":
    refl_config = rl_refl.ReFLConfig(**(section.refl.to_dict() if "refl" in section else {}))
    vae, vae_params = models.vae, models.vae_params
    decode = lambda z: vae.apply({"params": vae_params}, z, method="decode")
    loss_fn = rl_refl.make_refl_loss(predict, decode, reward.differentiable, refl_config)
    rows_fn = rl_rollouts.refl_rows(conditioner, reward)
  elif method == "nft":
    loss_fn = rl_nft.make_nft_loss(predict, nft)
    rows_fn = rl_rollouts.nft_rows(models.pipeline, rl_nft.make_velocity(predict), conditioner,
                                   reward, reference, nft, sampler, config.seed)
  else:
    loss_fn = rl_grpo.make_grpo_loss(predict, grpo, sampler)
    rows_fn = rl_rollouts.grpo_rows(rl_grpo.make_rollout(predict, grpo, sampler), conditioner,
                                    reward, reference, rl_grpo.rollout_sigmas(sampler), group,
                                    config.seed)
  data = rl_rollouts.Rollouts(rows_fn, next_items, updates, config.seed, stream)

  latent = size // models.vae_config.downsample_factor
  length = int(ctx.config.model.text_encoder.text_length)
  init = pretrain_stage.init_unet_fn(models.unet, (latent, latent), length,
                                     models.unet_config.encoder_hid_dim)
  results_path = os.path.join(ctx.workdir, "rl_progress.json")
  progress = {}
  if os.path.exists(results_path):
    with open(results_path) as f:
      progress = json.load(f)
  if "before" not in progress:
    progress["before"] = evaluate(reference, "samples_before.png")
    if is_main:
      os.makedirs(ctx.workdir, exist_ok=True)
      with open(results_path, "w") as f:
        json.dump(progress, f)
  result = trainer.train(config, ctx.workdir, loss_fn, data, init)
  raise_if_preempted(result, name)

  after = evaluate(ckpt.as_numpy(result.state.params), "samples.png")
  figures = _train_figures(metrics_lib.read_metrics(ctx.workdir))
  if cached:
    rl = {"before": progress["before"]["reward"], "after": after["reward"],
          "eval_count": int(section.eval.count), **figures, "method": method,
          "reward": f"{section.reward.name} ({section.reward.path})"}
    scores, grids = {"rl": rl}, ["samples_before.png", "samples.png"]
  else:
    reward_name = ("shapes (programmatic, partial credit)" if method in ("flow_grpo", "nft")
                   else f"{type(reward).__name__} (differentiable)")
    rl = {**rl_shapes.results(progress["before"], after), **figures,
          "method": method, "reward": reward_name}
    scores = {"rl": rl, "before": progress["before"], "after": after}
    grids = ["samples_t2i.png", "samples_edit.png"]
  if is_main:
    with open(os.path.join(ctx.workdir, "scores.json"), "w") as f:
      json.dump(scores, f, indent=2)
  out = {"steps": result.final_step,
         "final_loss": result.history[-1]["loss"] if result.history else None, "rl": rl,
         "source": result.source, "sample_grids": grids}
  if not cached:
    out.update(scores=after, scores_before=progress["before"])
  return out
