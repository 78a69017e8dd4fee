"""The tiny job's first stage: train the tiny autoencoder on shapes images.

The paper ships TAESD-XL; the CPU default has no pretrained weights, so it
trains a `VAEConfig.tiny()` autoencoder (4x in the default job) with the shared trainer. Loss:
L1 + MSE reconstruction in [-1, 1], plus a moment regulariser that keeps each
latent channel near zero mean and unit variance over the batch, so flow
matching's N(0, 1) noise is on the latents' scale (no scaling factor needed).

The stage's results carry the ceilings (`ceilings`): the shapes evaluator's scores
of VAE round-trips of ground truth, which bound what any U-Net decoded by this VAE
can score. Two knobs of its data and loss:
- random square crops (`data.crop_size`): the autoencoder is convolutional, so
  16x16 crops of 32x32 images train the same weights at a quarter of the cost, but
  they cut objects as large as the shapes world's (the default trains on whole images);
- `loss.foreground_weight`: shapes images are mostly plain background, which
  an unweighted loss learns first and the objects' colours last; pixels that
  differ from the image's corner (background) colour weigh `1 + w` instead of 1.
  0 turns it off (real photos have no plain background).
"""
from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import shapes
from dreamlite_jax.eval import shapes_eval
from dreamlite_jax.job.preemption import raise_if_preempted
from dreamlite_jax.training import checkpoints
from dreamlite_jax.training import metrics as metrics_lib
from dreamlite_jax.training import trainer

# Evaluation examples per T2I category / edit type behind the ceilings: 32 keeps one
# example's weight in a category at 0.03.
CEILING_PER_CATEGORY = 32
CEILING_PER_TYPE = 32


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
  """Trains the VAE in `ctx.workdir`; returns steps, final loss and the ceilings."""
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
  apply = jax.jit(lambda p, x: vae.apply({"params": p}, x))
  reconstruct = lambda images: to_uint8(apply(params, images.astype(np.float32) / 127.5 - 1.0))
  ceiling = ceilings(reconstruct, size)
  x = np.stack([shapes.render(e["metadata"]["scene"])
                for e in shapes.t2i_eval_prompts("train", 2, size)[:8]])
  grid = np.concatenate([x, reconstruct(x)]).astype(np.float32) / 127.5 - 1.0
  metrics_lib.write_grid(os.path.join(ctx.workdir, "reconstructions.png"), grid)
  history = metrics_lib.read_metrics(ctx.workdir)
  losses = [h for h in history if "loss" in h]
  return {"steps": int(result.final_step), "final_loss": losses[-1]["loss"] if losses else None,
          **ceiling, "sample_grids": ["reconstructions.png"]}


def to_uint8(recon: Any) -> np.ndarray:
  """Decoder output in [-1, 1] -> uint8 images."""
  return np.round((np.clip(np.asarray(recon), -1, 1) + 1) * 127.5).astype(np.uint8)


def _eval_prompts(size: int, per_category: int = CEILING_PER_CATEGORY) -> list[dict]:
  return (shapes.t2i_eval_prompts("train", per_category, size) +
          shapes.t2i_eval_prompts("heldout", per_category, size))


def ceilings(reconstruct: Callable[[np.ndarray], np.ndarray], size: int,
             per_category: int = CEILING_PER_CATEGORY, per_type: int = CEILING_PER_TYPE,
             batch: int = 64) -> dict[str, Any]:
  """What the shapes evaluator makes of VAE round-trips of ground truth: the score of a
  perfect generator decoded by this VAE, so a bound on every later stage's score.

  reconstruct: uint8 images [B, H, W, 3] -> uint8 round-trips. Uses the evaluation sets
  (`shapes.EVAL_SEED`, held-in and held-out); edit results are scored against the
  original (not round-tripped) sources, as the eval stage scores them.
  Returns ceiling_t2i, ceiling_t2i_heldout, ceiling_edit, ceiling_edit_heldout (overall
  accuracies) and ceiling_scores {"t2i": ..., "edit": ...} (per category / edit type).
  """
  def round_trip(images):
    images = np.stack(images)
    return np.concatenate([reconstruct(images[i:i + batch]) for i in range(0, len(images), batch)])

  prompts = _eval_prompts(size, per_category)
  metas = [p["metadata"] for p in prompts]
  t2i = shapes_eval.score_t2i(list(round_trip([shapes.render(m["scene"]) for m in metas])), metas)
  edits = (shapes.edit_eval_set("train", per_type, size) +
           shapes.edit_eval_set("heldout", per_type, size))
  edit = shapes_eval.score_edit([e["source"] for e in edits],
                                list(round_trip([e["target"] for e in edits])),
                                [e["metadata"] for e in edits])
  return {"ceiling_t2i": t2i["overall"], "ceiling_t2i_heldout": t2i["heldout/overall"],
          "ceiling_edit": edit["overall"], "ceiling_edit_heldout": edit["heldout/overall"],
          "ceiling_scores": {"t2i": t2i, "edit": edit}}
