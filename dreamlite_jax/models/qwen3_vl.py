"""Qwen3-VL as DreamLite uses it: language stack plus (optionally) the vision tower.

Edit prompts carry the source image: its merged vision tokens replace the
`<|image_pad|>` embeddings, its deepstack features are added after the first
decoder layers, and positions become 3-D (interleaved M-RoPE). With
`vision=None` the module is the text-only encoder.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from dreamlite_jax.models.text_encoder import Qwen3TextConfig, Qwen3TextModel
from dreamlite_jax.models.vision_encoder import Qwen3VisionConfig, Qwen3VisionModel

Dtype = Any
IMAGE_TOKEN_ID = 151655
VISION_START_TOKEN_ID = 151652


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig:
  """Text config, vision config (None turns the vision tower off) and image token ids.

  `final_norm=True` returns the hidden states after the LLM's final RMSNorm: that is
  what the reference pipeline's `hidden_states[-1]` holds in transformers.
  `False` returns the last decoder layer's raw output.
  """
  text: Qwen3TextConfig = Qwen3TextConfig()
  vision: Qwen3VisionConfig | None = Qwen3VisionConfig()
  final_norm: bool = True
  image_token_id: int = IMAGE_TOKEN_ID
  vision_start_token_id: int = VISION_START_TOKEN_ID

  def __post_init__(self):
    if self.vision is not None and self.vision.out_hidden_size != self.text.hidden_size:
      raise ValueError(f"Qwen3VLConfig: vision out_hidden_size {self.vision.out_hidden_size} != "
                       f"text hidden_size {self.text.hidden_size}")

  @classmethod
  def qwen3_vl_2b(cls, use_vision: bool = True, final_norm: bool = True) -> "Qwen3VLConfig":
    return cls(Qwen3TextConfig.qwen3_vl_2b(), Qwen3VisionConfig.qwen3_vl_2b() if use_vision else None,
               final_norm=final_norm)

  @classmethod
  def tiny(cls, use_vision: bool = False, final_norm: bool = True) -> "Qwen3VLConfig":
    text = Qwen3TextConfig.tiny()
    return cls(text, Qwen3VisionConfig.tiny(text.hidden_size) if use_vision else None, final_norm=final_norm)

  @classmethod
  def from_hf_config(cls, cfg: Mapping[str, Any], use_vision: bool = True,
                     final_norm: bool = True) -> "Qwen3VLConfig":
    """From a checkpoint's config.json dict (full Qwen3-VL, or text-only when `use_vision=False`)."""
    if use_vision and "vision_config" not in cfg:
      raise ValueError("Qwen3-VL config: 'vision_config' missing; pass use_vision=False for a text-only model")
    return cls(Qwen3TextConfig.from_hf_config(cfg),
               Qwen3VisionConfig.from_hf_config(cfg) if use_vision else None,
               image_token_id=cfg.get("image_token_id", IMAGE_TOKEN_ID),
               final_norm=final_norm,
               vision_start_token_id=cfg.get("vision_start_token_id", VISION_START_TOKEN_ID))


def mrope_position_ids(ids: np.ndarray, mask: np.ndarray, image_token_id: int,
                       merged_grid_hw: tuple[int, int] | None) -> np.ndarray:
  """3-D positions `[3, B, L]` int32 for right-padded ids `[B, L]` (host-side, static).

  Text tokens advance all three axes together; one block of image tokens at
  `start` gets (t, h, w) = (start, start + row, start + col) over the merged grid,
  and text resumes at `start + max(rows, cols)`. Padding positions are 0, as in
  transformers' `get_rope_index`.
  """
  ids, mask = np.asarray(ids), np.asarray(mask).astype(bool)
  b, n = ids.shape
  out = np.zeros((3, b, n), np.int32)
  for row in range(b):
    real = ids[row][mask[row]]
    is_image = real == image_token_id
    pos, i, cols = 0, 0, []
    while i < len(real):
      if not is_image[i]:
        cols.append(np.full(3, pos))
        pos, i = pos + 1, i + 1
        continue
      if merged_grid_hw is None:
        raise ValueError("mrope_position_ids: image tokens present but no image grid given")
      gh, gw = merged_grid_hw
      if i + gh * gw > len(real) or not is_image[i:i + gh * gw].all():
        raise ValueError(f"mrope_position_ids: row {row} has a block of image tokens that is not "
                         f"{gh}x{gw} = {gh * gw} long")
      hh, ww = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
      cols.extend(np.stack([np.full(gh * gw, pos), pos + hh.reshape(-1), pos + ww.reshape(-1)], 1))
      pos, i = pos + max(gh, gw), i + gh * gw
    if cols:
      out[:, row, mask[row]] = np.stack(cols, 1)
  return out


class Qwen3VLEncoder(nn.Module):
  """Hidden states of the LLM (see `Qwen3VLConfig.final_norm`) for text or image+text prompts."""
  config: Qwen3VLConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.language_model = Qwen3TextModel(self.config.text, final_norm=self.config.final_norm, **kw)
    if self.config.vision is not None:
      self.visual = Qwen3VisionModel(self.config.vision, **kw)

  def embed(self, ids):
    """ids `[B, L]` -> token embeddings `[B, L, hidden]`."""
    return self.language_model.embed(ids)

  def forward_embeddings(self, embeds, mask):
    """Text-only forward from embeddings `[B, L, hidden]`, mask `[B, L]` -> `[B, L, hidden]`."""
    return self.language_model.forward_embeddings(embeds, mask)

  def __call__(self, ids, mask, patches=None, grid_hw: tuple[int, int] | None = None, position_ids=None):
    """Encodes a prompt batch.

    Args:
      ids: `[B, L]` int32 token ids; each row holds exactly N/4 image tokens when
        `patches` is given.
      mask: `[B, L]` 1 on real tokens.
      patches: optional `[B, N, C*T*P*P]` (see `vision_encoder.patchify`), one image per row.
      grid_hw: the static patch grid (gh, gw) of those images.
      position_ids: `[3, B, L]` from `mrope_position_ids` (required with patches).
    Returns:
      `[B, L, hidden]` hidden states (after the final norm iff `config.final_norm`).
    """
    embeds = self.embed(ids)
    if patches is None:
      return self.language_model.forward_embeddings(embeds, mask)
    if self.config.vision is None:
      raise ValueError("Qwen3VLEncoder: image patches given but the vision tower is off (vision=None)")
    if grid_hw is None or position_ids is None:
      raise ValueError("Qwen3VLEncoder: image input needs grid_hw and position_ids")
    tokens, deepstack = self.visual(patches, grid_hw)                   # [B, M, D], [K, B, M, D]
    is_image = ids == self.config.image_token_id
    # The k-th image token of a row takes the k-th merged vision token of that row's image.
    slot = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, tokens.shape[1] - 1)
    take = lambda feats: jnp.take_along_axis(feats, slot[:, :, None], axis=1)
    embeds = jnp.where(is_image[:, :, None], take(tokens).astype(embeds.dtype), embeds)
    deepstack = jnp.stack([jnp.where(is_image[:, :, None], take(f), 0.0) for f in deepstack]) \
        if deepstack.shape[0] else None
    return self.language_model.forward_embeddings(embeds, mask, position_ids, deepstack)
