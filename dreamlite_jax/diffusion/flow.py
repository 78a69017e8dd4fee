"""Rectified-flow math: noising, velocity targets, training sigmas, shifted schedules.

DreamLite is trained as a flow-matching model: `x_t = (1 - s) x0 + s e` with
velocity target `e - x0`. Sampling walks sigma from 1 to 0 on a schedule that is
shifted towards high noise for large images (the Flux/SD3 "dynamic shift").
Everything here is the single source of those formulas so that training, the
samplers and the pipeline agree with diffusers' `FlowMatchEulerDiscreteScheduler`
as the DreamLite pipelines configure it.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000  # timestep fed to the U-Net = sigma * 1000
VAE_SCALE = 8  # pixels per latent cell of DreamLite's VAE (TAESD); tiny VAEs may differ


def _per_example(sigma: jax.Array, x: jax.Array) -> jax.Array:
  """Reshapes `sigma` [B] (or a scalar) so it broadcasts against `x` [B, ...]."""
  sigma = jnp.asarray(sigma, x.dtype)
  if sigma.ndim == 0:
    return sigma
  if sigma.shape != x.shape[:1]:
    raise ValueError(f"sigma has shape {sigma.shape}, expected [{x.shape[0]}] for x of shape {x.shape}")
  return sigma.reshape((-1,) + (1,) * (x.ndim - 1))


def add_noise(x0: jax.Array, noise: jax.Array, sigma: jax.Array) -> jax.Array:
  """Noised latents `x_t = (1 - sigma) x0 + sigma noise`.

  Args:
    x0: clean latents [B, H, W, C].
    noise: standard normal noise, same shape.
    sigma: noise level [B] (or scalar) in [0, 1].
  Returns:
    x_t [B, H, W, C].
  """
  if x0.shape != noise.shape:
    raise ValueError(f"x0 {x0.shape} and noise {noise.shape} differ in shape")
  s = _per_example(sigma, x0)
  return (1.0 - s) * x0 + s * noise


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
  """The flow-matching regression target `noise - x0` (d x_t / d sigma)."""
  return noise - x0


def predict_x0(x_t: jax.Array, velocity: jax.Array, sigma: jax.Array) -> jax.Array:
  """Clean-sample estimate from a velocity prediction: `x0 = x_t - sigma v`."""
  return x_t - _per_example(sigma, x_t) * velocity


def predict_noise(x_t: jax.Array, velocity: jax.Array, sigma: jax.Array) -> jax.Array:
  """Noise estimate from a velocity prediction: `e = x_t + (1 - sigma) v`."""
  return x_t + (1.0 - _per_example(sigma, x_t)) * velocity


# ----------------------------------------------------------------------------
# Resolution-dependent shift.


def shift_sigmas(sigmas, mu: float):
  """Exponential time shift `e^mu / (e^mu + 1/s - 1)` (diffusers' `time_shift`).

  A fixed SD3-style shift `k` is the same map with `mu = log(k)`:
  `k s / (1 + (k - 1) s)`. Works on numpy arrays and jax arrays alike;
  sigma = 0 maps to 0 and sigma = 1 maps to 1.
  """
  e = math.exp(mu)
  if isinstance(sigmas, jax.Array):
    safe = jnp.where(sigmas > 0, sigmas, 1.0)
    return jnp.where(sigmas > 0, e / (e + (1.0 / safe - 1.0)), 0.0).astype(sigmas.dtype)
  sigmas = np.asarray(sigmas)
  with np.errstate(divide="ignore"):
    out = e / (e + (1.0 / sigmas - 1.0))
  return np.where(sigmas > 0, out, 0.0).astype(sigmas.dtype)


@dataclasses.dataclass(frozen=True)
class ShiftConfig:
  """How sigmas are shifted for a given resolution.

  `dynamic=True` (DreamLite): `mu` is linear in the target's token count
  (latent H * W / 4, i.e. 2x2 patches) between (base_seq_len -> base_shift) and
  (max_seq_len -> max_shift), extrapolated outside; 1024x1024 gives mu = 1.15.
  `dynamic=False`: a fixed shift factor `shift` (1.0 = no shift).
  """
  dynamic: bool = True
  base_seq_len: int = 256
  max_seq_len: int = 4096
  base_shift: float = 0.5
  max_shift: float = 1.15
  shift: float = 1.0

  def mu(self, latent_height: int, latent_width: int) -> float:
    """The shift exponent for a target latent of `latent_height x latent_width` cells."""
    if not self.dynamic:
      if self.shift <= 0:
        raise ValueError(f"ShiftConfig.shift must be > 0, got {self.shift}")
      return math.log(self.shift)
    return resolution_mu(latent_height * latent_width // 4, self.base_seq_len, self.max_seq_len,
                         self.base_shift, self.max_shift)


def resolution_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                  base_shift: float = 0.5, max_shift: float = 1.15) -> float:
  """`mu` linear in the token count (the DreamLite pipelines' `calculate_shift`)."""
  m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
  b = base_shift - m * base_seq_len
  return image_seq_len * m + b


def sampling_sigmas(num_steps: int, mu: float) -> np.ndarray:
  """The N-step inference schedule, with the terminal 0 appended.

  Equals `FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).set_timesteps(
  sigmas=linspace(1, 1/N, N), mu=mu).sigmas` as `DreamLitePipeline` calls it.

  Returns:
    float32 [num_steps + 1], decreasing from 1 to 0.
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  base = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
  shifted = shift_sigmas(base, mu).astype(np.float32)
  return np.concatenate([shifted, np.zeros(1, np.float32)])


def schedule_for_size(num_steps: int, height: int, width: int,
                      shift: ShiftConfig = ShiftConfig(), vae_scale: int = VAE_SCALE
                      ) -> np.ndarray:
  """`sampling_sigmas` for an output image of `height x width` pixels and a VAE of
  `vae_scale` pixels per latent cell. [N + 1] float32."""
  if height % vae_scale or width % vae_scale:
    raise ValueError(f"image size {height}x{width} is not a multiple of {vae_scale}")
  return sampling_sigmas(num_steps, shift.mu(height // vae_scale, width // vae_scale))


def size_ids(batch: int, height: int, width: int) -> np.ndarray:
  """The U-Net's size conditioning (`time_ids`): (width, height) in pixels per example,
  float32 [batch, 2]. Training batches and the pipeline must pass the same ids."""
  return np.tile(np.array([[width, height]], np.float32), (batch, 1))


def timesteps_from_sigmas(sigmas) -> np.ndarray:
  """U-Net timesteps (sigma * 1000) of a schedule, without the terminal 0. [N] float32."""
  sigmas = np.asarray(sigmas, np.float32)
  return sigmas[:-1] * np.float32(NUM_TRAIN_TIMESTEPS)


# ----------------------------------------------------------------------------
# Training sigmas.

TIMESTEP_SAMPLERS = ("uniform", "logit_normal")


def sample_training_sigmas(rng: jax.Array, batch_size: int, kind: str = "uniform",
                           logit_mean: float | jax.Array = 0.0, logit_std: float = 1.0,
                           mu: float | None = None) -> jax.Array:
  """Noise levels for a training batch.

  Args:
    rng: PRNG key.
    batch_size: B.
    kind: "uniform" (s ~ U(0, 1), the public DreamLite recipe) or "logit_normal"
      (s = sigmoid(n), n ~ N(logit_mean, logit_std^2), SD3's choice).
    logit_mean, logit_std: parameters of the logit-normal (`logit_mean` may be [B]: one
      mean per row).
    mu: optional resolution shift applied after sampling (see `shift_sigmas`).
  Returns:
    sigmas [B] float32 in (0, 1).
  """
  if kind == "uniform":
    sigmas = jax.random.uniform(rng, (batch_size,), jnp.float32)
  elif kind == "logit_normal":
    if logit_std <= 0:
      raise ValueError(f"logit_std must be > 0, got {logit_std}")
    n = logit_mean + logit_std * jax.random.normal(rng, (batch_size,), jnp.float32)
    sigmas = jax.nn.sigmoid(n)
  else:
    raise ValueError(f"unknown timestep sampler {kind!r}; expected one of {TIMESTEP_SAMPLERS}")
  if mu is not None:
    sigmas = shift_sigmas(sigmas, mu)
  return sigmas
