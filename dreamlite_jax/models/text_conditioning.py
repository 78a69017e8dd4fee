"""Prompts (and edit source images) -> the U-Net's text conditioning.

`TextEncoder` is what the pipeline, the trainer and the embedding cache call: it
applies DreamLite's chat templates, runs Qwen3-VL at a static length (one
compilation per length and image size), drops the template prefix, and returns
`features [B, L, hidden]` float32 with `mask [B, L]` int32 (1 = real token,
features zeroed elsewhere, as the reference pipeline pads with zeros).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from dreamlite_jax.models import prompts
from dreamlite_jax.models.qwen3_vl import Qwen3VLConfig, Qwen3VLEncoder, mrope_position_ids
from dreamlite_jax.models.text_weights import init_params, load_qwen3_vl
from dreamlite_jax.models.tokenizer import Tokenizer, load_tokenizer
from dreamlite_jax.models.vision_encoder import patchify


def _features(hidden, mask, drop: int):
  kept = hidden[:, drop:].astype(jnp.float32)
  keep = mask[:, drop:]
  return kept * keep[:, :, None].astype(jnp.float32), keep


def _encode_text(model: Qwen3VLEncoder, drop: int, params, ids, mask):
  return _features(model.apply({"params": params}, ids, mask), mask, drop)


def _encode_image_text(model: Qwen3VLEncoder, drop: int, size: tuple[int, int], params, ids, mask,
                       images, position_ids):
  vision = model.config.vision
  b = images.shape[0]
  if images.shape[1:3] != size:
    images = jax.image.resize(images.astype(jnp.float32), (b, *size, 3), method="lanczos3")
  patches = patchify(jnp.clip(images.astype(jnp.float32), -1.0, 1.0), vision)
  grid = (size[0] // vision.patch_size, size[1] // vision.patch_size)
  hidden = model.apply({"params": params}, ids, mask, patches, grid, position_ids)
  return _features(hidden, mask, drop)


class TextEncoder:
  """Frozen Qwen3-VL text conditioning with DreamLite's templates.

  Args:
    config: the encoder config (`vision=None` for text-only conditioning).
    params: `Qwen3VLEncoder` params (from `load_qwen3_vl` or `init_params`).
    tokenizer: defaults to the offline Qwen tokenizer.
    text_length: static feature length of generate prompts (128 for the phone U-Net).
    edit_text_length: static feature length of edit prompts (default `text_length`);
      must hold the image tokens of `edit_image_size` when the vision tower is on.
    edit_image_size: (height, width) the source image is resized to (256 mobile, 512 base).
    dtype: compute dtype of the LLM.
  """

  def __init__(self, config: Qwen3VLConfig, params: Any, tokenizer: Tokenizer | None = None,
               text_length: int = 128, edit_text_length: int | None = None,
               edit_image_size: tuple[int, int] = (256, 256), dtype: Any = jnp.float32):
    self.config = config
    self.params = params
    self.tokenizer = tokenizer or load_tokenizer()
    self.text_length = text_length
    self.edit_text_length = edit_text_length or text_length
    self.edit_image_size = tuple(edit_image_size)
    self.model = Qwen3VLEncoder(config, dtype=dtype)
    if config.vision is not None:
      f = config.vision.image_factor
      if self.edit_image_size[0] % f or self.edit_image_size[1] % f:
        raise ValueError(f"TextEncoder: edit_image_size {self.edit_image_size} must be multiples of {f}")
    self._text_fn = jax.jit(functools.partial(_encode_text, self.model), static_argnums=0)
    self._image_fn = jax.jit(functools.partial(_encode_image_text, self.model), static_argnums=(0, 1))

  @classmethod
  def from_pretrained(cls, directory: str, use_vision: bool = True, final_norm: bool = True,
                      param_dtype: Any = jnp.float32, mesh: jax.sharding.Mesh | None = None,
                      **kwargs) -> "TextEncoder":
    """Loads a local Qwen3-VL checkpoint directory (and its tokenizer.json when present)."""
    config, params = load_qwen3_vl(directory, use_vision=use_vision, final_norm=final_norm,
                                   dtype=param_dtype, mesh=mesh)
    if "tokenizer" not in kwargs and os.path.exists(os.path.join(directory, "tokenizer.json")):
      kwargs["tokenizer"] = load_tokenizer(directory)
    return cls(config, params, **kwargs)

  @classmethod
  def random(cls, config: Qwen3VLConfig, seed: int = 0, **kwargs) -> "TextEncoder":
    """A randomly initialised encoder (the tiny CPU default has no pretrained LLM)."""
    return cls(config, init_params(config, seed), **kwargs)

  @property
  def num_image_tokens(self) -> int:
    return self.config.vision.num_image_tokens(*self.edit_image_size)

  def encode_batch(self, batch: prompts.PromptBatch, images=None):
    """Runs a tokenized batch; images `[B, H, W, 3]` in [-1, 1] when the ids hold an image slot.

    Returns (features `[B, L, hidden]` float32, mask `[B, L]` int32).
    """
    ids, mask = jnp.asarray(batch.ids), jnp.asarray(batch.mask)
    if images is None:
      return self._text_fn(batch.drop, self.params, ids, mask)
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] != batch.ids.shape[0]:
      raise ValueError(f"TextEncoder: images must be [B={batch.ids.shape[0]}, H, W, 3], got {images.shape}")
    f = self.config.vision.image_factor
    grid = (self.edit_image_size[0] // f, self.edit_image_size[1] // f)
    positions = mrope_position_ids(batch.ids, batch.mask, self.config.image_token_id, grid)
    return self._image_fn(batch.drop, self.edit_image_size, self.params, ids, mask, images,
                          jnp.asarray(positions))

  def encode_generate(self, prompts_: Sequence[str]):
    """Text-to-image prompts -> (features `[B, text_length, hidden]`, mask `[B, text_length]`)."""
    return self.encode_batch(prompts.tokenize_generate(self.tokenizer, list(prompts_), self.text_length))

  def encode_generate_unconditional(self, batch_size: int):
    """The empty prompt, `batch_size` times (the CFG negative)."""
    batch = prompts.tokenize_generate(self.tokenizer, [""] * batch_size, self.text_length, unconditional=True)
    return self.encode_batch(batch)

  def encode_edit(self, instructions: Sequence[str], images=None):
    """Edit instructions (+ source images `[B, H, W, 3]` in [-1, 1]) -> (features, mask) `[B, edit_text_length]`.

    Without images (or with the vision tower off) the template has no image slot.
    """
    return self._edit(list(instructions), images, unconditional=False)

  def encode_edit_unconditional(self, batch_size: int, images=None):
    """Empty edit instruction (with the source images, as the reference's image-only branch)."""
    return self._edit([""] * batch_size, images, unconditional=True)

  def _edit(self, instructions, images, unconditional):
    if images is not None and self.config.vision is None:
      raise ValueError("TextEncoder: source images given but the vision tower is off (config.vision=None)")
    n_image = self.num_image_tokens if images is not None else None
    batch = prompts.tokenize_edit(self.tokenizer, instructions, self.edit_text_length, n_image, unconditional)
    return self.encode_batch(batch, images)
