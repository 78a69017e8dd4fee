"""In-context packing: one canvas `[target | condition]` along the latent width.

DreamLite does T2I and editing with the same U-Net by placing the (noisy) target
latent on the left and a condition latent on the right: exact zeros for T2I, the
clean VAE latent of the source image for editing. Nothing else marks the halves.
The condition half is never noised, and only the left half of the output is used
(by the loss and by the sampler).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from dreamlite_jax.diffusion import flow


def check_latents(name: str, x: jax.Array) -> None:
  """Raises ValueError naming `name` unless `x` is rank-4 NHWC."""
  if x.ndim != 4:
    raise ValueError(f"{name} must be NHWC [B, H, W, C], got shape {x.shape}")


def condition_latents(source: jax.Array | None, is_edit: jax.Array | None,
                      like: jax.Array) -> jax.Array:
  """The right half of the canvas for a batch that may mix T2I and edit examples.

  Args:
    source: source-image latents [B, H, W, C] (any values where not an edit), or
      None for a pure T2I batch.
    is_edit: [B] bool/0-1; True keeps `source`, False puts exact zeros. Required
      when `source` is given.
    like: the target latents [B, H, W, C] (gives shape and dtype).
  Returns:
    condition [B, H, W, C].
  """
  check_latents("target latents", like)
  if source is None:
    return jnp.zeros_like(like)
  check_latents("source latents", source)
  if source.shape != like.shape:
    raise ValueError(f"source latents {source.shape} do not match target latents {like.shape}")
  if is_edit is None:
    raise ValueError("is_edit [B] is required when source latents are given")
  is_edit = jnp.asarray(is_edit)
  if is_edit.shape != like.shape[:1]:
    raise ValueError(f"is_edit has shape {is_edit.shape}, expected [{like.shape[0]}]")
  keep = is_edit.astype(bool).reshape(-1, 1, 1, 1)
  return jnp.where(keep, source.astype(like.dtype), jnp.zeros_like(like))


def pack(target: jax.Array, condition: jax.Array) -> jax.Array:
  """Concatenates `[target | condition]` along width: [B, H, W, C] x2 -> [B, H, 2W, C]."""
  check_latents("target", target)
  check_latents("condition", condition)
  if target.shape != condition.shape:
    raise ValueError(f"target {target.shape} and condition {condition.shape} differ in shape")
  return jnp.concatenate([target, condition.astype(target.dtype)], axis=2)


def _half_width(canvas: jax.Array) -> int:
  check_latents("canvas", canvas)
  if canvas.shape[2] % 2:
    raise ValueError(f"canvas width {canvas.shape[2]} is odd; expected [B, H, 2W, C]")
  return canvas.shape[2] // 2


def unpack_target(canvas: jax.Array) -> jax.Array:
  """The left (target) half: [B, H, 2W, C] -> [B, H, W, C]."""
  return canvas[:, :, :_half_width(canvas)]


def unpack_condition(canvas: jax.Array) -> jax.Array:
  """The right (condition) half: [B, H, 2W, C] -> [B, H, W, C]."""
  return canvas[:, :, _half_width(canvas):]


def target_mask(canvas_shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
  """Loss mask over a canvas: 1 on the target half, 0 on the condition half.

  Args:
    canvas_shape: (B, H, 2W, C).
  Returns:
    mask [1, 1, 2W, 1] broadcastable to the canvas.
  """
  if len(canvas_shape) != 4 or canvas_shape[2] % 2:
    raise ValueError(f"canvas shape must be [B, H, 2W, C] with even width, got {canvas_shape}")
  w = canvas_shape[2] // 2
  return jnp.concatenate([jnp.ones((1, 1, w, 1), dtype), jnp.zeros((1, 1, w, 1), dtype)], axis=2)


def target_velocity(predict_fn: Callable[[Any, jax.Array, jax.Array, Any], jax.Array], params: Any,
                    x: jax.Array, sigma: jax.Array, condition: jax.Array, cond: Any) -> jax.Array:
  """Velocity of the target half of `[x | condition]` under a canvas model, each row at its
  own noise level: `predict_fn(params, canvas, timestep, cond)`, x and condition
  [B, H, W, C], sigma [B] (the model sees `sigma * 1000`). Returns float32 [B, H, W, C]."""
  out = predict_fn(params, pack(x, condition), sigma * flow.NUM_TRAIN_TIMESTEPS, cond)
  return unpack_target(out).astype(jnp.float32)
