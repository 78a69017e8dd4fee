"""Samplers for the packed-canvas flow model: Euler ODE with CFG, Flow-GRPO SDE, few-step.

`SamplerConfig` is how a sampler is configured everywhere (every `sampler` section of
a job config: eval, stage checks, RL rollouts and evaluation, the distillation
teacher): steps, text guidance and image guidance, each guidance a float where 0
means off. `guidance_scales` turns such floats into what the functions below take
(None = off), the one place where 0 becomes None.

Every sampler takes a velocity function
`velocity_fn(canvas [B, H, 2W, C], timestep [B], cond) -> [B, H, 2W, C]`
(`timestep` = sigma * 1000; `cond` is whatever pytree of per-example arrays the
caller needs, e.g. text features, mask and time ids, each with leading axis B),
so the math can be tested with analytic fields and reused with any network.
Only the left (target) half of the velocity is used; the right half of the
canvas always holds the fixed condition latent.

Guidance follows `DreamLitePipeline` exactly, batching all branches into one
network call per step:
- text CFG (2 branches, both with the same condition latent):
  `v = u + g (v_text - u)`;
- dual guidance for editing (3 branches: (uncond text, zero condition),
  (uncond text, source), (text, source)):
  `v = u + g (v_text - v_img) + g_img (v_img - u)`.
The ODE loop runs up to the schedule's last pair of different sigmas: a schedule
padded by repeating its final sigma (`pad_schedule`) runs only its real steps, so
callers that pad every schedule to one length compile one sampler for all step
counts (XLA:CPU spends 5-8 s on each tiny-U-Net sampler).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dreamlite_jax.config import ConfigError
from dreamlite_jax.diffusion import flow
from dreamlite_jax.diffusion import packing

VelocityFn = Callable[[jax.Array, jax.Array, Any], jax.Array]

_is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
_is_num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)


def guidance_scales(guidance: float | None, image_guidance: float | None = None
                    ) -> tuple[float | None, float | None]:
  """`(guidance_scale, image_guidance_scale)` as the samplers take them, None = off.

  `guidance` 0 (or None) is no CFG: one conditional branch, as distilled students
  sample; `image_guidance` 0 (or None) is text CFG with the edit source in both
  branches; without text guidance there is no image guidance. Negative scales raise.
  """
  for name, value in (("guidance", guidance), ("image_guidance", image_guidance)):
    if value is not None and value < 0:
      raise ValueError(f"{name} must be >= 0 (0 = off), got {value}")
  if not guidance:
    return None, None
  return float(guidance), float(image_guidance) if image_guidance else None


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """A sampler's settings: the shape of every `sampler` section of a job config.

  Attributes:
    steps: Euler steps of the schedule (>= 1).
    guidance: text CFG scale `g`; 0 = no CFG (distilled students).
    image_guidance: edit image scale `g_img` of dual guidance
      `u + g (v_text - v_img) + g_img (v_img - u)`; 0 = text CFG only (the source in
      both branches). Unused without text guidance.
  """
  steps: int
  guidance: float = 0.0
  image_guidance: float = 0.0

  def __post_init__(self):
    problem = _sampler_problem(self.steps, self.guidance, self.image_guidance)
    if problem:
      field, what = problem
      raise ValueError(f"SamplerConfig.{field} = {getattr(self, field)!r}: {what}")

  @classmethod
  def from_config(cls, section: Mapping[str, Any], prefix: str = "sampler") -> "SamplerConfig":
    """The config section `section` (a ConfigDict or dict of exactly the fields) as a
    SamplerConfig; a missing, unknown or bad field raises ConfigError naming it as
    `<prefix>.<field>` (e.g. `config.rl.sampler.steps`)."""
    if not hasattr(section, "keys"):
      raise ConfigError(f"{prefix} = {section!r}: must be a section with the fields "
                        f"{SAMPLER_FIELDS}")
    unknown = sorted(set(section.keys()) - set(SAMPLER_FIELDS))
    if unknown:
      raise ConfigError(f"{prefix}.{unknown[0]}: not a field of SamplerConfig "
                        f"(its fields: {SAMPLER_FIELDS})")
    for field in SAMPLER_FIELDS:
      if field not in section:
        raise ConfigError(f"{prefix}.{field} is missing (a sampler has {SAMPLER_FIELDS})")
    problem = _sampler_problem(*(section[f] for f in SAMPLER_FIELDS))
    if problem:
      field, what = problem
      raise ConfigError(f"{prefix}.{field} = {section[field]!r}: {what}")
    return cls(int(section["steps"]), float(section["guidance"]),
               float(section["image_guidance"]))

  @property
  def scales(self) -> tuple[float | None, float | None]:
    """`guidance_scales` of this sampler: (text scale, image scale), None = off."""
    return guidance_scales(self.guidance, self.image_guidance)


SAMPLER_FIELDS = tuple(f.name for f in dataclasses.fields(SamplerConfig))


def _sampler_problem(steps, guidance, image_guidance) -> tuple[str, str] | None:
  """(field, what it must be) of the first bad SamplerConfig value, or None."""
  if not (_is_int(steps) and steps >= 1):
    return "steps", "must be an int >= 1"
  if not (_is_num(guidance) and guidance >= 0):
    return "guidance", "must be a number >= 0 (0 = no CFG)"
  if not (_is_num(image_guidance) and image_guidance >= 0):
    return "image_guidance", "must be a number >= 0 (0 = text CFG only)"
  return None


def _concat_batches(trees: list[Any]) -> Any:
  return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *trees)


def _check_cond(name: str, tree: Any, batch: int) -> None:
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != batch:
      raise ValueError(f"{name}{jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}; "
                       f"every leaf needs leading batch axis {batch}")


def guided_velocity(velocity_fn: VelocityFn, x: jax.Array, condition: jax.Array,
                    sigma: jax.Array, cond: Any, uncond: Any = None,
                    guidance_scale: float | jax.Array | None = None,
                    image_guidance_scale: float | jax.Array | None = None) -> jax.Array:
  """Target-half velocity at noise level `sigma`, with optional CFG.

  Args:
    velocity_fn: see module docstring.
    x: current target latents [B, H, W, C].
    condition: right half of the canvas [B, H, W, C] (zeros for T2I).
    sigma: the noise level, a scalar or one per row [B] (the U-Net sees `sigma * 1000`).
    cond: conditional inputs (pytree, leaves [B, ...]).
    uncond: unconditional inputs of the same structure and shapes, or None
      (no guidance: one branch).
    guidance_scale: text CFG scale `g` (required with `uncond`).
    image_guidance_scale: None for text CFG; a float selects dual guidance.
  Returns:
    velocity [B, H, W, C].
  """
  batch = x.shape[0]
  if uncond is None:
    if guidance_scale is not None or image_guidance_scale is not None:
      raise ValueError("guidance scales were given but uncond is None")
    branches_x, branches_c, branches_cond = [x], [condition], [cond]
  else:
    if guidance_scale is None:
      raise ValueError("uncond was given but guidance_scale is None")
    if image_guidance_scale is None:
      branches_x, branches_c, branches_cond = [x, x], [condition, condition], [uncond, cond]
    else:
      branches_x = [x, x, x]
      branches_c = [jnp.zeros_like(condition), condition, condition]
      branches_cond = [uncond, uncond, cond]
  canvas = packing.pack(jnp.concatenate(branches_x), jnp.concatenate(branches_c))
  row_timesteps = jnp.broadcast_to(
      jnp.asarray(sigma, jnp.float32) * flow.NUM_TRAIN_TIMESTEPS, (batch,))
  timestep = jnp.concatenate([row_timesteps] * len(branches_x))
  out = velocity_fn(canvas, timestep, _concat_batches(branches_cond))
  if out.shape != canvas.shape:
    raise ValueError(f"velocity_fn returned {out.shape}, expected the canvas shape {canvas.shape}")
  v = packing.unpack_target(out).astype(jnp.float32)
  if uncond is None:
    return v
  if image_guidance_scale is None:
    v_uncond, v_text = v[:batch], v[batch:]
    return v_uncond + guidance_scale * (v_text - v_uncond)
  v_uncond, v_img, v_text = v[:batch], v[batch:2 * batch], v[2 * batch:]
  return (v_uncond + guidance_scale * (v_text - v_img)
          + image_guidance_scale * (v_img - v_uncond))


def _validate(noise: jax.Array, condition: jax.Array, sigmas: jax.Array, cond: Any,
              uncond: Any) -> None:
  packing.check_latents("noise", noise)
  if condition.shape != noise.shape:
    raise ValueError(f"condition {condition.shape} must match noise {noise.shape}")
  if jnp.ndim(sigmas) != 1 or jnp.shape(sigmas)[0] < 2:
    raise ValueError(f"sigmas must be [N + 1] with N >= 1, got shape {jnp.shape(sigmas)}")
  _check_cond("cond", cond, noise.shape[0])
  if uncond is not None:
    _check_cond("uncond", uncond, noise.shape[0])
    if jax.tree.structure(uncond) != jax.tree.structure(cond):
      raise ValueError("uncond and cond must have the same pytree structure")


def pad_schedule(sigmas, multiple: int = 32) -> np.ndarray:
  """`sigmas` [N + 1] padded with copies of its last value to a multiple of `multiple`.

  The padded pairs are zero-length steps that `euler_sample` does not run; the
  padding only makes schedules of different lengths the same shape.
  """
  sigmas = np.asarray(sigmas, np.float32)
  length = -(-len(sigmas) // multiple) * multiple
  return np.concatenate([sigmas, np.full(length - len(sigmas), sigmas[-1], np.float32)])


def _num_steps(sigmas: jax.Array) -> jax.Array:
  """1 + the index of the last pair of different sigmas (0 if all are equal)."""
  moving = sigmas[:-1] != sigmas[1:]
  return jnp.max(jnp.where(moving, jnp.arange(1, sigmas.shape[0]), 0))


def euler_sample(velocity_fn: VelocityFn, noise: jax.Array, condition: jax.Array,
                 sigmas: jax.Array, cond: Any, uncond: Any = None,
                 guidance_scale: float | jax.Array | None = None,
                 image_guidance_scale: float | jax.Array | None = None) -> jax.Array:
  """Euler ODE sampling `x <- x + (s_next - s) v` along `sigmas`.

  Args:
    velocity_fn: see module docstring.
    noise: initial latents at sigmas[0] [B, H, W, C].
    condition: condition half [B, H, W, C] (zeros for T2I, source latent for edit).
    sigmas: [N + 1] decreasing schedule ending in 0 (`flow.sampling_sigmas`), optionally
      padded with copies of its last value (`pad_schedule`), which are not run.
    cond, uncond, guidance_scale, image_guidance_scale: see `guided_velocity`.
  Returns:
    final latents [B, H, W, C] float32.
  """
  _validate(noise, condition, sigmas, cond, uncond)
  sigmas = jnp.asarray(sigmas, jnp.float32)

  def step(i, x):
    s, s_next = sigmas[i], sigmas[i + 1]
    v = guided_velocity(velocity_fn, x, condition, s, cond, uncond, guidance_scale,
                        image_guidance_scale)
    return x + (s_next - s) * v

  return jax.lax.fori_loop(0, _num_steps(sigmas), step, noise.astype(jnp.float32))


def few_step_sample(velocity_fn: VelocityFn, noise: jax.Array, condition: jax.Array,
                    sigmas: jax.Array, cond: Any, rng: jax.Array | None = None) -> jax.Array:
  """Sampler for CFG-free distilled students on a fixed short schedule.

  With `rng=None` this is the plain Euler update `DreamLiteMobilePipeline` uses
  (4 steps: timesteps [1000, 904.53, 759.51, 512.84] at 1024px). With a key it
  is the re-noising multistep form used by DMD-style students: predict
  `x0 = x - s v`, then jump to `(1 - s_next) x0 + s_next e'` with fresh noise.

  Returns:
    final latents [B, H, W, C] float32.
  """
  if rng is None:
    return euler_sample(velocity_fn, noise, condition, sigmas, cond)
  _validate(noise, condition, sigmas, cond, None)
  sigmas = jnp.asarray(sigmas, jnp.float32)
  n = sigmas.shape[0] - 1

  def step(x, inputs):
    s, s_next, key = inputs
    v = guided_velocity(velocity_fn, x, condition, s, cond)
    x0 = x - s * v
    return (1.0 - s_next) * x0 + s_next * jax.random.normal(key, x.shape, x.dtype), None

  x, _ = jax.lax.scan(step, noise.astype(jnp.float32),
                      (sigmas[:-1], sigmas[1:], jax.random.split(rng, n)))
  return x


# ----------------------------------------------------------------------------
# Flow-GRPO SDE.


class SDEStep(NamedTuple):
  prev_sample: jax.Array  # [B, H, W, C] the sample at s_next
  log_prob: jax.Array  # [B] mean over elements of log N(prev_sample; mean, std^2)
  mean: jax.Array  # [B, H, W, C]
  std: jax.Array  # scalar: std of the transition, std_dev_t * sqrt(s - s_next)


def sde_step(x: jax.Array, velocity: jax.Array, sigma: jax.Array, sigma_next: jax.Array,
             sigma_max: jax.Array, noise_level: float | jax.Array,
             rng: jax.Array | None = None, prev_sample: jax.Array | None = None) -> SDEStep:
  """One Flow-GRPO step: the reverse SDE with the flow's marginals, discretised.

  `x' = x + [v + a^2/(2s) (x + (1 - s) v)] dt + a sqrt(-dt) e`, `dt = s_next - s`,
  `a = noise_level * sqrt(s / (1 - s))` (with `1 - s` replaced by `1 - sigma_max`
  at s = 1, sigma_max = the schedule's second sigma, as in Flow-GRPO).

  Pass `rng` to sample `prev_sample`, or pass `prev_sample` (a stored
  trajectory) to score it under the current velocity, as RL training does.
  `log_prob` is averaged over all non-batch elements (Flow-GRPO's convention);
  a step with noise_level 0 is deterministic and gets log_prob 0.
  """
  x = x.astype(jnp.float32)
  velocity = velocity.astype(jnp.float32)
  dt = sigma_next - sigma
  denom = 1.0 - jnp.where(sigma == 1.0, sigma_max, sigma)
  std_dev_t = jnp.sqrt(sigma / denom) * noise_level
  mean = (x * (1.0 + std_dev_t**2 / (2.0 * sigma) * dt)
          + velocity * (1.0 + std_dev_t**2 * (1.0 - sigma) / (2.0 * sigma)) * dt)
  std = std_dev_t * jnp.sqrt(-dt)
  if prev_sample is None:
    if rng is None:
      raise ValueError("sde_step needs either rng (to sample) or prev_sample (to score)")
    prev_sample = mean + std * jax.random.normal(rng, x.shape, jnp.float32)
  prev_sample = prev_sample.astype(jnp.float32)
  stochastic = std > 0
  safe_std = jnp.where(stochastic, std, 1.0)
  # Gradient flows through `mean` only (the policy), as in Flow-GRPO.
  elem = (-(jax.lax.stop_gradient(prev_sample) - mean)**2 / (2.0 * safe_std**2)
          - jnp.log(safe_std) - 0.5 * math.log(2.0 * math.pi))
  log_prob = jnp.where(stochastic, jnp.mean(elem, axis=tuple(range(1, x.ndim))), 0.0)
  return SDEStep(prev_sample, log_prob, mean, std)


class SDETrajectory(NamedTuple):
  latents: jax.Array  # [B, H, W, C] final sample
  trajectory: jax.Array  # [N + 1, B, H, W, C] x at every sigma (trajectory[0] = noise)
  log_probs: jax.Array  # [N, B] per-step log-probabilities


def sde_sample(velocity_fn: VelocityFn, noise: jax.Array, condition: jax.Array,
               sigmas: jax.Array, cond: Any, rng: jax.Array,
               noise_level: float | jax.Array = 0.7, uncond: Any = None,
               guidance_scale: float | jax.Array | None = None,
               image_guidance_scale: float | jax.Array | None = None) -> SDETrajectory:
  """Stochastic sampling for online RL (Flow-GRPO), recording the trajectory.

  Args:
    noise_level: scalar, or [N] per-step levels (0 makes a step an ODE step).
    Others as in `euler_sample`.
  Returns:
    SDETrajectory (final latents, all intermediate latents, per-step log-probs).
  """
  _validate(noise, condition, sigmas, cond, uncond)
  sigmas = jnp.asarray(sigmas, jnp.float32)
  n = sigmas.shape[0] - 1
  levels = jnp.broadcast_to(jnp.asarray(noise_level, jnp.float32), (n,))
  sigma_max = sigmas[1]

  def step(x, inputs):
    s, s_next, level, key = inputs
    v = guided_velocity(velocity_fn, x, condition, s, cond, uncond, guidance_scale,
                        image_guidance_scale)
    out = sde_step(x, v, s, s_next, sigma_max, level, rng=key)
    return out.prev_sample, (out.prev_sample, out.log_prob)

  x0 = noise.astype(jnp.float32)
  x, (xs, log_probs) = jax.lax.scan(
      step, x0, (sigmas[:-1], sigmas[1:], levels, jax.random.split(rng, n)))
  return SDETrajectory(x, jnp.concatenate([x0[None], xs]), log_probs)
