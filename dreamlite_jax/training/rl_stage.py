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
          `eval.per_type`, `eval.sampler`);
  cache   (`training/rl_cached.py`) prompts from the job's embedding caches at
          `rl.data.size` (T2I and edit at `edit_fraction`; their cached text and
          null-text features and edit source latents: no text encoder runs), rewarded by
          `rl.reward` (e.g. "clip": CLIP similarity of the image and the prompt string,
          loaded from a local folder), and scored before/after as the mean reward of a
          fixed set of `eval.count` cached prompts sampled with `eval.sampler` from the
          same noise both times (grids `samples_before.png`, `samples.png`).
The reward loads before any rollout; an unknown or non-loadable one fails naming
`rl.reward.name` / `rl.reward.path`.

One online iteration: draw `prompts_per_iteration` prompts, sample G results each with
the current params (GRPO: SDE rollouts with per-step log-probs; NFT: the pipeline's ODE
sampler), decode with the VAE, reward them, take group-relative advantages and
`num_minibatches` shared-train-step updates (GRPO: the clipped loss with a KL to the
SFT model; NFT: the negative-aware flow-matching loss). A ReFL iteration is one train
step on prompts_per_iteration examples. Reported: reward before/after, the train reward,
the distance to the reference (GRPO: KL; NFT: mean squared velocity change) and a sample
diversity figure (mean per-pixel std within a prompt's group), first vs last iteration.

On several processes each one rolls out, decodes and rewards its own block of every
iteration's prompts (a prompt's whole group on one process, so group advantages stay
local) with a gathered copy of the params, and the updates shard those rows over the
job's mesh; logged rewards are over all processes. The TrainState is born sharded on the
mesh and checkpointed with the shared orbax manager, with the prompt stream's state, so
a re-run resumes at the last saved iteration with the next prompts.

Section fields: kind, parent, use_ema, method, iterations, prompts_per_iteration,
edit_fraction, num_minibatches, sample_steps (GRPO), checkpoint_every, grpo (GRPOConfig
fields), nft (NFTConfig fields), refl (ReFLConfig fields), reward (name, path), train
(trainer fields), eval (shapes: per_category, per_type, sampler; cache: count, sampler
{steps, guidance, image_guidance, batch_size, seed}), data.size (cache only).
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dreamlite_jax import stage_data
from dreamlite_jax.config import ConfigError
from dreamlite_jax.diffusion import flow
from dreamlite_jax.eval import shapes_stage
from dreamlite_jax.rewards import make_reward
from dreamlite_jax.rewards.shapes_programmatic import ShapesReward
from dreamlite_jax.training import checkpoints as ckpt
from dreamlite_jax.training import mesh as mesh_lib
from dreamlite_jax.training import metrics as metrics_lib
from dreamlite_jax.training import pretrain_loss
from dreamlite_jax.training import pretrain_stage
from dreamlite_jax.training import rl_cached
from dreamlite_jax.training import rl_grpo
from dreamlite_jax.training import rl_nft
from dreamlite_jax.training import rl_refl
from dreamlite_jax.training import rl_shapes
from dreamlite_jax.training import state as state_lib
from dreamlite_jax.training import step as step_lib

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


def _check_rows(name: str, section, method: str, grpo, nft, shards: int,
                processes: int) -> None:
  """An iteration's prompts split over the processes; its update rows split into
  num_minibatches minibatches (ReFL: one step on prompts_per_iteration rows), each a
  multiple of the mesh's data shards."""
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
    rows = prompts * grpo.group_size * int(section.sample_steps)
    what = "prompts_per_iteration * grpo.group_size * sample_steps"
  if rows % minibatches:
    raise ConfigError(f"config.{name}: {what} = {rows} is not divisible by num_minibatches")
  if (rows // minibatches) % shards:
    raise ConfigError(f"config.{name}: {rows // minibatches} update rows per step ({what}"
                      f"{'' if method == 'refl' else ' / num_minibatches'}) do not split over "
                      f"the mesh's {shards} data shards")


def group_diversity(images: np.ndarray, group: int) -> float:
  """Mean over prompts of the per-pixel std across the prompt's G samples (0-255 scale)."""
  x = images.astype(np.float32).reshape((-1, group) + images.shape[1:])
  return float(x.std(axis=1).mean())


def _iteration_noise(seed: int, it: int, rows: int, shape: tuple) -> np.ndarray:
  """This process's block of the iteration's global starting noise `[rows, *shape]`."""
  noise = jax.random.normal(jax.random.PRNGKey(seed * 100_003 + it), (rows, *shape))
  return np.asarray(noise[mesh_lib.host_rows(rows)])


def _grpo_iteration(config, state, items, group, conditioner, rollout, reference, sigmas,
                    reward, step_fn, mesh, rng, it, section) -> dict:
  """One Flow-GRPO iteration on this process's prompts: roll out, reward, advantages
  (a prompt's group is on one process), minibatch updates."""
  mine = items[mesh_lib.host_rows(len(items))]
  condition, cond, uncond, sources = conditioner(mine, group)
  noise = _iteration_noise(config.seed, it, len(items) * group, condition.shape[1:])
  out = rollout(mesh_lib.to_host(state.params), reference, noise, condition, sigmas, cond,
                uncond, jax.random.fold_in(jax.random.PRNGKey(it + 1), jax.process_index()))
  images = conditioner.decode(out["latents"])
  metas = [it_["metadata"] for it_ in mine for _ in range(group)]
  rewards = reward(images, metas, sources)
  adv = rl_grpo.group_advantages(rewards, group)
  batch = rl_grpo.flatten_rollout(out, condition, sigmas, cond, uncond, adv)
  state, history = rl_grpo.update(step_fn, state, batch, int(section.num_minibatches), mesh,
                                  rng, config.seed * 7919 + it)
  return _iteration_scalars(history, rewards, mine, images, group, state)


def _nft_iteration(config, state, items, nft, conditioner, pipeline, velocity, reference,
                   reward, step_fn, mesh, rng, it, section) -> dict:
  """One DiffusionNFT iteration on this process's prompts: sample with the pipeline's
  ODE, reward, optimality probabilities, forward-process rows, minibatch updates."""
  group = nft.group_size
  mine = items[mesh_lib.host_rows(len(items))]
  condition, cond, uncond, sources = conditioner(mine, group)
  params = mesh_lib.to_host(state.params)
  noise = _iteration_noise(config.seed, it, len(items) * group, condition.shape[1:])
  guided = nft.guidance > 0
  latents = np.asarray(pipeline(params).denoise(
      jnp.asarray(noise), jnp.asarray(condition), cond, uncond if guided else None,
      nft.sample_steps, nft.guidance if guided else None,
      (nft.image_guidance or None) if guided else None))
  images = conditioner.decode(latents)
  metas = [it_["metadata"] for it_ in mine for _ in range(group)]
  rewards = reward(images, metas, sources)
  r = rl_nft.optimality(rl_grpo.group_advantages(rewards, group), nft.adv_clip)
  rows = rl_nft.training_rows(velocity, params, reference, latents, condition, cond, r,
                              nft.noise_draws, group,
                              np.random.default_rng([config.seed, it, jax.process_index()]))
  state, history = rl_grpo.update(step_fn, state, rows, int(section.num_minibatches), mesh,
                                  rng, config.seed * 7919 + it, block=group)
  return _iteration_scalars(history, rewards, mine, images, group, state)


def _iteration_scalars(history, rewards, items, images, group, state) -> dict:
  """Mean update metrics, train rewards (all, T2I, edit) and diversity over every
  process's rollouts, and the new state."""
  edit = mesh_lib.gather_rows(np.array([it["source"] is not None for it in items
                                        for _ in range(group)]))
  rewards = mesh_lib.gather_rows(np.asarray(rewards, np.float32))
  scalars = {k: float(np.mean([h[k] for h in history])) for k in history[0]}
  scalars.update(reward=float(rewards.mean()),
                 reward_t2i=float(rewards[~edit].mean()) if (~edit).any() else 0.0,
                 reward_edit=float(rewards[edit].mean()) if edit.any() else 0.0,
                 diversity=float(mesh_lib.gather_rows(
                     np.array([group_diversity(images, group)])).mean()))
  scalars["state"] = state
  return scalars


def refl_batch(conditioner, reward, items: list[dict]) -> dict:
  """The ReFL batch of prompt items: the pretraining batch (target and source latents,
  is_edit, text features, time_ids) plus the reward's tokenized `reward_text` as
  reward_ids [B, ...] / reward_mask [B, ...]."""
  condition, cond, _, _ = conditioner(items, 1)
  latents = conditioner.encode_targets(items)
  ids, mask = reward.tokenize([it["reward_text"] for it in items])
  return {"latents": latents.astype(np.float32), "source_latents": condition,
          "is_edit": np.array([it["source"] is not None for it in items], np.float32),
          "text": cond["text"], "text_mask": cond["text_mask"], "time_ids": cond["time_ids"],
          "reward_ids": np.asarray(ids), "reward_mask": np.asarray(mask)}


def _train_figures(log: list[dict]) -> dict:
  """Train reward, distance to the reference and diversity, first vs last iteration."""
  first, last = (log[0], log[-1]) if log else ({}, {})
  return {"train_reward_first": first.get("reward"), "train_reward_last": last.get("reward"),
          # GRPO: the KL of its SDE policy to the SFT model; NFT: the mean squared change
          # of the conditional velocity from the SFT model's on the last rows.
          "kl_to_reference": last.get("kl_ref"),
          "velocity_drift_to_reference": last.get("drift_ref"),
          "diversity_first": first.get("diversity"), "diversity_last": last.get("diversity")}


def run_stage(ctx) -> dict:
  """Runs RL from the parent (SFT) checkpoint; returns steps, rl figures and scores."""
  section, name, models = ctx.section, ctx.name, ctx.models
  if not ctx.parent_workdir:
    raise ConfigError(f"config.{name}.parent must name the stage RL starts from (sft)")
  method = method_of(name, section)
  cached = stage_data.source(ctx.config) == "cache"
  if cached and "size" not in section.get("data", {}):
    raise ConfigError(f"config.{name}.data.size is required with data.source = 'cache': the "
                      f"image side whose caches (<cache>/<size>/) prompts are read from")
  size = int(section.data.size) if cached else models.image_size
  config = ctx.stage_config()
  config.init_from.ema_as_params = bool(section.use_ema)
  grpo = rl_grpo.GRPOConfig(**section.grpo.to_dict())
  nft = rl_nft.NFTConfig(**(section.nft.to_dict() if "nft" in section else {}))
  group, prompts = grpo.group_size, int(section.prompts_per_iteration)
  mesh = mesh_lib.make_mesh(config.mesh)
  _check_rows(name, section, method, grpo, nft, mesh.shape["data"] * mesh.shape["fsdp"],
              jax.process_count())
  reward = load_reward(name, section, method, cached)

  tx = state_lib.make_optimizer(config.train)
  latent = size // models.vae_config.downsample_factor
  length = int(ctx.config.model.text_encoder.text_length)
  init = pretrain_stage.init_unet_fn(models.unet, (latent, latent), length,
                                     models.unet_config.encoder_hid_dim)
  abstract, shardings = state_lib.state_shardings(init, tx, mesh)
  manager = ckpt.make_manager(ckpt.checkpoint_dir(ctx.workdir), keep=1, async_save=False)
  state, data_state, source = ckpt.restore_or_init(
      config, manager, abstract, lambda: state_lib.create_state(init, tx, mesh, config.seed),
      lambda p, e: state_lib.state_from_params(p, e, tx, shardings, config.seed))
  reference = ckpt.load_params(ctx.parent_workdir, ema=bool(section.use_ema))
  predict = pretrain_loss.unet_predict_fn(models.unet)
  if method == "refl":
    refl_config = rl_refl.ReFLConfig(**(section.refl.to_dict() if "refl" in section else {}))
    vae, vae_params = models.vae, models.vae_params
    decode = lambda z: vae.apply({"params": vae_params}, z, method="decode")
    loss_fn = rl_refl.make_refl_loss(predict, decode, reward.differentiable, refl_config)
  elif method == "nft":
    loss_fn = rl_nft.make_nft_loss(predict, nft)
  else:
    loss_fn = rl_grpo.make_grpo_loss(predict, grpo)
  jitted_step = step_lib.make_train_step(
      loss_fn, tx, mesh, shardings,
      compute_dtype=state_lib.DTYPES[config.train.compute_dtype],
      ema_decay=config.train.ema_decay)
  schedule = state_lib.make_schedule(config.train)
  step_fn = lambda state, batch, rng: jitted_step(
      state, batch, rng, step_lib.learning_rate(schedule, int(mesh_lib.host_value(state.step))))
  rollout = rl_grpo.make_rollout(predict, grpo)
  velocity = rl_nft.make_velocity(predict)
  sigmas = flow.sampling_sigmas(int(section.sample_steps), 0.0)
  rng = jax.make_array_from_process_local_data(mesh_lib.replicated(mesh),
                                               mesh_lib.host_value(state.rng))

  # Every process rolls out its block of each iteration's prompts and evaluates the
  # whole fixed set (the same figures everywhere); process 0 writes the files.
  is_main = jax.process_index() == 0
  if cached:
    conditioner = rl_cached.CachedConditioner(models)
    held = next(prompt_stream(ctx.config, section, int(section.eval.count),
                              EVAL_SEED + ctx.config.seed, size))
    stream = prompt_stream(ctx.config, section, prompts, PROMPT_SEED + ctx.config.seed, size)
    if data_state:
      stream.set_state(data_state["prompts"])
    next_items = lambda it: rl_cached.items(next(stream))

    def evaluate(params, grid: str) -> dict:
      scores = rl_cached.reward_scores(models.pipeline(params), held, section.eval.sampler,
                                       reward, conditioner)
      images = scores.pop("images")
      if is_main:
        metrics_lib.write_grid(os.path.join(ctx.workdir, grid), images)
      return scores
  else:
    conditioner = rl_shapes.Conditioner(models, size)
    sets = shapes_stage.eval_sets(ctx.config, section.eval.per_category, section.eval.per_type)
    next_items = lambda it: rl_shapes.draw_prompts(it, prompts, float(section.edit_fraction),
                                                   size, PROMPT_SEED + ctx.config.seed)
    evaluate = lambda params, grid: shapes_stage.evaluate(
        models.pipeline(params), sets, section.eval.sampler,
        grid_dir=ctx.workdir if grid == "samples.png" and is_main else None, prefix="samples_")

  results_path = os.path.join(ctx.workdir, "rl_progress.json")
  progress = {}
  if os.path.exists(results_path):
    with open(results_path) as f:
      progress = json.load(f)
  if "before" not in progress:
    progress["before"] = evaluate(reference, "samples_before.png")
  writer = metrics_lib.MetricsWriter(ctx.workdir, enabled=is_main)
  start = int(data_state["iteration"]) if data_state else 0
  iterations = int(section.iterations)
  t0 = time.time()
  for it in range(start, iterations):
    items = next_items(it)
    if method == "refl":
      batch = refl_batch(conditioner, reward, items[mesh_lib.host_rows(len(items))])
      state, metrics = step_fn(state, mesh_lib.shard_batch(batch, mesh), rng)
      scalars = {k: float(mesh_lib.host_value(v)) for k, v in metrics.items()}
    elif method == "nft":
      scalars = _nft_iteration(config, state, items, nft, conditioner, models.pipeline, velocity,
                               reference, reward, step_fn, mesh, rng, it, section)
      state = scalars.pop("state")
    else:
      scalars = _grpo_iteration(config, state, items, group, conditioner, rollout, reference,
                                sigmas, reward, step_fn, mesh, rng, it, section)
      state = scalars.pop("state")
    writer.write(it + 1, scalars)
    writer.flush()
    progress.setdefault("iterations", []).append({"iteration": it + 1, **scalars})
    if is_main:
      print(f"[rl:{method}] iteration {it + 1}/{iterations}: reward {scalars['reward']:.3f} "
            f"loss {scalars['loss']:.4f} ({time.time() - t0:.0f}s)", flush=True)
    if (it + 1) % int(section.checkpoint_every) == 0 or it + 1 == iterations:
      data = {"iteration": it + 1, **({"prompts": stream.get_state()} if cached else {})}
      ckpt.save(manager, state, data, config)
      manager.wait_until_finished()
      if is_main:
        with open(results_path, "w") as f:
          json.dump(progress, f)
  manager.close()
  writer.close()

  after = evaluate(ckpt.as_numpy(state.params), "samples.png")
  log = progress.get("iterations", [])
  if cached:
    rl = {"before": progress["before"]["reward"], "after": after["reward"],
          "eval_count": int(section.eval.count), **_train_figures(log), "method": method,
          "reward": f"{section.reward.name} ({section.reward.path})"}
    scores, grids = {"rl": rl}, ["samples_before.png", "samples.png"]
  else:
    reward_name = ("shapes (programmatic, partial credit)" if method in ("flow_grpo", "nft")
                   else f"{type(reward).__name__} (differentiable)")
    rl = {**rl_shapes.results(progress["before"], after), **_train_figures(log),
          "method": method, "reward": reward_name}
    scores = {"rl": rl, "before": progress["before"], "after": after}
    grids = ["samples_t2i.png", "samples_edit.png"]
  if is_main:
    with open(os.path.join(ctx.workdir, "scores.json"), "w") as f:
      json.dump(scores, f, indent=2)
  out = {"steps": int(mesh_lib.host_value(state.step)),
         "final_loss": log[-1]["loss"] if log else None, "rl": rl, "source": source,
         "sample_grids": grids}
  if not cached:
    out.update(scores=after, scores_before=progress["before"])
  return out
