"""The `rl` stage of a job: Flow-GRPO, DiffusionNFT or ReFL from the SFT checkpoint.

`rl.method` picks the algorithm: "grpo" (alias "flow_grpo") and "nft"
(DiffusionNFT, `training/rl_nft.py`) are online RL; "refl" backpropagates a
differentiable reward (`rl.reward.name`, `rl.reward.path` its weights) through a
one-step x0 prediction at a late timestep, with the thresholds and regulariser
weight of `rl.refl` (`ReFLConfig` fields).

Where prompts and rewards come from follows the job's data source:
  shapes  prompts drawn from the shapes generator; Flow-GRPO and DiffusionNFT are
          rewarded by the exact programmatic shapes reward and everything is scored
          before/after with the exact evaluator;
  cache   prompts drawn from the job's embedding caches at `rl.data.size` (their
          cached text features, null-text features and edit source latents: no text
          encoder runs), rewarded by `rl.reward` (e.g. "clip" from a local folder),
          and scored before/after as the mean reward of a fixed set of `rl.eval.count`
          cached prompts sampled with `rl.eval.sampler` (the same noise both times).

Follows the stage-runner contract of `dreamlite_jax/stages.py`
(`run_stage(ctx: StageContext) -> dict`). Steps:
  1. score the parent's U-Net (EMA) on the fixed held-in prompt set and the
     held-out split (`shapes_stage.evaluate` with `eval.sampler`, the teacher's
     many-step CFG sampler: RL tunes the model distillation starts from) = "before";
  2. online iterations: draw prompts (T2I and edit, `edit_fraction`) from the
     training generator, sample G results each with the current params (GRPO: SDE
     rollouts with per-step log-probs; NFT: the pipeline's ODE sampler), decode with
     the VAE, reward them with `ShapesReward` (partial credit), take group-relative
     advantages and `num_minibatches` shared-train-step updates (GRPO: the clipped
     loss with a KL to the SFT model; NFT: the negative-aware flow-matching loss);
  3. score again = "after"; report reward, the distance to the reference (GRPO: KL;
     NFT: mean squared velocity change) and a sample diversity figure (mean
     per-pixel std within a prompt's group) first vs last.
The TrainState is born sharded on the job's mesh and checkpointed with the
shared orbax manager, so a re-run resumes at the last saved iteration.

Section fields: kind, parent, use_ema, method ("grpo" | "flow_grpo" | "nft" | "refl"),
iterations, prompts_per_iteration, edit_fraction, num_minibatches, sample_steps
(GRPO), checkpoint_every, grpo (GRPOConfig fields), nft (NFTConfig fields), refl
(ReFLConfig fields), reward (name, path), train (trainer fields), eval (shapes:
per_category, per_type, sampler; cache: count, sampler), data.size (cache only).
A ReFL iteration is one train step on prompts_per_iteration examples.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data_pipelines import shapes
from dreamlite_jax import stage_data
from dreamlite_jax.config import ConfigError
from dreamlite_jax.diffusion import flow
from dreamlite_jax.eval import shapes_stage
from dreamlite_jax.rewards import make_reward
from dreamlite_jax.rewards import shapes_text
from dreamlite_jax.rewards.shapes_programmatic import ShapesReward
from dreamlite_jax.training import checkpoints as ckpt
from dreamlite_jax.training import mesh as mesh_lib
from dreamlite_jax.training import metrics as metrics_lib
from dreamlite_jax.training import pretrain_loss
from dreamlite_jax.training import pretrain_stage
from dreamlite_jax.training import rl_grpo
from dreamlite_jax.training import rl_nft
from dreamlite_jax.training import rl_refl
from dreamlite_jax.training import state as state_lib
from dreamlite_jax.training import step as step_lib

PROMPT_SEED = 7_000_003  # RL prompts: training pairs, a stream apart from SFT data and eval
EVAL_SEED = 7_100_003    # the fixed cached prompts scored before and after
METHODS = {"grpo": "flow_grpo", "flow_grpo": "flow_grpo", "nft": "nft", "refl": "refl"}


def draw_prompts(iteration: int, count: int, edit_fraction: float, size: int, seed: int
                 ) -> list[dict]:
  """`count` prompts of the training split: {"text", "metadata", "source" (edits) uint8,
  "target" uint8 [H, W, 3] (the generator's answer), "reward_text" (a caption of the
  wanted result: the T2I caption, or `scene_caption` of the edit's target scene)}."""
  rng = np.random.default_rng([seed, iteration])
  out = []
  for j in range(count):
    index = iteration * count + j
    if rng.random() < edit_fraction:
      kind = shapes.EDIT_TYPES[int(rng.integers(len(shapes.EDIT_TYPES)))]
      ex = shapes.make_edit_example("train", kind, seed, index, size)
      out.append({"text": ex["instruction"], "metadata": ex["metadata"], "source": ex["source"],
                  "target": ex["target"],
                  "reward_text": shapes_text.scene_caption(ex["metadata"]["target"])})
    else:
      cat = shapes.T2I_CATEGORIES[int(rng.integers(len(shapes.T2I_CATEGORIES)))]
      ex = shapes.make_t2i_example("train", cat, seed, index, size)
      out.append({"text": ex["caption"], "metadata": ex["metadata"], "source": None,
                  "target": ex["image"], "reward_text": ex["caption"]})
  return out


class _Conditioner:
  """Text features, CFG negatives and condition latents of a prompt batch (fixed shapes)."""

  def __init__(self, models, size: int):
    self.models, self.size = models, size
    vae = models.vae
    self._encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode"))
    self._decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method="decode"))

  def __call__(self, items: list[dict], group: int):
    te, n = self.models.text_encoder, len(items)
    edit = np.array([it["source"] is not None for it in items])
    f_t, m_t = map(np.asarray, te.encode_generate([it["text"] for it in items]))
    f_e, m_e = map(np.asarray, te.encode_edit([it["text"] for it in items]))
    u_t, um_t = map(np.asarray, te.encode_generate_unconditional(n))
    u_e, um_e = map(np.asarray, te.encode_edit_unconditional(n))
    if f_t.shape != f_e.shape:
      raise ValueError(f"T2I features {f_t.shape} and edit features {f_e.shape} differ in shape; "
                       f"RL mixes both in one batch")
    pick = lambda a, b: np.where(edit.reshape((-1,) + (1,) * (a.ndim - 1)), b, a)
    sources = np.stack([it["source"] if it["source"] is not None
                        else np.zeros((self.size, self.size, 3), np.uint8) for it in items])
    latents = np.asarray(self._encode(self.models.vae_params,
                                      jnp.asarray(sources, jnp.float32) / 127.5 - 1.0))
    condition = np.where(edit[:, None, None, None], latents, 0.0).astype(np.float32)
    time_ids = flow.size_ids(n, self.size, self.size)
    rep = lambda a: np.repeat(a, group, axis=0)
    cond = {"text": rep(pick(f_t, f_e)).astype(np.float32),
            "text_mask": rep(pick(m_t, m_e)).astype(np.int32), "time_ids": rep(time_ids)}
    uncond = {"text": rep(pick(u_t, u_e)).astype(np.float32),
              "text_mask": rep(pick(um_t, um_e)).astype(np.int32), "time_ids": rep(time_ids)}
    return rep(condition), cond, uncond, rep(sources)

  def decode(self, latents) -> np.ndarray:
    images = np.asarray(self._decode(self.models.vae_params, jnp.asarray(latents)))
    return np.round(np.clip((images + 1.0) / 2.0, 0, 1) * 255).astype(np.uint8)


class _CachedConditioner:
  """`_Conditioner` for prompts drawn from embedding caches: the features are the cached
  ones; edit sources are decoded from their cached latents for the reward."""

  def __init__(self, models):
    self.models = models
    vae = models.vae
    self._decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method="decode"))

  def __call__(self, items: list[dict], group: int):
    rows = {k: np.stack([it["row"][k] for it in items]) for k in items[0]["row"]}
    rep = lambda a: np.repeat(a, group, axis=0)
    cond = {"text": rep(rows["text"]), "text_mask": rep(rows["text_mask"]),
            "time_ids": rep(rows["time_ids"])}
    uncond = {"text": rep(rows["null_text"]), "text_mask": rep(rows["null_text_mask"]),
              "time_ids": rep(rows["time_ids"])}
    edit = rows["is_edit"] > 0
    sources = np.where(edit[:, None, None, None], self.decode(rows["source_latents"]), 0)
    return rep(rows["source_latents"]), cond, uncond, rep(sources.astype(np.uint8))

  def decode(self, latents) -> np.ndarray:
    images = np.asarray(self._decode(self.models.vae_params, jnp.asarray(latents)))
    return np.round(np.clip((images + 1.0) / 2.0, 0, 1) * 255).astype(np.uint8)


def cached_items(batch: dict) -> list[dict]:
  """The rows of a cached-conditions batch as RL prompt items: {"text", "metadata" (the
  prompt: what the configured reward reads), "source" (non-None for edits), "row"}."""
  keys = [k for k in batch if k != "prompt"]
  out = []
  for i, prompt in enumerate(batch["prompt"]):
    edit = bool(batch["is_edit"][i] > 0)
    out.append({"text": str(prompt), "metadata": str(prompt), "reward_text": str(prompt),
                "source": batch["source_latents"][i] if edit else None,
                "target_latents": batch["latents"][i],
                "row": {k: batch[k][i] for k in keys}})
  return out


def prompt_stream(config, section, count: int, seed: int, size: int):
  """Endless batches of `count` cached conditions at `size` (the same on every process)."""
  mix = ml_collections.ConfigDict(dict(data=dict(
      t2i_weight=1.0 - float(section.edit_fraction), edit_weight=float(section.edit_fraction),
      resolutions=((size, 0),))))
  return stage_data.cache_batches(config, mix, count, seed, keep_prompts=True, everything=True)


def cached_reward_scores(pipe, batch: dict, sampler, reward, conditioner) -> dict:
  """Mean configured reward of a fixed cached set sampled with `sampler`, and the images."""
  images = []
  n, size = len(batch["prompt"]), int(sampler.batch_size)
  for start in range(0, n, size):
    rows = {k: v[start:start + size] for k, v in batch.items() if k != "prompt"}
    images.append(pipe.sample_cached(rows, steps=int(sampler.steps),
                                     guidance=float(sampler.guidance),
                                     image_guidance=float(sampler.image_guidance),
                                     seed=int(sampler.seed)))
  images = np.concatenate(images)
  edit = batch["is_edit"] > 0
  sources = np.where(edit[:, None, None, None], conditioner.decode(batch["source_latents"]), 0)
  rewards = np.asarray(reward(images, list(batch["prompt"]), sources.astype(np.uint8)))
  return {"reward": float(rewards.mean()), "images": images}


def group_diversity(images: np.ndarray, group: int) -> float:
  """Mean over prompts of the per-pixel std across the prompt's G samples (0-255 scale)."""
  x = images.astype(np.float32).reshape((-1, group) + images.shape[1:])
  return float(x.std(axis=1).mean())


def _summary(scores: dict) -> dict[str, float]:
  t2i, edit = scores["t2i"], scores["edit"]
  return {"t2i": t2i.get("overall", 0.0), "t2i_heldout": t2i.get("heldout_overall", 0.0),
          "edit": edit.get("accuracy", 0.0), "edit_heldout": edit.get("heldout_accuracy", 0.0)}


def _grpo_iteration(config, state, items, group, conditioner, rollout, reference, sigmas,
                    reward, step_fn, mesh, rng, it, section) -> dict:
  """One Flow-GRPO iteration: roll out, reward, advantages, minibatch updates."""
  condition, cond, uncond, sources = conditioner(items, group)
  noise = np.asarray(jax.random.normal(jax.random.PRNGKey(config.seed * 100_003 + it),
                                       condition.shape))
  out = rollout(jax.device_get(state.params), reference, noise, condition, sigmas, cond,
                uncond, jax.random.PRNGKey(it + 1))
  images = conditioner.decode(out["latents"])
  metas = [it_["metadata"] for it_ in items for _ in range(group)]
  rewards = reward(images, metas, sources)
  adv = rl_grpo.group_advantages(rewards, group)
  batch = rl_grpo.flatten_rollout(out, condition, sigmas, cond, uncond, adv)
  state, history = rl_grpo.update(step_fn, state, batch, int(section.num_minibatches), mesh,
                                  rng, config.seed * 7919 + it)
  return _iteration_scalars(history, rewards, items, images, group, state)


def _nft_iteration(config, state, items, nft, conditioner, pipeline, velocity, reference,
                   reward, step_fn, mesh, rng, it, section) -> dict:
  """One DiffusionNFT iteration: sample with the pipeline's ODE, reward, optimality
  probabilities, forward-process rows, minibatch updates."""
  group = nft.group_size
  condition, cond, uncond, sources = conditioner(items, group)
  params = jax.device_get(state.params)
  noise = jax.random.normal(jax.random.PRNGKey(config.seed * 100_003 + it), condition.shape)
  guided = nft.guidance > 0
  latents = np.asarray(pipeline(params).denoise(
      noise, jnp.asarray(condition), cond, uncond if guided else None, nft.sample_steps,
      nft.guidance if guided else None, (nft.image_guidance or None) if guided else None))
  images = conditioner.decode(latents)
  metas = [it_["metadata"] for it_ in items for _ in range(group)]
  rewards = reward(images, metas, sources)
  r = rl_nft.optimality(rl_grpo.group_advantages(rewards, group), nft.adv_clip)
  rows = rl_nft.training_rows(velocity, params, reference, latents, condition, cond, r,
                              nft.noise_draws, group, np.random.default_rng([config.seed, it]))
  state, history = rl_grpo.update(step_fn, state, rows, int(section.num_minibatches), mesh,
                                  rng, config.seed * 7919 + it, block=group)
  return _iteration_scalars(history, rewards, items, images, group, state)


def _iteration_scalars(history, rewards, items, images, group, state) -> dict:
  """Mean update metrics, train rewards (all, T2I, edit), diversity, and the new state."""
  edit = np.array([it["source"] is not None for it in items for _ in range(group)])
  scalars = {k: float(np.mean([h[k] for h in history])) for k in history[0]}
  scalars.update(reward=float(rewards.mean()),
                 reward_t2i=float(rewards[~edit].mean()) if (~edit).any() else 0.0,
                 reward_edit=float(rewards[edit].mean()) if edit.any() else 0.0,
                 diversity=group_diversity(images, group))
  scalars["state"] = state
  return scalars


def refl_batch(conditioner: "_Conditioner", reward, items: list[dict]) -> dict:
  """The ReFL batch of `items` (`draw_prompts`): the pretraining batch (target and
  source latents, is_edit, text features, time_ids) plus the reward's tokenized
  `reward_text` as reward_ids [B, ...] / reward_mask [B, ...]."""
  condition, cond, _, _ = conditioner(items, 1)
  if "target_latents" in items[0]:  # cached conditions hold the target's latents
    latents = np.stack([it["target_latents"] for it in items])
  else:
    targets = np.stack([it["target"] for it in items])
    latents = np.asarray(conditioner._encode(conditioner.models.vae_params,
                                             jnp.asarray(targets, jnp.float32) / 127.5 - 1.0))
  ids, mask = reward.tokenize([it["reward_text"] for it in items])
  return {"latents": latents.astype(np.float32), "source_latents": condition,
          "is_edit": np.array([it["source"] is not None for it in items], np.float32),
          "text": cond["text"], "text_mask": cond["text_mask"], "time_ids": cond["time_ids"],
          "reward_ids": np.asarray(ids), "reward_mask": np.asarray(mask)}


def run_stage(ctx) -> dict:
  """Runs RL from the parent (SFT) checkpoint; returns steps, rl figures and scores."""
  section = ctx.section
  if not ctx.parent_workdir:
    raise ConfigError(f"config.{ctx.name}.parent must name the stage RL starts from (sft)")
  models = ctx.models
  config = ctx.stage_config()
  config.init_from.ema_as_params = bool(section.use_ema)
  cached = stage_data.source(ctx.config) == "cache"
  size = int(section.data.size) if cached else models.image_size
  method = METHODS.get(str(section.method))
  if method is None:
    raise ConfigError(f"config.{ctx.name}.method = {section.method!r}; expected one of "
                      f"{sorted(METHODS)}")
  if jax.process_count() > 1:
    raise ConfigError(f"config.{ctx.name}: the rl stage runs on one process (its rollouts are "
                      f"sampled on one host); run it without --coordinator/--distributed")
  grpo = rl_grpo.GRPOConfig(**section.grpo.to_dict())
  nft = rl_nft.NFTConfig(**(section.nft.to_dict() if "nft" in section else {}))
  group, prompts = grpo.group_size, int(section.prompts_per_iteration)
  rows = prompts * group * int(section.sample_steps)
  if method == "flow_grpo" and rows % int(section.num_minibatches):
    raise ConfigError(f"config.{ctx.name}: prompts_per_iteration * grpo.group_size * "
                      f"sample_steps = {rows} is not divisible by num_minibatches")
  nft_rows = prompts * nft.group_size * nft.noise_draws
  if method == "nft" and nft_rows % int(section.num_minibatches):
    raise ConfigError(f"config.{ctx.name}: prompts_per_iteration * nft.group_size * "
                      f"nft.noise_draws = {nft_rows} is not divisible by num_minibatches")

  mesh = mesh_lib.make_mesh(config.mesh)
  tx = state_lib.make_optimizer(config.train)
  latent = size // models.vae_config.downsample_factor
  length = int(ctx.config.model.text_encoder.text_length)
  init = pretrain_stage.init_unet_fn(models.unet, (latent, latent), length,
                                     models.unet_config.encoder_hid_dim)
  # The reward: the exact shapes reward for the online methods on the shapes world,
  # else the configured one (loaded from local weights before any rollout).
  if method == "refl" or cached:
    try:
      reward = make_reward(str(section.reward.name), str(section.reward.path))
    except (ValueError, OSError) as e:
      raise ConfigError(f"config.{ctx.name}.reward (name={section.reward.name!r}, "
                        f"path={section.reward.path!r}): {e}") from e
  else:
    reward = ShapesReward()
  abstract, shardings = state_lib.state_shardings(init, tx, mesh)
  manager = ckpt.make_manager(ckpt.checkpoint_dir(ctx.workdir), keep=1, async_save=False)
  state, data_state, source = ckpt.restore_or_init(
      config, manager, abstract, lambda: state_lib.create_state(init, tx, mesh, config.seed),
      lambda p, e: state_lib.state_from_params(p, e, tx, shardings, config.seed))
  reference = ckpt.load_params(ctx.parent_workdir, ema=bool(section.use_ema))
  predict = pretrain_loss.unet_predict_fn(models.unet)
  conditioner = _CachedConditioner(models) if cached else _Conditioner(models, size)
  if method == "refl":
    if not getattr(reward, "differentiable_available", False):
      raise ConfigError(f"config.{ctx.name}.reward.name = {section.reward.name!r} is not "
                        f"differentiable; ReFL needs one of learned_shapes, clip")
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
      state, batch, rng, step_lib.learning_rate(schedule, int(jax.device_get(state.step))))
  rollout = rl_grpo.make_rollout(predict, grpo)
  velocity = rl_nft.make_velocity(predict)
  sigmas = flow.sampling_sigmas(int(section.sample_steps), 0.0)
  rng = jax.device_put(np.asarray(jax.device_get(state.rng)), mesh_lib.replicated(mesh))

  if cached:
    held = next(prompt_stream(ctx.config, section, int(section.eval.count),
                              EVAL_SEED + ctx.config.seed, size))
    evaluate = lambda params, grid=False: cached_reward_scores(
        models.pipeline(params), held, section.eval.sampler, reward, conditioner)
    stream = prompt_stream(ctx.config, section, prompts, PROMPT_SEED + ctx.config.seed, size)
  else:
    sets = shapes_stage.eval_sets(ctx.config, section.eval.per_category, section.eval.per_type)
    evaluate = lambda params, grid=False: shapes_stage.evaluate(
        models.pipeline(params), sets, section.eval.sampler,
        grid_dir=ctx.workdir if grid else None, prefix="samples_")
  results_path = os.path.join(ctx.workdir, "rl_progress.json")
  progress = {}
  if os.path.exists(results_path):
    with open(results_path) as f:
      progress = json.load(f)
  if "before" not in progress:
    progress["before"] = _without_images(evaluate(reference))
  writer = metrics_lib.MetricsWriter(ctx.workdir)
  start = int(data_state["iteration"]) if data_state else 0
  if cached and data_state:
    stream.set_state(data_state["prompts"])
  iterations = int(section.iterations)
  t0 = time.time()
  for it in range(start, iterations):
    if cached:
      items = cached_items(next(stream))
    else:
      items = draw_prompts(it, prompts, float(section.edit_fraction), size,
                           PROMPT_SEED + ctx.config.seed)
    if method == "refl":
      batch = refl_batch(conditioner, reward, items)
      state, metrics = step_fn(state, mesh_lib.shard_batch(batch, mesh), rng)
      scalars = {k: float(np.asarray(v.addressable_data(0))) for k, v in metrics.items()}
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
    print(f"[rl:{method}] iteration {it + 1}/{iterations}: reward {scalars['reward']:.3f} "
          f"loss {scalars['loss']:.4f} ({time.time() - t0:.0f}s)", flush=True)
    if (it + 1) % int(section.checkpoint_every) == 0 or it + 1 == iterations:
      data = {"iteration": it + 1, **({"prompts": stream.get_state()} if cached else {})}
      ckpt.save(manager, state, data, config)
      manager.wait_until_finished()
      with open(results_path, "w") as f:
        json.dump(progress, f)
  manager.close()
  writer.close()

  params = ckpt.as_numpy(state.params)
  after = evaluate(params, grid=True)
  log = progress.get("iterations", [])
  if cached:
    grid = "samples.png"
    metrics_lib.write_grid(os.path.join(ctx.workdir, grid), after.pop("images"))
    rl = {"before": progress["before"]["reward"], "after": after["reward"], "method": method,
          "reward": f"{section.reward.name} ({section.reward.path})",
          "train_reward_first": log[0]["reward"] if log else None,
          "train_reward_last": log[-1]["reward"] if log else None}
    with open(os.path.join(ctx.workdir, "scores.json"), "w") as f:
      json.dump({"rl": rl}, f, indent=2)
    return {"steps": int(jax.device_get(state.step)),
            "final_loss": log[-1]["loss"] if log else None, "rl": rl, "source": source,
            "sample_grids": [grid]}
  before_s, after_s = _summary(progress["before"]), _summary(after)
  rl = {"before": before_s["t2i"], "after": after_s["t2i"],
        "heldout_before": before_s["t2i_heldout"], "heldout_after": after_s["t2i_heldout"],
        "edit_before": before_s["edit"], "edit_after": after_s["edit"],
        "edit_heldout_before": before_s["edit_heldout"],
        "edit_heldout_after": after_s["edit_heldout"],
        "train_reward_first": log[0]["reward"] if log else None,
        "train_reward_last": log[-1]["reward"] if log else None,
        # GRPO: the KL of its SDE policy to the SFT model; NFT: the mean squared change
        # of the conditional velocity from the SFT model's on the last rows.
        "kl_to_reference": log[-1].get("kl_ref") if log else None,
        "velocity_drift_to_reference": log[-1].get("drift_ref") if log else None,
        "diversity_first": log[0].get("diversity") if log else None,
        "diversity_last": log[-1].get("diversity") if log else None,
        "method": method,
        "reward": ("shapes (programmatic, partial credit)" if method in ("flow_grpo", "nft")
                   else f"{type(reward).__name__} (differentiable)")}
  with open(os.path.join(ctx.workdir, "scores.json"), "w") as f:
    json.dump({"rl": rl, "before": progress["before"], "after": after}, f, indent=2)
  return {"steps": int(jax.device_get(state.step)), "final_loss": log[-1]["loss"] if log else None,
          "rl": rl, "scores": after, "scores_before": progress["before"],
          "source": source, "sample_grids": ["samples_t2i.png", "samples_edit.png"]}


def _without_images(scores: dict) -> dict:
  """Scores as JSON (the cached evaluation also hands back its sampled images)."""
  return {k: v for k, v in scores.items() if k != "images"}
