"""RL on embedding caches (paper scale): prompts, their conditioning and the reward score.

A batch of cached conditions (`data_pipelines.latent_batches` rows with `prompt`
strings) holds everything a rollout needs: the prompt's text and null-text features
(no text encoder runs), the edit source latents (zeros for T2I rows) and the size ids.
The configured reward reads the decoded images with the prompt strings, and the decoded
edit sources for edits (`reward(images, prompts, sources)`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dreamlite_jax.diffusion.sampling import SamplerConfig


def items(batch: dict) -> list[dict]:
  """The rows of a cached-conditions batch as RL prompt items: {"text", "metadata" and
  "reward_text" (the prompt string: what the reward reads), "source" (the source latents
  for edits, else None), "target_latents", "row" (the batch row)}."""
  keys = [k for k in batch if k != "prompt"]
  out = []
  for i, prompt in enumerate(batch["prompt"]):
    edit = bool(batch["is_edit"][i] > 0)
    out.append({"text": str(prompt), "metadata": str(prompt), "reward_text": str(prompt),
                "source": batch["source_latents"][i] if edit else None,
                "target_latents": batch["latents"][i],
                "row": {k: batch[k][i] for k in keys}})
  return out


class CachedConditioner:
  """The shapes `Conditioner`'s interface over cached rows: the features are the cached
  ones, edit sources for the reward are decoded from their cached latents."""

  def __init__(self, models):
    self.models = models
    vae = models.vae
    self._decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method="decode"))

  def __call__(self, items: list[dict], group: int):
    rows = {k: np.stack([it["row"][k] for it in items]) for k in items[0]["row"]}
    rep = lambda a: np.repeat(a, group, axis=0)
    cond = {"text": rep(rows["text"]), "text_mask": rep(rows["text_mask"]),
            "time_ids": rep(rows["time_ids"])}
    uncond = {"text": rep(rows["null_text"]), "text_mask": rep(rows["null_text_mask"]),
              "time_ids": rep(rows["time_ids"])}
    return rep(rows["source_latents"]), cond, uncond, rep(self.sources(rows))

  def sources(self, rows: dict) -> np.ndarray:
    """Decoded edit sources (uint8) of a batch of rows; zeros for T2I rows."""
    edit = np.asarray(rows["is_edit"]) > 0
    return np.where(edit[:, None, None, None], self.decode(rows["source_latents"]),
                    0).astype(np.uint8)

  def decode(self, latents) -> np.ndarray:
    images = np.asarray(self._decode(self.models.vae_params, jnp.asarray(latents)))
    return np.round(np.clip((images + 1.0) / 2.0, 0, 1) * 255).astype(np.uint8)

  def encode_targets(self, items: list[dict]) -> np.ndarray:
    return np.stack([it["target_latents"] for it in items])


def reward_scores(pipe, batch: dict, sampler: SamplerConfig, batch_size: int, seed: int,
                  reward, conditioner: CachedConditioner) -> dict:
  """{"reward": mean reward, "images"} of a fixed cached set sampled with `sampler` by
  `pipe` in chunks of `batch_size`; the chunk at row k starts from seed + k, so the noise
  of every row is fixed and the same before and after training."""
  images = []
  n = len(batch["prompt"])
  for start in range(0, n, batch_size):
    rows = {k: v[start:start + batch_size] for k, v in batch.items() if k != "prompt"}
    images.append(pipe.sample_cached(rows, steps=sampler.steps, guidance=sampler.guidance,
                                     image_guidance=sampler.image_guidance, seed=seed + start))
  images = np.concatenate(images)
  rewards = np.asarray(reward(images, [str(p) for p in batch["prompt"]],
                              conditioner.sources(batch)))
  return {"reward": float(rewards.mean()), "images": images}
