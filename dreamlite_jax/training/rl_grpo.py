"""Flow-GRPO: online policy-gradient RL for the flow model, for T2I and edit prompts.

The policy is the SDE sampler of `diffusion/sampling.py`: each denoising step is
a Gaussian `x' ~ N(mean_theta(x, s), std_s^2)`, so a trajectory has a
log-probability. One RL iteration:
  1. `rollout`: G samples per prompt with the current params (SDE along
     `rollout_sigmas(sampler)`, with the `SamplerConfig`'s guidance), recording every
     step's latents and log-probs, plus the reference model's step means (for the KL
     term) on the same trajectory;
  2. rewards of the decoded images (any `rewards` function, e.g. the exact shapes
     reward) -> `group_advantages` (reward minus the mean of its prompt's group,
     over the group's std);
  3. `make_grpo_loss`: the PPO-style clipped surrogate on the per-step ratio
     `exp(logp_theta - logp_old)` plus `beta * KL(pi_theta || pi_ref)`, the KL
     of two Gaussians with the same std: `|mean_theta - mean_ref|^2 / (2 std^2)`.
The loss runs through the shared train step (`training/step.py`), so the update
is sharded, clipped and NaN-guarded exactly like pretraining. Each transition
(one example at one step) is a row of the batch; rows carry their own sigma.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dreamlite_jax.diffusion import flow
from dreamlite_jax.diffusion import sampling

# predict_fn(params, canvas [B, H, 2W, C], timestep [B], cond) -> [B, H, 2W, C]
PredictFn = Callable[[Any, jax.Array, jax.Array, dict], jax.Array]


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """Flow-GRPO hyper-parameters (names as in the Flow-GRPO paper where it has them)."""
  group_size: int = 4          # G samples per prompt
  noise_level: float = 0.7     # SDE noise `a` of the sampler
  clip_range: float = 0.05     # PPO ratio clip epsilon (log-probs are per-element means)
  adv_clip: float = 5.0        # advantages are clipped to [-adv_clip, adv_clip]
  kl_beta: float = 0.04        # weight of the KL to the reference model

  def __post_init__(self):
    if self.group_size < 2:
      raise ValueError(f"GRPOConfig.group_size must be >= 2 (advantages are group-relative), "
                       f"got {self.group_size}")
    if self.clip_range <= 0 or self.noise_level <= 0:
      raise ValueError(f"GRPOConfig.clip_range and noise_level must be > 0, got "
                       f"{self.clip_range}, {self.noise_level}")


def group_advantages(rewards: np.ndarray, group_size: int, eps: float = 1e-4) -> np.ndarray:
  """Group-relative advantages `(r - mean_g) / (std_g + eps)`.

  Args:
    rewards: [P * G] with the G samples of each prompt contiguous.
  Returns:
    advantages [P * G] float32 (0 for a group whose rewards are all equal).
  """
  rewards = np.asarray(rewards, np.float32)
  if rewards.ndim != 1 or rewards.size % group_size:
    raise ValueError(f"rewards must be [P * G] with G = {group_size}, got shape {rewards.shape}")
  r = rewards.reshape(-1, group_size)
  adv = (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + eps)
  return adv.reshape(-1).astype(np.float32)


def _velocity_fn(predict_fn: PredictFn, params: Any):
  """A sampler velocity_fn that takes each row's timestep from `cond['timestep']`.

  `guided_velocity` builds one timestep for the whole batch; carrying the
  timestep in `cond` lets every row (a transition of any step) have its own,
  while reusing the sampler's exact guidance arithmetic.
  """
  def velocity(canvas, timestep, cond):
    del timestep
    inner = {k: v for k, v in cond.items() if k != "timestep"}
    return predict_fn(params, canvas, cond["timestep"], inner)
  return velocity


def rollout_sigmas(sampler: sampling.SamplerConfig) -> np.ndarray:
  """The rollouts' schedule [steps + 1]: `sampler.steps` unshifted steps from 1 to 0."""
  return flow.sampling_sigmas(sampler.steps, 0.0)


def transition_step(predict_fn: PredictFn, params: Any, batch: dict, config: GRPOConfig,
                    sampler: sampling.SamplerConfig) -> sampling.SDEStep:
  """Scores the stored transitions `x -> x_next` under `params`, with the guidance of
  `sampler` (the rollouts').

  batch rows: x, x_next, condition [N, h, w, C]; sigma, sigma_next, sigma_max [N];
  cond = {text, text_mask, time_ids} (+ uncond of the same shapes with CFG).
  Returns an SDEStep whose log_prob is [N] and mean [N, h, w, C], with std [N].
  """
  sigma = batch["sigma"].astype(jnp.float32)
  cond = dict(batch["cond"], timestep=sigma * flow.NUM_TRAIN_TIMESTEPS)
  uncond = batch.get("uncond")
  if uncond is not None:
    uncond = dict(uncond, timestep=cond["timestep"])
  g, g_img = sampler.scales
  if g is None:
    uncond = None
  v = sampling.guided_velocity(_velocity_fn(predict_fn, params), batch["x"], batch["condition"],
                               jnp.float32(0.0), cond, uncond, g, g_img)

  def one(x, v, s, s_next, s_max, x_next):  # rows as [1, h, w, C]: sde_step's batch of one
    return sampling.sde_step(x[None], v[None], s, s_next, s_max, config.noise_level,
                             prev_sample=x_next[None])

  out = jax.vmap(one)(batch["x"], v, sigma, batch["sigma_next"], batch["sigma_max"],
                      batch["x_next"])
  return sampling.SDEStep(out.prev_sample[:, 0], out.log_prob[:, 0], out.mean[:, 0], out.std)


def make_grpo_loss(predict_fn: PredictFn, config: GRPOConfig, sampler: sampling.SamplerConfig
                   ) -> Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]:
  """`loss_fn(params, batch, rng) -> (loss, metrics)` for the shared train step; `sampler`
  is the rollouts' (its guidance is the policy's).

  batch: the transition rows of `transition_step` plus old_log_prob [N],
  advantage [N] and ref_mean [N, h, w, C].
  """
  def loss_fn(params, batch, rng):
    del rng
    out = transition_step(predict_fn, params, batch, config, sampler)
    adv = jnp.clip(batch["advantage"], -config.adv_clip, config.adv_clip)
    ratio = jnp.exp(out.log_prob - batch["old_log_prob"])
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - config.clip_range, 1.0 + config.clip_range)
    policy = jnp.mean(jnp.maximum(unclipped, clipped))
    std = jnp.maximum(out.std, 1e-8)
    kl = jnp.mean((out.mean - batch["ref_mean"]) ** 2, axis=(1, 2, 3)) / (2.0 * std ** 2)
    loss = policy + config.kl_beta * jnp.mean(kl)
    metrics = {"policy_loss": policy, "kl_ref": jnp.mean(kl),
               "clip_fraction": jnp.mean((jnp.abs(ratio - 1.0) > config.clip_range)
                                         .astype(jnp.float32)),
               "approx_kl_old": jnp.mean(batch["old_log_prob"] - out.log_prob)}
    return loss, metrics

  return loss_fn


def make_rollout(predict_fn: PredictFn, config: GRPOConfig,
                 sampler: sampling.SamplerConfig) -> Callable:
  """Jitted `rollout(params, ref_params, noise, condition, sigmas, cond, uncond, rng)`,
  guided as `sampler` says.

  Args (leading axis B = prompts * G): noise, condition [B, h, w, C]; sigmas
  [T + 1] (`rollout_sigmas(sampler)`); cond/uncond {text, text_mask, time_ids} (uncond
  unused without CFG, may be None).
  Returns dict: latents [B, h, w, C] (final), x, x_next [T, B, h, w, C],
  log_prob [T, B], ref_mean [T, B, h, w, C].
  """
  g, g_img = sampler.scales

  def rollout(params, ref_params, noise, condition, sigmas, cond, uncond, rng):
    traj = sampling.sde_sample(
        lambda canvas, t, c: predict_fn(params, canvas, t, c), noise, condition, sigmas, cond,
        rng, config.noise_level, uncond if g is not None else None, g, g_img)
    steps = sigmas.shape[0] - 1
    b = noise.shape[0]

    def ref_mean(t):
      rows = transition_rows(traj.trajectory, condition, sigmas, cond, uncond, t, b)
      return transition_step(predict_fn, ref_params, rows, config, sampler).mean

    ref = jax.lax.map(ref_mean, jnp.arange(steps))
    return {"latents": traj.latents, "x": traj.trajectory[:-1], "x_next": traj.trajectory[1:],
            "log_prob": traj.log_probs, "ref_mean": ref}

  return jax.jit(rollout)


def transition_rows(trajectory: jax.Array, condition: jax.Array, sigmas: jax.Array, cond: dict,
                    uncond: dict | None, t: jax.Array, batch: int) -> dict:
  """The B transition rows of step `t` of a trajectory [T + 1, B, h, w, C]."""
  full = lambda v: jnp.full((batch,), v, jnp.float32)
  rows = {"x": trajectory[t], "x_next": trajectory[t + 1], "condition": condition,
          "sigma": full(sigmas[t]), "sigma_next": full(sigmas[t + 1]),
          "sigma_max": full(sigmas[1]), "cond": cond}
  if uncond is not None:
    rows["uncond"] = uncond
  return rows


def flatten_rollout(out: dict, condition: np.ndarray, sigmas: np.ndarray, cond: dict,
                    uncond: dict | None, advantages: np.ndarray,
                    steps: np.ndarray | None = None) -> dict:
  """Host-side training rows of a rollout: every (step in `steps`, sample) pair.

  Returns a dict of numpy arrays with leading axis len(steps) * B (step-major),
  ready for `mesh.shard_batch` and the GRPO loss.
  """
  t_all = np.asarray(sigmas).shape[0] - 1
  steps = np.arange(t_all) if steps is None else np.asarray(steps)
  b = np.asarray(out["latents"]).shape[0]
  take = lambda a: np.asarray(a)[steps].reshape((-1,) + np.asarray(a).shape[2:])
  rep = lambda a: np.concatenate([np.asarray(a)] * len(steps))
  sig = np.asarray(sigmas, np.float32)
  rows = {"x": take(out["x"]), "x_next": take(out["x_next"]), "old_log_prob": take(out["log_prob"]),
          "ref_mean": take(out["ref_mean"]), "condition": rep(condition),
          "sigma": np.repeat(sig[steps], b), "sigma_next": np.repeat(sig[steps + 1], b),
          "sigma_max": np.full(len(steps) * b, sig[1], np.float32),
          "advantage": rep(advantages),
          "cond": {k: rep(v) for k, v in cond.items()}}
  if uncond is not None:
    rows["uncond"] = {k: rep(v) for k, v in uncond.items()}
  return rows


def minibatches(rows: dict, num_minibatches: int, seed: int, block: int = 1) -> list[dict]:
  """The rows (leading axis N) shuffled in blocks of `block`
  consecutive rows and split into `num_minibatches` update batches (DiffusionNFT's rows
  come through here too, a prompt's group as one block).

  The first update is exactly on-policy (ratio 1); later ones see the params already
  moved, which is where the ratio clip acts.
  """
  n = len(jax.tree.leaves(rows)[0])
  if n % num_minibatches or (n // num_minibatches) % block:
    raise ValueError(f"{n} rows do not split into {num_minibatches} minibatches of whole "
                     f"blocks of {block}")
  order = (np.random.default_rng(seed).permutation(n // block)[:, None] * block
           + np.arange(block)).reshape(-1)
  size = n // num_minibatches
  return [jax.tree.map(lambda a: a[order[i * size:(i + 1) * size]], rows)
          for i in range(num_minibatches)]
