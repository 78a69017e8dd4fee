"""RL's data: rollouts of the policy being trained, as the trainer's data iterator.

`trainer.run` hands the iterator the current state before every draw (`set_policy`).
Every `num_minibatches` draws an RL iteration starts: this process rolls out its block
of the iteration's prompts (a prompt's whole group on one process, so group advantages
stay local) with a gathered copy of the params, decodes and rewards the samples, turns
them into training rows, shuffles them in whole blocks and yields them as the
iteration's update minibatches. How rows are made is the method's `RowsFn`:

  Flow-GRPO     SDE rollouts with per-step log-probs -> every (step, sample) transition
                with its group-relative advantage;
  DiffusionNFT  the pipeline's ODE sampler -> forward-process rows with optimality
                probabilities (a prompt's group is one shuffle block);
  ReFL          no sampling: the prompts' pretraining batch with the reward's tokens.

Checkpoints wait for an iteration boundary (`at_boundary`) and the iterator's state is
the iteration count and the prompt stream's state, so a resumed run rolls out the very
next prompts with the restored params. With each iteration's first step the trainer
logs `metrics()`: rewards over every process's samples (all, T2I, edit) and the
diversity (mean per-pixel std within a prompt's group, 0-255).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from dreamlite_jax.diffusion import sampling
from dreamlite_jax.training import mesh as mesh_lib
from dreamlite_jax.training import rl_grpo
from dreamlite_jax.training import rl_nft


@dataclasses.dataclass
class Draw:
  """One iteration's training rows on this process, and what they were scored from."""
  rows: dict[str, np.ndarray]
  block: int = 1                      # rows shuffled in blocks of this many consecutive rows
  rewards: np.ndarray | None = None   # [prompts * group] (None: nothing was sampled)
  images: np.ndarray | None = None    # [prompts * group, H, W, 3] uint8
  group: int = 1


# (state, this process's prompt items, global prompt count, iteration) -> Draw
RowsFn = Callable[[Any, list, int, int], Draw]


def iteration_noise(seed: int, it: int, rows: int, shape: tuple) -> np.ndarray:
  """This process's block of the iteration's global starting noise `[rows, *shape]`."""
  noise = jax.random.normal(jax.random.PRNGKey(seed * 100_003 + it), (rows, *shape))
  return np.asarray(noise[mesh_lib.host_rows(rows)])


def _metas(items: list[dict], group: int) -> list:
  return [item["metadata"] for item in items for _ in range(group)]


def grpo_rows(rollout: Callable, conditioner: Any, reward: Any, reference: Any,
              sigmas: np.ndarray, group: int, seed: int) -> RowsFn:
  """Flow-GRPO: SDE rollouts from the policy (log-probs and the reference's means along),
  rewards, group advantages, every transition a row."""
  def rows(state, items, prompts, it):
    condition, cond, uncond, sources = conditioner(items, group)
    noise = iteration_noise(seed, it, prompts * group, condition.shape[1:])
    out = rollout(mesh_lib.to_host(state.params), reference, noise, condition, sigmas, cond,
                  uncond, jax.random.fold_in(jax.random.PRNGKey(it + 1), jax.process_index()))
    images = conditioner.decode(out["latents"])
    rewards = np.asarray(reward(images, _metas(items, group), sources))
    adv = rl_grpo.group_advantages(rewards, group)
    return Draw(rl_grpo.flatten_rollout(out, condition, sigmas, cond, uncond, adv), 1, rewards,
                images, group)
  return rows


def nft_rows(pipeline: Callable, velocity: Callable, conditioner: Any, reward: Any,
             reference: Any, nft: rl_nft.NFTConfig, sampler: sampling.SamplerConfig,
             seed: int) -> RowsFn:
  """DiffusionNFT: ODE samples of the policy (the pipeline's, with `sampler`), rewards,
  optimality probabilities, `noise_draws` forward-process rows per sample."""
  group = nft.group_size

  def rows(state, items, prompts, it):
    condition, cond, uncond, sources = conditioner(items, group)
    params = mesh_lib.to_host(state.params)
    noise = iteration_noise(seed, it, prompts * group, condition.shape[1:])
    latents = np.asarray(pipeline(params).denoise(
        jnp.asarray(noise), jnp.asarray(condition), cond, uncond, sampler.steps,
        sampler.guidance, sampler.image_guidance))
    images = conditioner.decode(latents)
    rewards = np.asarray(reward(images, _metas(items, group), sources))
    r = rl_nft.optimality(rl_grpo.group_advantages(rewards, group), nft.adv_clip)
    out = rl_nft.training_rows(velocity, params, reference, latents, condition, cond, r,
                               nft.noise_draws, group,
                               np.random.default_rng([seed, it, jax.process_index()]))
    return Draw(out, group, rewards, images, group)
  return rows


def refl_rows(conditioner: Any, reward: Any) -> RowsFn:
  """ReFL: the pretraining batch of the prompts (target and source latents, is_edit,
  text features, time_ids) plus the reward's tokenized `reward_text` as reward_ids /
  reward_mask; the reward itself runs inside the loss."""
  def rows(state, items, prompts, it):
    condition, cond, _, _ = conditioner(items, 1)
    ids, mask = reward.tokenize([item["reward_text"] for item in items])
    return Draw({"latents": conditioner.encode_targets(items).astype(np.float32),
                 "source_latents": condition,
                 "is_edit": np.array([item["source"] is not None for item in items], np.float32),
                 "text": cond["text"], "text_mask": cond["text_mask"],
                 "time_ids": cond["time_ids"], "reward_ids": np.asarray(ids),
                 "reward_mask": np.asarray(mask)})
  return rows


def group_diversity(images: np.ndarray, group: int) -> float:
  """Mean over prompts of the per-pixel std across the prompt's G samples (0-255 scale)."""
  x = images.astype(np.float32).reshape((-1, group) + images.shape[1:])
  return float(x.std(axis=1).mean())


def draw_scalars(draw: Draw, items: list[dict]) -> dict[str, float]:
  """Train rewards (all, T2I, edit) and diversity over every process's samples."""
  if draw.rewards is None:
    return {}
  rewards = np.asarray(draw.rewards, np.float32)
  edit = np.array([item["source"] is not None for item in items for _ in range(draw.group)])
  diversity = group_diversity(draw.images, draw.group)  # a float32 value
  # One collective: this process's [rewards | edit flags | diversity] as one float32 row
  # (exact: the flags are 0/1, diversity a float32), split again per process.
  n = rewards.shape[0]
  stacked = mesh_lib.gather_rows(
      np.concatenate([rewards, edit.astype(np.float32), [diversity]]).astype(np.float32)[None])
  rewards, edit = stacked[:, :n].reshape(-1), stacked[:, n:2 * n].reshape(-1) != 0
  diversity = stacked[:, 2 * n]
  return {"reward": float(rewards.mean()),
          "reward_t2i": float(rewards[~edit].mean()) if (~edit).any() else 0.0,
          "reward_edit": float(rewards[edit].mean()) if edit.any() else 0.0,
          "diversity": float(diversity.mean())}


class Rollouts:
  """The trainer's data iterator of an RL stage (see the module docstring).

  Args:
    rows_fn: the method's `RowsFn`.
    next_items: `iteration -> prompt items` (the same global list on every process).
    num_minibatches: updates per iteration.
    seed: the minibatch shuffle's seed.
    stream: the prompt stream behind `next_items` when it has a state to checkpoint.
  """

  def __init__(self, rows_fn: RowsFn, next_items: Callable[[int], list[dict]],
               num_minibatches: int, seed: int, stream: Iterator | None = None):
    self._rows_fn, self._next_items, self._stream = rows_fn, next_items, stream
    self._num_minibatches, self._seed = num_minibatches, seed
    self._policy: Any = None
    self._queue: list[dict] = []
    self._scalars: dict[str, float] = {}
    self.iteration = 0

  def __iter__(self):
    return self

  def set_policy(self, state: Any) -> None:
    self._policy = state

  def __next__(self) -> dict:
    if not self._queue:
      if self._policy is None:
        raise RuntimeError("Rollouts need the current state (set_policy) before a draw")
      items = self._next_items(self.iteration)
      mine = items[mesh_lib.host_rows(len(items))]
      draw = self._rows_fn(self._policy, mine, len(items), self.iteration)
      self._queue = rl_grpo.minibatches(draw.rows, self._num_minibatches,
                                        self._seed * 7919 + self.iteration, draw.block)
      self._scalars = draw_scalars(draw, mine)
      self.iteration += 1
    self._policy = None   # the trainer donates it to the step
    return self._queue.pop(0)

  def at_boundary(self) -> bool:
    return not self._queue

  def metrics(self) -> dict[str, float]:
    scalars, self._scalars = self._scalars, {}
    return scalars

  def get_state(self) -> dict:
    state = {"iteration": self.iteration}
    if self._stream is not None:
      state["prompts"] = self._stream.get_state()
    return state

  def set_state(self, state: dict) -> None:
    self.iteration = int(state["iteration"])
    if self._stream is not None:
      self._stream.set_state(state["prompts"])
