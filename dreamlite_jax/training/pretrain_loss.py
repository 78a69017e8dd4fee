"""The flow-matching objective of the pretraining and SFT stages, on packed canvases.

One function for T2I, edit and mixed batches: sample sigma per example, noise
the target latent only, pack `[noisy target | condition]`, predict velocity on
the whole canvas and regress `noise - target` on the left half. Optional
condition dropout (text -> the null prompt's features, source -> zeros) trains
the unconditional branches that classifier-free and dual guidance need.

Batch (a dict of arrays, leading axis B):
  latents       [B, H, W, C]  clean target latents
  text          [B, L, D]     text features;  text_mask [B, L] (1 = real token)
  source_latents [B, H, W, C] optional, with is_edit [B] (0/1): edit examples
  time_ids      [B, 2]        optional (width, height) in pixels; default from
                              the latent size times 8 (DreamLite's VAE; pass
                              them for a VAE of another scale)
  null_text     [B|1, L, D], null_text_mask [B|1, L]: required when
                              text_dropout > 0
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from dreamlite_jax.diffusion import flow
from dreamlite_jax.diffusion import packing

# predict_fn(params, canvas [B, H, 2W, C], timestep [B], cond) -> [B, H, 2W, C],
# cond = {"text", "text_mask", "time_ids"}.
PredictFn = Callable[[Any, jax.Array, jax.Array, dict], jax.Array]


@dataclasses.dataclass(frozen=True)
class PretrainLossConfig:
  """Timestep distribution and condition dropout of the objective."""
  timestep_sampling: str = "uniform"  # or "logit_normal"
  logit_mean: float = 0.0
  logit_std: float = 1.0
  # The logit-normal mean of edit rows (None = logit_mean). Above 0 it trains edits more at
  # high noise, where the target half holds little and the prediction must come from the
  # source half: that is where copying across the canvas is learned (docs/results.md,
  # "Editing").
  edit_logit_mean: float | None = None
  shift_mu: float | None = None  # optional shift of the training sigmas
  text_dropout: float = 0.0  # prob. of replacing the prompt by the null prompt
  image_dropout: float = 0.0  # prob. of zeroing an edit example's source latent

  def __post_init__(self):
    if self.timestep_sampling not in flow.TIMESTEP_SAMPLERS:
      raise ValueError(f"timestep_sampling={self.timestep_sampling!r}; expected one of "
                       f"{flow.TIMESTEP_SAMPLERS}")
    if self.edit_logit_mean is not None and self.timestep_sampling != "logit_normal":
      raise ValueError(f"edit_logit_mean={self.edit_logit_mean} needs timestep_sampling="
                       f"'logit_normal', got {self.timestep_sampling!r}")
    for name in ("text_dropout", "image_dropout"):
      p = getattr(self, name)
      if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {p}")


def _require(batch: dict, key: str) -> jax.Array:
  if key not in batch:
    raise KeyError(f"pretraining batch is missing {key!r}; it has {sorted(batch)}")
  return batch[key]


def _masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _drop_text(rng, text, text_mask, batch, p):
  null_text = _require(batch, "null_text")
  null_mask = _require(batch, "null_text_mask")
  if null_text.shape[1:] != text.shape[1:] or null_mask.shape[1:] != text_mask.shape[1:]:
    raise ValueError(f"null_text {null_text.shape}/null_text_mask {null_mask.shape} must match "
                     f"text {text.shape}/text_mask {text_mask.shape} except in the batch axis")
  drop = jax.random.bernoulli(rng, p, (text.shape[0],))
  text = jnp.where(drop[:, None, None], jnp.broadcast_to(null_text, text.shape), text)
  text_mask = jnp.where(drop[:, None], jnp.broadcast_to(null_mask, text_mask.shape), text_mask)
  return text, text_mask


def flow_matching_loss(predict_fn: PredictFn, params: Any, batch: dict, rng: jax.Array,
                       config: PretrainLossConfig = PretrainLossConfig()
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Masked flow-matching MSE on the target half of the packed canvas.

  Returns:
    (loss scalar, metrics): `loss`, `loss_t2i`, `loss_edit` (means over the
    examples of each task; 0 when a task is absent), `sigma_mean`, `edit_fraction`.
  """
  x0 = _require(batch, "latents").astype(jnp.float32)
  packing.check_latents("batch['latents']", x0)
  b, h, w, _ = x0.shape
  text, text_mask = _require(batch, "text"), _require(batch, "text_mask")
  source = batch.get("source_latents")
  is_edit = batch.get("is_edit")
  if source is not None and is_edit is None:
    raise KeyError("pretraining batch has 'source_latents' but no 'is_edit' [B] flag")
  edit = jnp.zeros((b,), jnp.float32) if source is None else jnp.asarray(is_edit, jnp.float32)
  time_ids = batch.get("time_ids")
  if time_ids is None:
    time_ids = jnp.asarray(flow.size_ids(b, h * flow.VAE_SCALE, w * flow.VAE_SCALE))

  k_sigma, k_noise, k_text, k_image = jax.random.split(rng, 4)
  if config.text_dropout > 0:
    text, text_mask = _drop_text(k_text, text, text_mask, batch, config.text_dropout)
  keep_source = edit
  if config.image_dropout > 0:
    keep_source = edit * (1.0 - jax.random.bernoulli(k_image, config.image_dropout, (b,)))
  condition = packing.condition_latents(source, None if source is None else keep_source, x0)

  logit_mean = config.logit_mean
  if config.edit_logit_mean is not None:
    logit_mean = jnp.where(edit > 0, config.edit_logit_mean, config.logit_mean)
  sigma = flow.sample_training_sigmas(k_sigma, b, config.timestep_sampling, logit_mean,
                                      config.logit_std, config.shift_mu)
  noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
  x_t = flow.add_noise(x0, noise, sigma)
  canvas = packing.pack(x_t, condition)
  target = packing.pack(flow.velocity_target(x0, noise), jnp.zeros_like(condition))
  cond = {"text": text, "text_mask": text_mask, "time_ids": time_ids}
  pred = predict_fn(params, canvas, sigma * flow.NUM_TRAIN_TIMESTEPS, cond)
  if pred.shape != canvas.shape:
    raise ValueError(f"predict_fn returned {pred.shape}, expected the canvas shape {canvas.shape}")

  mask = packing.target_mask(canvas.shape)
  sq = mask * (pred.astype(jnp.float32) - target)**2
  per_example = jnp.sum(sq, axis=(1, 2, 3)) / (jnp.sum(mask) * h * canvas.shape[3])
  loss = jnp.mean(per_example)
  metrics = {
      "loss": loss,
      "loss_t2i": _masked_mean(per_example, 1.0 - edit),
      "loss_edit": _masked_mean(per_example, edit),
      "sigma_mean": jnp.mean(sigma),
      "edit_fraction": jnp.mean(edit),
  }
  return loss, metrics


def unet_predict_fn(model) -> PredictFn:
  """Adapts a `DreamLiteUNet` (linen) to `predict_fn(params, canvas, timestep, cond)`."""

  def predict(params, canvas, timestep, cond):
    return model.apply({"params": params}, canvas, timestep, cond["text"], cond["text_mask"],
                       cond["time_ids"])

  return predict


def make_pretrain_loss(predict_fn: PredictFn,
                       config: PretrainLossConfig = PretrainLossConfig()
                       ) -> Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]:
  """`loss_fn(params, batch, rng) -> (loss, metrics)` for the trainer's step."""

  def loss_fn(params, batch, rng):
    return flow_matching_loss(predict_fn, params, batch, rng, config)

  return loss_fn
