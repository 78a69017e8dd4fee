"""The TAESD-style tiny autoencoder DreamLite ships (diffusers `AutoencoderTiny` layout).

8x downsampling (one level fewer: 4x) to 4 latent channels, plain 3x3 convs with
ReLU, nearest 2x upsampling, decoder input clamp `tanh(z/3)*3`. Images are NHWC in
[-1, 1]. Widths, levels and block counts are configurable so the tiny CPU default
trains its own.

Submodules are named `layers_<i>` with the index of the matching entry of the
reference's `nn.Sequential` (activations and upsamplers included), so
`models/weights.py` maps names 1:1.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from dreamlite_jax import config as config_lib
from dreamlite_jax.models import layers


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Hyper-parameters of the tiny autoencoder (defaults: TAESD-XL as used by DreamLite)."""
  in_channels: int = 3
  latent_channels: int = 4
  encoder_channels: tuple[int, ...] = (64, 64, 64, 64)
  decoder_channels: tuple[int, ...] = (64, 64, 64, 64)
  encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
  decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
  scaling_factor: float = 1.0
  shift_factor: float = 0.0
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    if len(self.encoder_channels) != len(self.encoder_blocks):
      raise ValueError("VAEConfig.encoder_channels and encoder_blocks need the same length")
    if len(self.decoder_channels) != len(self.decoder_blocks):
      raise ValueError("VAEConfig.decoder_channels and decoder_blocks need the same length")

  @classmethod
  def taesd(cls) -> "VAEConfig":
    return cls()

  @classmethod
  def tiny(cls, downsample_factor: int = 8) -> "VAEConfig":
    """A CPU-sized autoencoder for the shapes world, 8x (TAESD's layout) or 4x.

    TAESD's block layout (3, 3, 3, 1 decoder blocks) at 32 channels, with the
    encoder's full-resolution block dropped: blocks at coarse resolutions are
    nearly free, and on shapes images this layout reconstructs what the evaluator
    checks far better than one block per level. The 4x variant drops the 1/8
    level: the tiny job uses it on 32x32 images (8x8 latents, like 64x64 at 8x),
    where 1000 steps reconstruct shapes the evaluator scores 0.94 against 0.55
    for the 8x model on 64x64 images (README, "The main job").
    """
    if downsample_factor == 8:
      return cls(encoder_channels=(32, 32, 32, 32), decoder_channels=(32, 32, 32, 32),
                 encoder_blocks=(0, 2, 2, 2), decoder_blocks=(3, 3, 3, 1))
    if downsample_factor == 4:
      return cls(encoder_channels=(32, 32, 32), decoder_channels=(32, 32, 32),
                 encoder_blocks=(0, 2, 2), decoder_blocks=(3, 3, 1))
    raise ValueError(f"VAEConfig.tiny: downsample_factor must be 4 or 8, got {downsample_factor}")

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.encoder_channels) - 1)

  @classmethod
  def from_dict(cls, d) -> "VAEConfig":
    """Builds a config from a dict / ConfigDict, converting lists to tuples."""
    return config_lib.dataclass_from_dict(cls, d)

  @classmethod
  def from_diffusers(cls, cfg: dict) -> "VAEConfig":
    """Config from an `AutoencoderTiny` `config.json` dict."""
    for key, want in (("act_fn", "relu"), ("upsample_fn", "nearest"), ("upsampling_scaling_factor", 2)):
      if cfg.get(key, want) != want:
        raise ValueError(f"vae config.json: {key}={cfg[key]!r} is not supported (need {want!r})")
    return cls(in_channels=cfg.get("in_channels", 3), latent_channels=cfg.get("latent_channels", 4),
               encoder_channels=tuple(cfg.get("encoder_block_out_channels", (64,) * 4)),
               decoder_channels=tuple(cfg.get("decoder_block_out_channels", (64,) * 4)),
               encoder_blocks=tuple(cfg.get("num_encoder_blocks", (1, 3, 3, 3))),
               decoder_blocks=tuple(cfg.get("num_decoder_blocks", (3, 3, 3, 1))),
               scaling_factor=float(cfg.get("scaling_factor", 1.0) or 1.0),
               shift_factor=float(cfg.get("shift_factor", 0.0) or 0.0))


def _dtypes(config: VAEConfig):
  return dict(dtype=layers.DTYPES[config.dtype], param_dtype=layers.DTYPES[config.param_dtype])


class TinyBlock(nn.Module):
  """conv-ReLU-conv-ReLU-conv plus identity skip, then ReLU."""
  features: int
  dtype: object = jnp.float32
  param_dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.relu(layers.Conv(self.features, 3, name="conv_0", **kw)(x))
    h = nn.relu(layers.Conv(self.features, 3, name="conv_2", **kw)(h))
    h = layers.Conv(self.features, 3, name="conv_4", **kw)(h)
    if x.shape[-1] != self.features:
      x = layers.Conv(self.features, 1, use_bias=False, name="skip", **kw)(x)
    return nn.relu(h + x)


class TinyEncoder(nn.Module):
  """Images `[B, H, W, 3]` in [-1, 1] -> latents `[B, H/f, W/f, C]` (f = downsample_factor)."""
  config: VAEConfig

  @nn.compact
  def __call__(self, x):
    c, kw = self.config, _dtypes(self.config)
    x = (x.astype(kw["dtype"]) + 1.0) / 2.0
    i = 0
    for level, (ch, n) in enumerate(zip(c.encoder_channels, c.encoder_blocks)):
      if level == 0:
        x = layers.Conv(ch, 3, name=f"layers_{i}", **kw)(x)
      else:
        x = layers.Conv(ch, 3, stride=2, use_bias=False, name=f"layers_{i}", **kw)(x)
      i += 1
      for _ in range(n):
        x = TinyBlock(ch, name=f"layers_{i}", **kw)(x)
        i += 1
    return layers.Conv(c.latent_channels, 3, name=f"layers_{i}", **kw)(x).astype(jnp.float32)


class TinyDecoder(nn.Module):
  """Latents `[B, h, w, C]` -> images `[B, f*h, f*w, 3]` in about [-1, 1]."""
  config: VAEConfig

  @nn.compact
  def __call__(self, z):
    c, kw = self.config, _dtypes(self.config)
    x = jnp.tanh(z.astype(kw["dtype"]) / 3.0) * 3.0
    x = nn.relu(layers.Conv(c.decoder_channels[0], 3, name="layers_0", **kw)(x))
    i = 2  # index 1 is the ReLU
    last = len(c.decoder_channels) - 1
    for level, (ch, n) in enumerate(zip(c.decoder_channels, c.decoder_blocks)):
      for _ in range(n):
        x = TinyBlock(ch, name=f"layers_{i}", **kw)(x)
        i += 1
      if level != last:
        x = layers.upsample_nearest_2x(x)
        i += 1
      out = c.in_channels if level == last else ch
      x = layers.Conv(out, 3, use_bias=level == last, name=f"layers_{i}", **kw)(x)
      i += 1
    return (x * 2.0 - 1.0).astype(jnp.float32)


class TinyAutoencoder(nn.Module):
  """Encoder + decoder; `encode`/`decode` apply the latent scaling and shift."""
  config: VAEConfig

  def setup(self):
    self.encoder = TinyEncoder(self.config)
    self.decoder = TinyDecoder(self.config)

  def encode(self, images):
    """`[B, H, W, 3]` in [-1, 1] -> scaled latents `[B, H/f, W/f, C]`."""
    return (self.encoder(images) - self.config.shift_factor) * self.config.scaling_factor

  def decode(self, latents):
    """Scaled latents `[B, h, w, C]` -> images `[B, f*h, f*w, 3]`."""
    return self.decoder(latents / self.config.scaling_factor + self.config.shift_factor)

  def __call__(self, images):
    return self.decode(self.encode(images))
