"""Ablation only: the edit condition as extra input channels instead of extra width.

DreamLite packs `[target | condition]` along the latent width so one U-Net with
4 input channels does T2I and editing. The usual alternative (InstructPix2Pix)
stacks the condition on the channel axis: `[B, H, W, 4 + 4]` into a U-Net with
`in_channels = 8`. `ChannelConcatUNet` takes the same packed canvas and call
signature as `DreamLiteUNet`, re-stacks the halves on channels, runs the same
U-Net class on the W-wide canvas, and returns `[velocity | zeros]`, so the
loss, samplers and pipeline run unchanged (they use the left half only).
Selected by `config.model.conditioning = "channel"` in the shapes job.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from dreamlite_jax.diffusion import packing
from dreamlite_jax.models.unet import DreamLiteUNet, UNetConfig

CONDITIONING = ("spatial", "channel")


def channel_config(config: UNetConfig, latent_channels: int = 4) -> UNetConfig:
  """The U-Net config with `in_channels` for target + condition stacked on channels."""
  return dataclasses.replace(config, in_channels=2 * latent_channels, out_channels=latent_channels)


class ChannelConcatUNet(nn.Module):
  """`(canvas [B,H,2W,C], timestep [B], text, text_mask, time_ids) -> [B,H,2W,C]` (right half 0)."""
  config: UNetConfig  # in_channels = 2 * C

  @nn.compact
  def __call__(self, sample, timestep, text, text_mask, time_ids):
    target, condition = packing.unpack_target(sample), packing.unpack_condition(sample)
    stacked = jnp.concatenate([target, condition], axis=-1)
    if stacked.shape[-1] != self.config.in_channels:
      raise ValueError(f"ChannelConcatUNet: target + condition have {stacked.shape[-1]} channels "
                       f"but UNetConfig.in_channels = {self.config.in_channels}")
    velocity = DreamLiteUNet(self.config, name="unet")(stacked, timestep, text, text_mask,
                                                        time_ids)
    return jnp.concatenate([velocity, jnp.zeros_like(velocity)], axis=2)
