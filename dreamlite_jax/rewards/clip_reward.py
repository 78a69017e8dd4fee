"""CLIP image-text similarity as a (differentiable) reward.

Images in [-1, 1] are resized to the vision tower's input size and normalised
with CLIP's mean and std inside jax, so ReFL can differentiate through the
preprocessing. The reward of an (image, prompt) pair is the cosine similarity of
their CLIP embeddings (in [-1, 1]); for edits the prompt should describe the
wanted result. Text goes through the checkpoint's own BPE tokenizer, read from
the same local directory (`vocab.json` + `merges.txt`) with transformers'
`CLIPTokenizer`, or through any `tokenize(prompts) -> (ids, mask)` callable.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dreamlite_jax.rewards import clip_model
from dreamlite_jax.rewards import clip_weights
from dreamlite_jax.rewards import image_text

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Tokenize = Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]


def preprocess(images: jax.Array, size: int) -> jax.Array:
  """[B, H, W, 3] in [-1, 1] -> CLIP pixels [B, size, size, 3] (bicubic, normalised)."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"CLIP reward images must be [B, H, W, 3], got {images.shape}")
  x = (images.astype(jnp.float32) + 1.0) / 2.0
  if x.shape[1:3] != (size, size):
    x = jax.image.resize(x, (x.shape[0], size, size, 3), "cubic")
  return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def hf_tokenizer(directory: str, max_length: int) -> Tokenize:
  """transformers' CLIPTokenizer from local `vocab.json` + `merges.txt`, padded to max_length."""
  for name in ("vocab.json", "merges.txt"):
    if not os.path.isfile(os.path.join(directory, name)):
      raise FileNotFoundError(f"{directory}: no {name} for the CLIP tokenizer")
  from transformers import CLIPTokenizer
  tok = CLIPTokenizer(os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"))

  def tokenize(prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    enc = tok(list(prompts), padding="max_length", truncation=True, max_length=max_length,
              return_tensors="np")
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)

  return tokenize


class ClipReward(image_text.ImageTextReward):
  """`reward(images, prompts, source_images=None) -> [B]` cosine similarities.

  `differentiable(images, ids, mask)` is the jax function ReFL uses.
  """
  def __init__(self, config: clip_model.CLIPConfig, params: Any, tokenize: Tokenize):
    self.config, self.params, self.tokenize = config, params, tokenize
    self.model = clip_model.CLIP(config)

  @classmethod
  def from_pretrained(cls, directory: str) -> "ClipReward":
    config, params = clip_weights.load_clip(directory)
    return cls(config, params, hf_tokenizer(directory, config.text.max_position_embeddings))

  def differentiable(self, images: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Cosine similarity [B] of images [B, H, W, 3] in [-1, 1] with token ids [B, L]."""
    pixels = preprocess(images, self.config.vision.image_size)
    variables = {"params": self.params}
    img = self.model.apply(variables, pixels, method=clip_model.CLIP.image_features)
    txt = self.model.apply(variables, ids, mask, method=clip_model.CLIP.text_features)
    img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
    txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
    return jnp.sum(img * txt, axis=-1)
