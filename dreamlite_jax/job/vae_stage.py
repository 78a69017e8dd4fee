"""The tiny job's first stage: train the tiny autoencoder on shapes images.

The paper ships TAESD-XL; the CPU default has no pretrained weights, so it
trains a `VAEConfig.tiny()` autoencoder (4x in the default job) with the shared trainer. Loss:
L1 + MSE reconstruction in [-1, 1], plus a moment regulariser that keeps each
latent channel near zero mean and unit variance over the batch, so flow
matching's N(0, 1) noise is on the latents' scale (no scaling factor needed).

Two things make it learn in CPU minutes (measured by the shapes evaluator on
reconstructions, see `recon_scores` in the stage results):
- random square crops (`data.crop_size`): the autoencoder is convolutional, so
  16x16 crops of 32x32 images train the same weights at a quarter of the cost;
- `loss.foreground_weight`: shapes images are mostly plain background, which
  an unweighted loss learns first and the objects' colours last; pixels that
  differ from the image's corner (background) colour weigh `1 + w` instead of 1.
  0 turns it off (real photos have no plain background).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import shapes
from dreamlite_jax.eval import shapes_eval
from dreamlite_jax.job.preemption import raise_if_preempted
from dreamlite_jax.training import checkpoints
from dreamlite_jax.training import metrics as metrics_lib
from dreamlite_jax.training import trainer


def vae_loss(vae, params: Any, batch: dict, l1_weight: float, mse_weight: float,
             moment_weight: float, foreground_weight: float = 0.0
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Reconstruction + latent-moment loss of images `batch["images"]` [B, H, W, 3] in [-1, 1]."""
  x = batch["images"]
  z = vae.apply({"params": params}, x, method="encode")
  recon = vae.apply({"params": params}, z, method="decode")
  foreground = jnp.max(jnp.abs(x - x[:, :1, :1, :]), axis=-1, keepdims=True) > 0.05
  weight = 1.0 + foreground_weight * foreground.astype(jnp.float32)
  weighted_mean = lambda e: jnp.mean(weight * e) / jnp.mean(weight)
  l1 = weighted_mean(jnp.abs(recon - x))
  mse = weighted_mean((recon - x) ** 2)
  mean = jnp.mean(z, axis=(0, 1, 2))
  var = jnp.mean((z - mean) ** 2, axis=(0, 1, 2))
  moments = jnp.mean(mean ** 2) + jnp.mean((var - 1.0) ** 2)
  loss = l1_weight * l1 + mse_weight * mse + moment_weight * moments
  plain_mse = jnp.mean((recon - x) ** 2)
  psnr = 10.0 * jnp.log10(4.0 / jnp.maximum(plain_mse, 1e-10))  # peak-to-peak 2 in [-1, 1]
  return loss, {"l1": l1, "mse": mse, "latent_moments": moments, "psnr_db": psnr,
                "latent_std": jnp.sqrt(jnp.mean(var))}


class ImageBatches:
  """Random batches of uint8 images -> {"images": float32 [B, c, c, 3] in [-1, 1]}; resumable.

  `crop_size` c: one random square crop position per batch (0 = whole images).
  """

  def __init__(self, images: np.ndarray, batch_size: int, seed: int, crop_size: int = 0):
    height, width = images.shape[1:3]
    if crop_size < 0 or crop_size > min(height, width):
      raise ValueError(f"config.vae.data.crop_size = {crop_size}: must be 0 (no crop) or at most "
                       f"the image size {min(height, width)}")
    self.images, self.batch_size, self.seed, self.step = images, batch_size, seed, 0
    self.crop_size = crop_size

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
    if self.crop_size:
      c = self.crop_size
      y = rng.integers(batch.shape[1] - c + 1)
      x = rng.integers(batch.shape[2] - c + 1)
      batch = batch[:, y:y + c, x:x + c]
    return {"images": batch.astype(np.float32) / 127.5 - 1.0}


def run_stage(ctx) -> dict:
  """Trains the VAE in `ctx.workdir`; returns steps, final loss, reconstruction PSNR."""
  config = ctx.stage_config()
  models = ctx.models
  raw = models.raw_data()
  images = np.concatenate([raw["t2i_images"], raw["edit_sources"], raw["edit_targets"]])
  vae = models.vae
  size = models.image_size
  loss_cfg = config.loss
  loss_fn = lambda p, batch, rng: vae_loss(vae, p, batch, loss_cfg.l1_weight, loss_cfg.mse_weight,
                                           loss_cfg.moment_weight, loss_cfg.foreground_weight)
  init = lambda rng: vae.init(rng, jnp.zeros((1, size, size, 3)))["params"]
  data = ImageBatches(images, config.train.batch_size, config.seed, int(config.data.crop_size))
  result = trainer.train(config, ctx.workdir, loss_fn, data, init)
  raise_if_preempted(result, ctx.name)
  params = checkpoints.as_numpy(result.state.ema_params)
  examples = _eval_images(size)
  x = np.stack([e["image"] for e in examples]).astype(np.float32) / 127.5 - 1.0
  recon = np.asarray(jax.jit(lambda p, x: vae.apply({"params": p}, x))(params, x))
  mse = float(np.mean((recon - x) ** 2))
  # What the evaluator makes of reconstructions bounds what any generator decoded by
  # this VAE can score.
  recon_uint8 = np.round((np.clip(recon, -1, 1) + 1) * 127.5).astype(np.uint8)
  recon_scores = shapes_eval.score_t2i(list(recon_uint8), [e["metadata"] for e in examples])
  grid = np.concatenate([x[:8], np.clip(recon[:8], -1, 1)])
  metrics_lib.write_grid(os.path.join(ctx.workdir, "reconstructions.png"), grid)
  history = metrics_lib.read_metrics(ctx.workdir)
  losses = [h for h in history if "loss" in h]
  return {"steps": int(result.final_step), "final_loss": losses[-1]["loss"] if losses else None,
          "eval_psnr_db": float(10 * np.log10(4.0 / max(mse, 1e-10))),
          "recon_scores": {k: float(v) for k, v in recon_scores.items()},
          "sample_grids": ["reconstructions.png"]}


def _eval_images(size: int) -> list[dict]:
  return [shapes.make_t2i_example("train", shapes.T2I_CATEGORIES[i % 6], shapes.EVAL_SEED, i, size)
          for i in range(96)]
