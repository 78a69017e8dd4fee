"""Qwen3-VL vision tower in Flax: how edit prompts see the source image.

Port of transformers' `Qwen3VLVisionModel`: a ViT over 16x16 patches (the
checkpoint's Conv3d over 2 duplicated frames becomes one linear layer on the
processor's patch layout), a learned position table bilinearly resampled to the
image grid, 2-D axial RoPE, a 2x2 patch merger into the LLM width, and
"deepstack" mergers tapping early ViT layers whose outputs are added to the
hidden states of the first LLM layers.

Images of one batch share a static size, so attention runs per image over the
batch axis (the packed `cu_seqlens` of transformers are not needed). This path is
not converted to TFLite; the text-only path is.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dreamlite_jax.models.layers import Dense, LayerNorm

Dtype = Any
EMBED, HEADS, MLP = "embed", "heads", "mlp"


@dataclasses.dataclass(frozen=True)
class Qwen3VisionConfig:
  """Sizes of the Qwen3-VL vision tower (transformers' `Qwen3VLVisionConfig`)."""
  depth: int = 24
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 16
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  out_hidden_size: int = 2048
  num_position_embeddings: int = 2304
  deepstack_indexes: tuple[int, ...] = (5, 11, 17)
  rope_theta: float = 10000.0
  hidden_act: str = "gelu_pytorch_tanh"

  def __post_init__(self):
    if self.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
      raise ValueError(f"Qwen3VisionConfig: hidden_act {self.hidden_act!r} not supported")
    side = int(round(self.num_position_embeddings ** 0.5))
    if side * side != self.num_position_embeddings:
      raise ValueError(f"Qwen3VisionConfig: num_position_embeddings={self.num_position_embeddings} "
                       "is not a square")
    if any(i >= self.depth for i in self.deepstack_indexes):
      raise ValueError(f"Qwen3VisionConfig: deepstack_indexes {self.deepstack_indexes} exceed depth {self.depth}")

  @property
  def patch_dim(self) -> int:
    return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

  @property
  def image_factor(self) -> int:
    """Image sides must be multiples of this (patch * merge)."""
    return self.patch_size * self.spatial_merge_size

  def num_image_tokens(self, height: int, width: int) -> int:
    """LLM tokens for one `height x width` image (after the 2x2 merge)."""
    f = self.image_factor
    return (height // f) * (width // f)

  @classmethod
  def qwen3_vl_2b(cls) -> "Qwen3VisionConfig":
    return cls()

  @classmethod
  def tiny(cls, out_hidden_size: int = 64) -> "Qwen3VisionConfig":
    return cls(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=out_hidden_size,
               num_position_embeddings=64, deepstack_indexes=(0, 1))

  @classmethod
  def from_hf_config(cls, cfg: Mapping[str, Any]) -> "Qwen3VisionConfig":
    """Reads a transformers config dict: the full Qwen3-VL one (with `vision_config`) or the vision one."""
    cfg = dict(cfg.get("vision_config", cfg))
    def get(key):
      if key not in cfg:
        raise ValueError(f"Qwen3-VL vision config: missing field {key!r}")
      return cfg[key]
    rope = cfg.get("rope_parameters") or {}
    return cls(
        depth=get("depth"), hidden_size=get("hidden_size"), intermediate_size=get("intermediate_size"),
        num_heads=get("num_heads"), in_channels=cfg.get("in_channels", 3), patch_size=get("patch_size"),
        temporal_patch_size=cfg.get("temporal_patch_size", 2),
        spatial_merge_size=cfg.get("spatial_merge_size", 2), out_hidden_size=get("out_hidden_size"),
        num_position_embeddings=get("num_position_embeddings"),
        deepstack_indexes=tuple(get("deepstack_visual_indexes")),
        rope_theta=float(rope.get("rope_theta", 10000.0)), hidden_act=cfg.get("hidden_act", "gelu_pytorch_tanh"))


def _check_image_size(config: Qwen3VisionConfig, height: int, width: int):
  f = config.image_factor
  if height % f or width % f or height <= 0 or width <= 0:
    raise ValueError(f"vision tower: image size {height}x{width} must be positive multiples of {f}")


def patchify(images, config: Qwen3VisionConfig):
  """Images `[B, H, W, C]` in [-1, 1] -> patches `[B, N, C*T*P*P]` in the processor's layout.

  Matches transformers' Qwen2-VL image processor after its mean/std = 0.5
  normalisation: patches in 2x2 merge-block order, each flattened as (C, T, P, P)
  with the single frame repeated T times.
  """
  b, h, w, c = images.shape
  _check_image_size(config, h, w)
  p, m, t = config.patch_size, config.spatial_merge_size, config.temporal_patch_size
  x = images.reshape(b, h // (p * m), m, p, w // (p * m), m, p, c)
  x = x.transpose(0, 1, 4, 2, 5, 7, 3, 6)                    # [B, gh/m, gw/m, m, m, C, P, P]
  x = x.reshape(b, -1, c, 1, p, p)
  x = jnp.concatenate([x] * t, axis=3)                        # [B, N, C, T, P, P]
  return x.reshape(b, x.shape[1], -1)


def merge_block_grid(gh: int, gw: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
  """(row, col) of every patch `[N]` listed in merge-block order."""
  rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
  shape = (gh // merge, merge, gw // merge, merge)
  return (rows.reshape(shape).transpose(0, 2, 1, 3).reshape(-1),
          cols.reshape(shape).transpose(0, 2, 1, 3).reshape(-1))


def position_interpolation(gh: int, gw: int, config: Qwen3VisionConfig) -> tuple[np.ndarray, np.ndarray]:
  """Bilinear (align_corners) taps into the square position table: indices, weights `[N, 4]`."""
  side = int(round(config.num_position_embeddings ** 0.5))
  rows, cols = merge_block_grid(gh, gw, config.spatial_merge_size)
  def taps(index, size):
    src = index.astype(np.float64) * (side - 1) / max(size - 1, 1)
    lo = np.floor(src)
    offsets = np.arange(2)
    idx = np.clip(lo[:, None].astype(np.int64) + offsets, 0, side - 1)
    wts = np.clip(1.0 - np.abs(src[:, None] - lo[:, None] - offsets), 0.0, None)
    return idx, wts
  hi, hw_ = taps(rows, gh)
  wi, ww = taps(cols, gw)
  indices = (hi[:, :, None] * side + wi[:, None, :]).reshape(-1, 4)
  weights = (hw_[:, :, None] * ww[:, None, :]).reshape(-1, 4).astype(np.float32)
  return indices.astype(np.int32), weights


def vision_rope(gh: int, gw: int, config: Qwen3VisionConfig) -> tuple[np.ndarray, np.ndarray]:
  """2-D axial RoPE tables (cos, sin) `[1, N, 1, head_dim]` for a `gh x gw` patch grid."""
  head_dim = config.hidden_size // config.num_heads
  spatial = head_dim // 2
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, spatial, 2, dtype=np.float64) / spatial))
  rows, cols = merge_block_grid(gh, gw, config.spatial_merge_size)
  freqs = np.concatenate([rows[:, None] * inv_freq, cols[:, None] * inv_freq], axis=-1)
  freqs = np.concatenate([freqs, freqs], axis=-1)[None, :, None, :].astype(np.float32)
  return np.cos(freqs), np.sin(freqs)


def _rotate_half(x):
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


class VisionBlock(nn.Module):
  """Pre-LN ViT block with axial RoPE: `h += attn(LN(h))`, `h += mlp(LN(h))`."""
  config: Qwen3VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cos, sin):
    """x `[B, N, C]`, cos/sin `[1, N, 1, d]` -> `[B, N, C]`."""
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, n, c = x.shape
    heads, d = cfg.num_heads, c // cfg.num_heads
    h = LayerNorm(1e-6, name="norm1", **kw)(x)
    qkv = Dense(3 * c, axes=(EMBED, HEADS), name="qkv", **kw)(h)
    q, k, v = (qkv[..., i * c:(i + 1) * c].reshape(b, n, heads, d) for i in range(3))
    q, k = (t.astype(jnp.float32) for t in (q, k))
    q = (q * cos + _rotate_half(q) * sin).astype(self.dtype) * (d ** -0.5)
    k = (k * cos + _rotate_half(k) * sin).astype(self.dtype)
    scores = jnp.matmul(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 3, 1))      # [B, heads, N, N]
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
    out = jnp.matmul(probs, v.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3).reshape(b, n, c)
    x = x + Dense(c, axes=(HEADS, EMBED), name="proj", **kw)(out)
    h = LayerNorm(1e-6, name="norm2", **kw)(x)
    h = Dense(cfg.intermediate_size, axes=(EMBED, MLP), name="linear_fc1", **kw)(h)
    h = jax.nn.gelu(h, approximate=cfg.hidden_act == "gelu_pytorch_tanh")
    return x + Dense(c, axes=(MLP, EMBED), name="linear_fc2", **kw)(h)


class PatchMerger(nn.Module):
  """2x2 merge: `[B, N, C]` -> `[B, N/4, out]` (LayerNorm before or after the shuffle)."""
  config: Qwen3VisionConfig
  postshuffle_norm: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, n, c = x.shape
    unit = cfg.spatial_merge_size ** 2
    if not self.postshuffle_norm:
      x = LayerNorm(1e-6, name="norm", **kw)(x)
    x = x.reshape(b, n // unit, unit * c)
    if self.postshuffle_norm:
      x = LayerNorm(1e-6, name="norm", **kw)(x)
    x = Dense(unit * c, axes=(EMBED, MLP), name="linear_fc1", **kw)(x)
    x = jax.nn.gelu(x, approximate=False)
    return Dense(cfg.out_hidden_size, axes=(MLP, EMBED), name="linear_fc2", **kw)(x)


class Qwen3VisionModel(nn.Module):
  """Vision tower: patches -> merged image tokens plus deepstack features."""
  config: Qwen3VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, patches, grid_hw: tuple[int, int]):
    """Encodes images of one static size.

    Args:
      patches: `[B, N, C*T*P*P]` from `patchify`, N = gh * gw.
      grid_hw: (gh, gw), the patch grid (image size / patch size).
    Returns:
      (tokens `[B, N/4, out_hidden]`, deepstack `[K, B, N/4, out_hidden]`).
    """
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gh, gw = grid_hw
    if patches.shape[1] != gh * gw or patches.shape[2] != cfg.patch_dim:
      raise ValueError(f"vision tower: patches {patches.shape} do not match grid {grid_hw} "
                       f"and patch dim {cfg.patch_dim}")
    x = Dense(cfg.hidden_size, axes=(MLP, EMBED), name="patch_embed", **kw)(patches)
    table = self.param("pos_embed",
                       nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, EMBED)),
                       (cfg.num_position_embeddings, cfg.hidden_size), self.param_dtype)
    idx, wts = position_interpolation(gh, gw, cfg)
    pos = jnp.sum(jnp.take(table, idx, axis=0).astype(jnp.float32) * wts[:, :, None], axis=1)
    x = x + pos.astype(self.dtype)[None]
    cos, sin = vision_rope(gh, gw, cfg)
    deepstack = []
    for i in range(cfg.depth):
      x = VisionBlock(cfg, name=f"blocks_{i}", **kw)(x, cos, sin)
      if i in cfg.deepstack_indexes:
        j = cfg.deepstack_indexes.index(i)
        deepstack.append(PatchMerger(cfg, postshuffle_norm=True, name=f"deepstack_merger_{j}", **kw)(x))
    tokens = PatchMerger(cfg, postshuffle_norm=False, name="merger", **kw)(x)
    return tokens, jnp.stack(deepstack) if deepstack else jnp.zeros((0, *tokens.shape), tokens.dtype)
