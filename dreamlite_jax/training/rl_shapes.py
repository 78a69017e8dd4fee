"""RL on the shapes world (the tiny job): prompts, their conditioning and the RL figures.

Prompts come from the shapes generator (T2I captions and edit instructions with the
generator's answer), their text features from the job's text encoder, and edit sources
are VAE-encoded from the rendered source images. Flow-GRPO and DiffusionNFT score them
with the exact programmatic shapes reward (the prompt's metadata record); the stage is
scored before/after with the exact shapes evaluator (`results` turns those scores into
the `rl` figures).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import shapes
from dreamlite_jax.diffusion import flow
from dreamlite_jax.rewards import shapes_text


def draw_prompts(iteration: int, count: int, edit_fraction: float, size: int, seed: int
                 ) -> list[dict]:
  """`count` prompts of the training split: {"text", "metadata", "source" (edits) uint8,
  "target" uint8 [H, W, 3] (the generator's answer), "reward_text" (a caption of the
  wanted result: the T2I caption, or `scene_caption` of the edit's target scene)}."""
  rng = np.random.default_rng([seed, iteration])
  out = []
  for j in range(count):
    index = iteration * count + j
    if rng.random() < edit_fraction:
      kind = shapes.EDIT_TYPES[int(rng.integers(len(shapes.EDIT_TYPES)))]
      ex = shapes.make_edit_example("train", kind, seed, index, size)
      out.append({"text": ex["instruction"], "metadata": ex["metadata"], "source": ex["source"],
                  "target": ex["target"],
                  "reward_text": shapes_text.scene_caption(ex["metadata"]["target"])})
    else:
      cat = shapes.T2I_CATEGORIES[int(rng.integers(len(shapes.T2I_CATEGORIES)))]
      ex = shapes.make_t2i_example("train", cat, seed, index, size)
      out.append({"text": ex["caption"], "metadata": ex["metadata"], "source": None,
                  "target": ex["image"], "reward_text": ex["caption"]})
  return out


class Conditioner:
  """Text features, CFG negatives and condition latents of a prompt batch (fixed shapes).

  `conditioner(items, group)` -> (condition latents, cond, uncond, source images), each
  row repeated `group` times; `decode(latents)` -> uint8 images; `encode_targets(items)`
  -> the target latents (ReFL's pretraining term).
  """

  def __init__(self, models, size: int):
    self.models, self.size = models, size
    vae = models.vae
    self._encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode"))
    self._decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method="decode"))

  def __call__(self, items: list[dict], group: int):
    te, n = self.models.text_encoder, len(items)
    edit = np.array([it["source"] is not None for it in items])
    f_t, m_t = map(np.asarray, te.encode_generate([it["text"] for it in items]))
    f_e, m_e = map(np.asarray, te.encode_edit([it["text"] for it in items]))
    u_t, um_t = map(np.asarray, te.encode_generate_unconditional(n))
    u_e, um_e = map(np.asarray, te.encode_edit_unconditional(n))
    if f_t.shape != f_e.shape:
      raise ValueError(f"T2I features {f_t.shape} and edit features {f_e.shape} differ in shape; "
                       f"RL mixes both in one batch")
    pick = lambda a, b: np.where(edit.reshape((-1,) + (1,) * (a.ndim - 1)), b, a)
    sources = np.stack([it["source"] if it["source"] is not None
                        else np.zeros((self.size, self.size, 3), np.uint8) for it in items])
    latents = np.asarray(self._encode(self.models.vae_params,
                                      jnp.asarray(sources, jnp.float32) / 127.5 - 1.0))
    condition = np.where(edit[:, None, None, None], latents, 0.0).astype(np.float32)
    time_ids = flow.size_ids(n, self.size, self.size)
    rep = lambda a: np.repeat(a, group, axis=0)
    cond = {"text": rep(pick(f_t, f_e)).astype(np.float32),
            "text_mask": rep(pick(m_t, m_e)).astype(np.int32), "time_ids": rep(time_ids)}
    uncond = {"text": rep(pick(u_t, u_e)).astype(np.float32),
              "text_mask": rep(pick(um_t, um_e)).astype(np.int32), "time_ids": rep(time_ids)}
    return rep(condition), cond, uncond, rep(sources)

  def decode(self, latents) -> np.ndarray:
    images = np.asarray(self._decode(self.models.vae_params, jnp.asarray(latents)))
    return np.round(np.clip((images + 1.0) / 2.0, 0, 1) * 255).astype(np.uint8)

  def encode_targets(self, items: list[dict]) -> np.ndarray:
    targets = np.stack([it["target"] for it in items])
    return np.asarray(self._encode(self.models.vae_params,
                                   jnp.asarray(targets, jnp.float32) / 127.5 - 1.0))


def _summary(scores: dict) -> dict[str, float]:
  t2i, edit = scores["t2i"], scores["edit"]
  return {"t2i": t2i.get("overall", 0.0), "t2i_heldout": t2i.get("heldout_overall", 0.0),
          "edit": edit.get("accuracy", 0.0), "edit_heldout": edit.get("heldout_accuracy", 0.0)}


def results(before: dict, after: dict) -> dict[str, float]:
  """The evaluator's scores before/after RL (held-in and held-out, T2I and edit)."""
  before_s, after_s = _summary(before), _summary(after)
  return {"before": before_s["t2i"], "after": after_s["t2i"],
          "heldout_before": before_s["t2i_heldout"], "heldout_after": after_s["t2i_heldout"],
          "edit_before": before_s["edit"], "edit_after": after_s["edit"],
          "edit_heldout_before": before_s["edit_heldout"],
          "edit_heldout_after": after_s["edit_heldout"]}
