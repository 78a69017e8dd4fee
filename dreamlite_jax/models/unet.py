"""The DreamLite mobile U-Net: one denoiser for text-to-image and editing.

Input is the packed canvas `[B, H, 2W, 4]` (NHWC): noisy target on the left,
condition latent (zeros for T2I, the source latent for edits) on the right. The
network predicts a velocity on the whole canvas; callers use the left half.

The structure mirrors diffusers' `DreamLiteUNetModel` (its parameter count and
numerics are tested against it); submodule names follow its state-dict names
with `.` list indices written `_i`, so `models/weights.py` maps names 1:1.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from dreamlite_jax import config as config_lib
from dreamlite_jax.models import layers

# Block kinds per level. "cross" = cross-attention only transformer blocks (the
# stream is replaced by LN1(h)), "full" = self + cross, "none" = no transformer.
DOWN_KINDS = ("cross", "full", "none")
UP_KINDS = ("full", "cross", "none")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Hyper-parameters of the DreamLite U-Net (defaults: the released 0.39B model)."""
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: tuple[int, ...] = (256, 512, 896)
  down_kinds: tuple[str, ...] = ("cross", "cross", "full")
  up_kinds: tuple[str, ...] = ("full", "cross", "none")
  layers_per_block: int = 2
  transformer_depth: tuple[int, ...] = (1, 2, 4)   # per down level; up path reversed
  mid_transformer_depth: int = 4
  heads: tuple[int, ...] = (4, 8, 14)               # head counts per level; head size 64
  head_dim: int = 64
  kv_heads: int | None = 1                          # 1 = multi-query attention; None = MHA
  qk_norm: bool = True
  ff_mult: float = 3.0
  separable_resblocks: bool = True
  norm_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int = 2304
  encoder_hid_dim: int = 2048                       # text-encoder hidden size
  time_embed_dim: int = 1024
  addition_time_embed_dim: int = 256
  dtype: str = "float32"                            # compute dtype
  param_dtype: str = "float32"
  remat: bool = False                               # rematerialise each level in backward

  def __post_init__(self):
    n = len(self.block_out_channels)
    for field in ("down_kinds", "up_kinds", "transformer_depth", "heads"):
      if len(getattr(self, field)) != n:
        raise ValueError(f"UNetConfig.{field} needs {n} entries (one per level), "
                         f"got {getattr(self, field)!r}")
    for field in ("down_kinds", "up_kinds"):
      for kind in getattr(self, field):
        if kind not in ("cross", "full", "none"):
          raise ValueError(f"UNetConfig.{field}: unknown block kind {kind!r}")
    for level, (c, h) in enumerate(zip(self.block_out_channels, self.heads)):
      if h * self.head_dim != c:
        raise ValueError(f"UNetConfig: level {level} has {c} channels but heads*head_dim = "
                         f"{h}*{self.head_dim}; the transformer width must equal the channels")
      if c % self.norm_groups:
        raise ValueError(f"UNetConfig.block_out_channels: {c} not divisible by norm_groups={self.norm_groups}")

  @classmethod
  def paper(cls) -> "UNetConfig":
    """The released DreamLite U-Net (389,968,388 parameters)."""
    return cls()

  @classmethod
  def tiny(cls, encoder_hid_dim: int = 64) -> "UNetConfig":
    """A CPU-sized U-Net with every DreamLite feature on (MQA, qk-norm, separable blocks)."""
    return cls(block_out_channels=(32, 64, 64), transformer_depth=(1, 1, 1), mid_transformer_depth=1,
               heads=(1, 2, 2), head_dim=32, norm_groups=8, cross_attention_dim=64,
               encoder_hid_dim=encoder_hid_dim, time_embed_dim=128, addition_time_embed_dim=32)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_dict(cls, d) -> "UNetConfig":
    """Builds a config from a dict / ConfigDict, converting lists to tuples."""
    return config_lib.dataclass_from_dict(cls, d)


class DreamLiteUNet(nn.Module):
  """`(sample [B,H,2W,4], timestep [B], text [B,L,D], text_mask [B,L], time_ids [B,2]) -> [B,H,2W,4]`."""
  config: UNetConfig

  def _kw(self):
    return dict(dtype=layers.DTYPES[self.config.dtype], param_dtype=layers.DTYPES[self.config.param_dtype])

  def _embed_time(self, timestep, time_ids):
    c = self.config
    temb = layers.timestep_embedding(timestep, c.block_out_channels[0])
    temb = layers.MLPEmbedding(c.time_embed_dim, name="time_embedding", **self._kw())(temb)
    b = time_ids.shape[0]
    size_emb = layers.timestep_embedding(time_ids.reshape(-1), c.addition_time_embed_dim)
    size_emb = size_emb.reshape(b, 2 * c.addition_time_embed_dim)
    return temb + layers.MLPEmbedding(c.time_embed_dim, name="add_embedding", **self._kw())(size_emb)

  @nn.compact
  def __call__(self, sample, timestep, text, text_mask, time_ids):
    c = self.config
    kw = self._kw()
    b, h, w, _ = sample.shape
    f = c.downsample_factor
    if h % f or w % f:
      raise ValueError(f"canvas {h}x{w} must be divisible by {f} (the U-Net's downsampling)")
    timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,))
    temb = self._embed_time(timestep, time_ids)
    context = layers.Dense(c.cross_attention_dim, name="encoder_hid_proj", **kw)(text)
    context = layers.RMSNorm(1e-5, name="encoder_hid_norm", **kw)(context)
    bias = layers.attention_bias_from_mask(text_mask, kw["dtype"])

    x = layers.Conv(c.block_out_channels[0], 3, name="conv_in", **kw)(sample.astype(kw["dtype"]))
    skips = [x]
    levels = len(c.block_out_channels)
    for lvl in range(levels):
      x = self._down_level(lvl, x, temb, context, bias, skips)
    x = MidBlock(c, name="mid_block")(x, temb, context, bias)
    for lvl in range(levels):
      x = self._up_level(lvl, x, temb, context, bias, skips)
    x = nn.silu(layers.GroupNorm(c.norm_groups, c.norm_eps, name="conv_norm_out", **kw)(x))
    return layers.Conv(c.out_channels, 3, name="conv_out", **kw)(x).astype(jnp.float32)

  def _down_level(self, lvl, x, temb, context, bias, skips):
    block = _maybe_remat(DownBlock, self.config.remat)
    x, new_skips = block(self.config, lvl, name=f"down_blocks_{lvl}")(x, temb, context, bias)
    skips.extend(new_skips)
    return x

  def _up_level(self, lvl, x, temb, context, bias, skips):
    n = self.config.layers_per_block + 1
    level_skips = tuple(skips[-n:])
    del skips[-n:]
    block = _maybe_remat(UpBlock, self.config.remat)
    return block(self.config, lvl, name=f"up_blocks_{lvl}")(x, level_skips, temb, context, bias)


def _maybe_remat(cls, remat: bool):
  return nn.remat(cls) if remat else cls


class _Level(nn.Module):
  """Shared helpers for one resolution level."""
  config: UNetConfig
  level: int

  def kw(self):
    return dict(dtype=layers.DTYPES[self.config.dtype], param_dtype=layers.DTYPES[self.config.param_dtype])

  def resblock(self, features, name):
    c = self.config
    return layers.ResBlock(features, c.separable_resblocks, c.norm_groups, c.norm_eps, name=name, **self.kw())

  def transformer(self, level, depth, kind, name):
    c = self.config
    return layers.SpatialTransformer(
        c.heads[level], depth, c.head_dim, c.kv_heads, kind == "full", c.ff_mult, c.norm_groups,
        name=name, **self.kw())


class DownBlock(_Level):
  """`layers_per_block` x [ResBlock, transformer?], then a stride-2 conv (not on the last level)."""

  @nn.compact
  def __call__(self, x, temb, context, bias):
    c, lvl = self.config, self.level
    kind = c.down_kinds[lvl]
    features = c.block_out_channels[lvl]
    skips = []
    for i in range(c.layers_per_block):
      x = self.resblock(features, f"resnets_{i}")(x, temb)
      if kind != "none":
        x = self.transformer(lvl, c.transformer_depth[lvl], kind, f"attentions_{i}")(x, context, bias)
      skips.append(x)
    if lvl < len(c.block_out_channels) - 1:
      x = layers.Downsample(features, name="downsamplers_0", **self.kw())(x)
      skips.append(x)
    return x, tuple(skips)


class MidBlock(nn.Module):
  """ResBlock, self+cross transformer, ResBlock at the lowest resolution."""
  config: UNetConfig

  @nn.compact
  def __call__(self, x, temb, context, bias):
    c = self.config
    kw = dict(dtype=layers.DTYPES[c.dtype], param_dtype=layers.DTYPES[c.param_dtype])
    features = c.block_out_channels[-1]
    res = lambda name: layers.ResBlock(features, c.separable_resblocks, c.norm_groups, c.norm_eps,
                                       name=name, **kw)
    x = res("resnets_0")(x, temb)
    x = layers.SpatialTransformer(c.heads[-1], c.mid_transformer_depth, c.head_dim, c.kv_heads, True,
                                  c.ff_mult, c.norm_groups, name="attentions_0", **kw)(x, context, bias)
    return res("resnets_1")(x, temb)


class UpBlock(_Level):
  """`layers_per_block + 1` x [concat skip, ResBlock, transformer?], then upsample (not on the last level)."""

  @nn.compact
  def __call__(self, x, skips, temb, context, bias):
    c, lvl = self.config, self.level
    levels = len(c.block_out_channels)
    kind = c.up_kinds[lvl]
    features = c.block_out_channels[levels - 1 - lvl]
    depth = c.transformer_depth[levels - 1 - lvl]
    heads_level = levels - 1 - lvl
    skips = list(skips)
    for i in range(c.layers_per_block + 1):
      x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = self.resblock(features, f"resnets_{i}")(x, temb)
      if kind != "none":
        x = self.transformer(heads_level, depth, kind, f"attentions_{i}")(x, context, bias)
    if lvl < levels - 1:
      x = layers.Upsample(features, name="upsamplers_0", **self.kw())(x)
    return x
