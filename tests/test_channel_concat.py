"""The channel-concatenation ablation wrapper: same call signature, condition on channels."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamlite_jax.models import channel_concat
from dreamlite_jax.models.unet import UNetConfig

MICRO = dataclasses.replace(
    UNetConfig.tiny(encoder_hid_dim=16), block_out_channels=(32, 32), heads=(1, 1),
    down_kinds=("cross", "full"), up_kinds=("full", "none"), transformer_depth=(1, 1),
    layers_per_block=1)


def test_channel_concat_uses_the_condition_and_zeroes_the_right_half():
  model = channel_concat.ChannelConcatUNet(channel_concat.channel_config(MICRO))
  rng = np.random.default_rng(0)
  canvas = jnp.asarray(rng.standard_normal((2, 4, 8, 4)), jnp.float32)
  args = (jnp.array([500.0, 200.0]), jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float32),
          jnp.ones((2, 5), jnp.int32), jnp.full((2, 2), 32.0))
  params = model.init(jax.random.PRNGKey(0), canvas, *args)["params"]
  assert params["unet"]["conv_in"]["kernel"].value.shape[2] == 8  # 4 target + 4 condition
  out = model.apply({"params": params}, canvas, *args)
  assert out.shape == canvas.shape
  np.testing.assert_array_equal(np.asarray(out[:, :, 4:]), 0.0)
  other = canvas.at[:, :, 4:].set(0.0)  # same target, condition removed
  changed = model.apply({"params": params}, other, *args)
  assert float(jnp.max(jnp.abs(changed[:, :, :4] - out[:, :, :4]))) > 1e-4


def test_channel_concat_rejects_a_mismatched_config():
  model = channel_concat.ChannelConcatUNet(MICRO)  # in_channels 4, but 8 arrive
  canvas = jnp.zeros((1, 4, 8, 4))
  with pytest.raises(ValueError, match="in_channels"):
    model.init(jax.random.PRNGKey(0), canvas, jnp.zeros((1,)), jnp.zeros((1, 5, 16)),
               jnp.ones((1, 5), jnp.int32), jnp.full((1, 2), 32.0))
