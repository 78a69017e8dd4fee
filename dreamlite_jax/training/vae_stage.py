"""The tiny job's first stage: train the 8x tiny autoencoder on shapes images.

The paper ships TAESD-XL; the CPU default has no pretrained weights, so it
trains a `VAEConfig.tiny()` autoencoder with the shared trainer. Loss:
L1 + MSE reconstruction in [-1, 1], plus a moment regulariser that keeps each
latent channel near zero mean and unit variance over the batch, so flow
matching's N(0, 1) noise is on the latents' scale (no scaling factor needed).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dreamlite_jax import stages
from dreamlite_jax.training import checkpoints
from dreamlite_jax.training import metrics as metrics_lib
from dreamlite_jax.training import trainer


def vae_loss(vae, params: Any, batch: dict, l1_weight: float, mse_weight: float,
             moment_weight: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Reconstruction + latent-moment loss of images `batch["images"]` [B, H, W, 3] in [-1, 1]."""
  x = batch["images"]
  z = vae.apply({"params": params}, x, method="encode")
  recon = vae.apply({"params": params}, z, method="decode")
  l1 = jnp.mean(jnp.abs(recon - x))
  mse = jnp.mean((recon - x) ** 2)
  mean = jnp.mean(z, axis=(0, 1, 2))
  var = jnp.mean((z - mean) ** 2, axis=(0, 1, 2))
  moments = jnp.mean(mean ** 2) + jnp.mean((var - 1.0) ** 2)
  loss = l1_weight * l1 + mse_weight * mse + moment_weight * moments
  psnr = 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))  # peak-to-peak 2 in [-1, 1]
  return loss, {"l1": l1, "mse": mse, "latent_moments": moments, "psnr_db": psnr,
                "latent_std": jnp.sqrt(jnp.mean(var))}


class ImageBatches:
  """Random batches of uint8 images -> {"images": float32 [B, H, W, 3] in [-1, 1]}; resumable."""

  def __init__(self, images: np.ndarray, batch_size: int, seed: int):
    self.images, self.batch_size, self.seed, self.step = images, batch_size, seed, 0

  def __iter__(self):
    return self

  def get_state(self):
    return {"step": self.step}

  def set_state(self, state):
    self.step = int(state["step"])

  def __next__(self):
    rng = np.random.default_rng([self.seed, self.step, 7])
    self.step += 1
    batch = self.images[rng.integers(len(self.images), size=self.batch_size)]
    return {"images": batch.astype(np.float32) / 127.5 - 1.0}


def run_stage(ctx) -> dict:
  """Trains the VAE in `ctx.workdir`; returns steps, final loss, reconstruction PSNR."""
  config = ctx.stage_config()
  models = ctx.models
  raw = models.raw_data()
  images = np.concatenate([raw["t2i_images"], raw["edit_sources"], raw["edit_targets"]])
  # Latents cached for the diffusion stages belong to the previous VAE.
  stale = os.path.join(models.workdir, "data", "encoded.npz")
  if os.path.exists(stale):
    os.remove(stale)
  vae = models.vae
  size = models.image_size
  loss_cfg = config.loss
  loss_fn = lambda p, batch, rng: vae_loss(vae, p, batch, loss_cfg.l1_weight, loss_cfg.mse_weight,
                                           loss_cfg.moment_weight)
  init = lambda rng: vae.init(rng, jnp.zeros((1, size, size, 3)))["params"]
  data = ImageBatches(images, config.train.batch_size, config.seed)
  result = trainer.train(config, ctx.workdir, loss_fn, data, init)
  stages.raise_if_preempted(result, ctx.name)
  params = checkpoints.as_numpy(result.state.ema_params)
  held = np.stack([e["image"] for e in _eval_images(size)])
  x = held.astype(np.float32) / 127.5 - 1.0
  recon = np.asarray(jax.jit(lambda p, x: vae.apply({"params": p}, x))(params, x))
  mse = float(np.mean((recon - x) ** 2))
  grid = np.concatenate([x[:8], np.clip(recon[:8], -1, 1)])
  metrics_lib.write_grid(os.path.join(ctx.workdir, "reconstructions.png"), grid)
  history = metrics_lib.read_metrics(ctx.workdir)
  losses = [h for h in history if "loss" in h]
  return {"steps": int(result.final_step), "final_loss": losses[-1]["loss"] if losses else None,
          "eval_psnr_db": float(10 * np.log10(4.0 / max(mse, 1e-10))),
          "sample_grids": ["reconstructions.png"]}


def _eval_images(size: int) -> list[dict]:
  from data_pipelines import shapes
  return [shapes.make_t2i_example("train", shapes.T2I_CATEGORIES[i % 6], shapes.EVAL_SEED, i, size)
          for i in range(32)]
