"""DreamLite for users: `generate()` text-to-image and `edit()` instruction editing.

A `Pipeline` holds the three frozen parts and their params: the text encoder
(`TextEncoder`, Qwen3-VL plus DreamLite's templates), the U-Net and the VAE. It
can be built from in-memory params (tests, the trainer's periodic samples) or
from a training run's checkpoint (`load_pipeline`). Sampling follows
`DreamLitePipeline`: shifted flow-matching sigmas, Euler steps, text CFG for
generation and dual (text + image) guidance for editing; `guidance=None` gives
the CFG-free few-step sampler of distilled (mobile) checkpoints.

CLI:
  python -m dreamlite_jax.pipeline generate --checkpoint DIR --prompt "a red circle" --out a.png
  python -m dreamlite_jax.pipeline edit --checkpoint DIR --image in.png --instruction "make it blue" --out b.png
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dreamlite_jax.diffusion import flow
from dreamlite_jax.diffusion import sampling

ImageLike = Image.Image | np.ndarray


def _velocity_fn(unet, params):
  def velocity(canvas, timestep, cond):
    return unet.apply({"params": params}, canvas, timestep, cond["text"], cond["text_mask"],
                      cond["time_ids"])
  return velocity


def _denoise(unet, params, noise, condition, sigmas, cond, uncond, guidance, image_guidance):
  """Whole sampling loop, jitted once per (shapes, guidance mode)."""
  velocity = _velocity_fn(unet, params)
  if uncond is None:
    return sampling.few_step_sample(velocity, noise, condition, sigmas, cond)
  return sampling.euler_sample(velocity, noise, condition, sigmas, cond, uncond, guidance,
                               image_guidance)


def _vae_call(vae, params, x, method: str):
  return vae.apply({"params": params}, x, method=method)


def to_uint8(images: jax.Array) -> np.ndarray:
  """[-1, 1] float images [B, H, W, 3] -> uint8 (as diffusers' postprocess rounds)."""
  x = np.clip(np.asarray(images, np.float32) / 2.0 + 0.5, 0.0, 1.0)
  return np.round(x * 255.0).astype(np.uint8)


def _as_size(size: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(size, int):
    return size, size
  size = tuple(int(s) for s in size)
  if len(size) != 2:
    raise ValueError(f"size must be an int or (height, width), got {size}")
  return size


def load_image(image: ImageLike, size: tuple[int, int]) -> np.ndarray:
  """A PIL image or uint8 [H, W, 3] array -> float32 [height, width, 3] in [-1, 1] (Lanczos)."""
  if isinstance(image, np.ndarray):
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise ValueError(f"image arrays must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    image = Image.fromarray(image)
  if not isinstance(image, Image.Image):
    raise TypeError(f"expected a PIL image or a uint8 array, got {type(image).__name__}")
  height, width = size
  image = image.convert("RGB")
  if image.size != (width, height):
    image = image.resize((width, height), Image.LANCZOS)
  return np.asarray(image, np.float32) / 127.5 - 1.0


@dataclasses.dataclass
class Pipeline:
  """Text encoder + U-Net + VAE with params, and the sampling defaults.

  Attributes:
    text_encoder: `dreamlite_jax.models.text_conditioning.TextEncoder` (holds its params).
    unet: `DreamLiteUNet`; unet_params its params.
    vae: `TinyAutoencoder`; vae_params its params.
    shift: resolution-dependent sigma shift of the schedule.
    size_multiple: image sides must be multiples of this (8 x the U-Net's total downsampling).
  """
  text_encoder: Any
  unet: Any
  unet_params: Any
  vae: Any
  vae_params: Any
  shift: flow.ShiftConfig = flow.ShiftConfig()
  size_multiple: int = 32

  def __post_init__(self):
    self._denoise = jax.jit(functools.partial(_denoise, self.unet))
    self._encode = jax.jit(functools.partial(_vae_call, self.vae, method="encode"))
    self._decode = jax.jit(functools.partial(_vae_call, self.vae, method="decode"))

  # ---------------------------------------------------------------- helpers

  def _check_size(self, size: tuple[int, int]) -> None:
    if size[0] % self.size_multiple or size[1] % self.size_multiple or min(size) <= 0:
      raise ValueError(f"image size {size[0]}x{size[1]} must be positive multiples of "
                       f"{self.size_multiple}")

  def _noise(self, seed: int, batch: int, size: tuple[int, int]) -> jax.Array:
    # One key per image index, so image i depends only on (seed, i), not on the batch size.
    key = jax.random.PRNGKey(seed)
    shape = (size[0] // flow.VAE_SCALE, size[1] // flow.VAE_SCALE, 4)
    return jnp.stack([jax.random.normal(jax.random.fold_in(key, i), shape) for i in range(batch)])

  @staticmethod
  def _cond(features, mask, size: tuple[int, int]) -> dict:
    batch = features.shape[0]
    time_ids = jnp.tile(jnp.array([[size[1], size[0]]], jnp.float32), (batch, 1))
    return {"text": jnp.asarray(features, jnp.float32), "text_mask": jnp.asarray(mask),
            "time_ids": time_ids}

  def _finish(self, latents: jax.Array, output: str):
    if output == "latent":
      return np.asarray(latents)
    images = to_uint8(self._decode(self.vae_params, latents))
    if output == "np":
      return images
    if output == "pil":
      return [Image.fromarray(im) for im in images]
    raise ValueError(f"output must be 'pil', 'np' or 'latent', got {output!r}")

  def denoise(self, noise: jax.Array, condition: jax.Array, cond: dict, uncond: dict | None,
              steps: int, guidance: float | None, image_guidance: float | None) -> jax.Array:
    """Runs the sampler on latents `[B, h, w, 4]`; returns final latents `[B, h, w, 4]`."""
    sigmas = jnp.asarray(flow.sampling_sigmas(steps, self.shift.mu(*noise.shape[1:3])))
    g = None if guidance is None else jnp.float32(guidance)
    g_img = None if image_guidance is None else jnp.float32(image_guidance)
    return self._denoise(self.unet_params, noise, condition, sigmas, cond, uncond, g, g_img)

  # ---------------------------------------------------------------- public API

  def generate(self, prompts: str | Sequence[str], seed: int = 0, steps: int = 28,
               guidance: float | None = 3.5, size: int | Sequence[int] = 1024,
               output: str = "pil"):
    """Text-to-image.

    Args:
      prompts: one prompt or a list (one image each, batched).
      seed: images are a deterministic function of (seed, index in the batch).
      steps: Euler steps (28 base, 4 for distilled checkpoints).
      guidance: text CFG scale; None = no CFG (distilled checkpoints).
      size: int or (height, width) in pixels.
      output: "pil" (list of PIL images), "np" (uint8 [B, H, W, 3]) or "latent".
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
      raise ValueError("generate() needs at least one prompt")
    size = _as_size(size)
    self._check_size(size)
    b = len(prompts)
    cond = self._cond(*self.text_encoder.encode_generate(prompts), size)
    uncond = None
    if guidance is not None:
      uncond = self._cond(*self.text_encoder.encode_generate_unconditional(b), size)
    noise = self._noise(seed, b, size)
    latents = self.denoise(noise, jnp.zeros_like(noise), cond, uncond, steps, guidance, None)
    return self._finish(latents, output)

  def edit(self, images: ImageLike | Sequence[ImageLike], instructions: str | Sequence[str],
           seed: int = 0, steps: int = 28, guidance: float | None = 3.5,
           image_guidance: float | None = 1.0, size: int | Sequence[int] | None = None,
           output: str = "pil"):
    """Instruction-based editing of source images.

    Args:
      images: PIL image(s) or uint8 [H, W, 3] array(s), one per instruction.
      instructions: edit instruction(s).
      guidance: text guidance `g`; None = no guidance at all (distilled
        checkpoints; `image_guidance` is then unused).
      image_guidance: image guidance `g_img` of the dual guidance
        `u + g (v_text - v_img) + g_img (v_img - u)`; None = text CFG only.
      size: output (height, width); default: the first source's size rounded
        down to `size_multiple`. Sources are resized to it (Lanczos).
      Others as in `generate`.
    """
    instructions = [instructions] if isinstance(instructions, str) else list(instructions)
    if isinstance(images, (Image.Image, np.ndarray)) and not (
        isinstance(images, np.ndarray) and images.ndim == 4):
      images = [images]
    images = list(images)
    if len(images) != len(instructions) or not images:
      raise ValueError(f"edit() needs one image per instruction, got {len(images)} images and "
                       f"{len(instructions)} instructions")
    if size is None:
      first = images[0]
      h, w = (first.size[1], first.size[0]) if isinstance(first, Image.Image) else first.shape[:2]
      m = self.size_multiple
      size = (max(m, h // m * m), max(m, w // m * m))
    size = _as_size(size)
    self._check_size(size)
    b = len(images)
    pixels = jnp.asarray(np.stack([load_image(im, size) for im in images]))
    source = self._encode(self.vae_params, pixels)
    vision_images = pixels if getattr(self.text_encoder.config, "vision", None) is not None else None
    cond = self._cond(*self.text_encoder.encode_edit(instructions, vision_images), size)
    uncond = None
    if guidance is not None:
      uncond = self._cond(*self.text_encoder.encode_edit_unconditional(b, vision_images), size)
    noise = self._noise(seed, b, size)
    latents = self.denoise(noise, source, cond, uncond, steps, guidance,
                           image_guidance if guidance is not None else None)
    return self._finish(latents, output)
