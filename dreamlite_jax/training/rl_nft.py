"""DiffusionNFT: online RL on the forward process (Zheng et al. 2025, arXiv 2509.16117).

Why it is here: Flow-GRPO rewards the per-step likelihood of an SDE sampler. On
the shapes world it raised that sampler's score but lowered the deterministic
(ODE) sampler's, the one distillation and deployment start from (README, "The
main job"). NFT instead trains the velocity field itself, by flow matching on the
policy's own clean samples, so the change reaches every sampler of the model, and
the rollouts may use any sampler (here the teacher's many-step ODE with CFG).

One iteration (`rl_stage.py` drives it):
  1. sample G results per prompt with the current params (the sampling policy,
     velocity `v_old`; the pipeline's ODE sampler with the RL stage's `SamplerConfig`),
     reward them, and turn the group-relative advantages
     into an optimality probability `r = 0.5 + 0.5 clip(adv / adv_clip, -1, 1)`;
  2. noise each clean sample on the forward process, `x_t = (1 - s) x0 + s eps`
     (one (s, eps) per prompt and draw), and record `v_old(x_t)` (`training_rows`);
  3. minimise, through the shared train step (`make_nft_loss`),
       [ r |x0(v+) - x0|^2 / w+  +  (1 - r) |x0(v-) - x0|^2 / w- ] / beta,
     v+ = (1 - beta) v_old + beta v_theta   (the implicit positive policy),
     v- = (1 + beta) v_old - beta v_theta   (the implicit negative policy),
     x0(v) = x_t - s v, w = mean |x0(v) - x0| (no gradient; the paper's
     adaptive weight). Positives pull the velocity towards their samples,
     negatives push it away, and r = 1/2 leaves it at v_old.
The velocity is the conditional branch alone (NFT is CFG-free): guidance is a
sampling-time choice on top of it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dreamlite_jax.diffusion import flow
from dreamlite_jax.diffusion import packing

# predict_fn(params, canvas [B, H, 2W, C], timestep [B], cond) -> [B, H, 2W, C]
PredictFn = Callable[[Any, jax.Array, jax.Array, dict], jax.Array]


@dataclasses.dataclass(frozen=True)
class NFTConfig:
  """DiffusionNFT hyper-parameters (names as in the paper where it has them)."""
  group_size: int = 4          # G samples per prompt
  beta: float = 1.0            # step of the implicit policies v+- around v_old
  adv_clip: float = 2.0        # advantages are clipped to +-adv_clip, then mapped to r in [0, 1]
  noise_draws: int = 2         # forward-process noisings (training rows) per sample

  def __post_init__(self):
    if self.group_size < 2:
      raise ValueError(f"NFTConfig.group_size must be >= 2 (advantages are group-relative), "
                       f"got {self.group_size}")
    if self.beta <= 0 or self.adv_clip <= 0:
      raise ValueError(f"NFTConfig.beta and adv_clip must be > 0, got {self.beta}, "
                       f"{self.adv_clip}")
    if self.noise_draws < 1:
      raise ValueError(f"NFTConfig.noise_draws must be >= 1, got {self.noise_draws}")


def optimality(advantages: np.ndarray, adv_clip: float) -> np.ndarray:
  """r = 0.5 + 0.5 clip(adv / adv_clip, -1, 1) in [0, 1] (0.5 = neutral)."""
  a = np.clip(np.asarray(advantages, np.float32) / adv_clip, -1.0, 1.0)
  return (0.5 + 0.5 * a).astype(np.float32)


def make_velocity(predict_fn: PredictFn) -> Callable:
  """Jitted `velocity(params, x_t, condition, sigma [N], cond) -> [N, h, w, C]`: the
  conditional branch's target-half velocity, each row at its own noise level."""
  return jax.jit(lambda params, x_t, condition, sigma, cond: packing.target_velocity(
      predict_fn, params, x_t, sigma, condition, cond))


def training_rows(velocity: Callable, old_params: Any, ref_params: Any, latents: np.ndarray,
                  condition: np.ndarray, cond: dict, r: np.ndarray, draws: int, group_size: int,
                  rng: np.random.Generator) -> dict:
  """Forward-process rows of one iteration's samples, `draws` noisings each.

  The G samples of a prompt share each draw's noise level and noise (common random
  numbers): their optimality weights 2r - 1 sum to about zero, so the part of the
  gradient that depends only on (sigma, eps) cancels within the group and what is left
  is the contrast between the prompt's samples. Each row still has the forward
  process's distribution, so the loss is unchanged in expectation.

  Args:
    velocity: `make_velocity`'s function; old_params: the sampling policy;
      ref_params: the RL start (only for the reported drift).
    latents, condition: [B, h, w, C] clean samples and their condition halves, the G
      samples of each prompt contiguous; cond {text, text_mask, time_ids} [B, ...];
      r: [B] optimality.
  Returns numpy rows with leading axis draws * B (draw-major, groups contiguous): x0,
    x_t, sigma, v_old, v_ref, optimality, condition, cond.
  """
  b = len(latents)
  if b % group_size:
    raise ValueError(f"{b} samples do not split into groups of {group_size}")
  rep = lambda a: np.concatenate([np.asarray(a)] * draws)
  x0 = rep(latents).astype(np.float32)
  groups = draws * b // group_size
  sigma = np.repeat(rng.uniform(0.0, 1.0, groups), group_size).astype(np.float32)
  noise = np.repeat(rng.standard_normal((groups,) + x0.shape[1:]), group_size, axis=0)
  x_t = ((1.0 - sigma[:, None, None, None]) * x0
         + sigma[:, None, None, None] * noise).astype(np.float32)
  rows = {"x0": x0, "x_t": x_t, "sigma": sigma, "optimality": rep(r).astype(np.float32),
          "condition": rep(condition).astype(np.float32),
          "cond": {k: rep(v) for k, v in cond.items()}}
  rows["v_old"] = np.asarray(velocity(old_params, x_t, rows["condition"], sigma, rows["cond"]))
  rows["v_ref"] = np.asarray(velocity(ref_params, x_t, rows["condition"], sigma, rows["cond"]))
  return rows


def _weighted_x0_error(x_t, velocity, sigma, x0):
  """Per-example |x0(v) - x0|^2 over the stop-gradient mean |x0(v) - x0| [N]."""
  err = flow.predict_x0(x_t, velocity, sigma) - x0
  scale = jax.lax.stop_gradient(jnp.maximum(jnp.mean(jnp.abs(err), axis=(1, 2, 3)), 1e-5))
  return jnp.mean(err ** 2, axis=(1, 2, 3)) / scale


def make_nft_loss(predict_fn: PredictFn, config: NFTConfig
                  ) -> Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]:
  """`loss_fn(params, batch, rng) -> (loss, metrics)` for the shared train step
  (batch: `training_rows`)."""
  beta = config.beta

  def loss_fn(params, batch, rng):
    del rng
    x_t, x0, sigma = batch["x_t"], batch["x0"], batch["sigma"]
    v = packing.target_velocity(predict_fn, params, x_t, sigma, batch["condition"],
                                batch["cond"])
    v_old = batch["v_old"]
    positive = _weighted_x0_error(x_t, beta * v + (1.0 - beta) * v_old, sigma, x0)
    negative = _weighted_x0_error(x_t, (1.0 + beta) * v_old - beta * v, sigma, x0)
    r = batch["optimality"]
    loss = jnp.mean(r * positive + (1.0 - r) * negative) / beta
    metrics = {"nft_loss": loss, "positive": jnp.mean(positive), "negative": jnp.mean(negative),
               "drift_old": jnp.mean((v - v_old) ** 2),
               "drift_ref": jnp.mean((v - batch["v_ref"]) ** 2)}
    return loss, metrics

  return loss_fn
