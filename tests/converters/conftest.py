"""Shared tiny models and one fp32 + one fp16 export, built once per session (TF is slow)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from converters import export
from dreamlite_jax.models import layers as L
from dreamlite_jax.models.qwen3_vl import Qwen3VLConfig, Qwen3VLEncoder

IMAGE = (32, 48)  # pixels (H, W): latent 4x6, packed canvas 4x12
TEXT_LEN = 8


class StandInUNet(nn.Module):
  """A small U-Net with DreamLiteUNet's call signature, built from the delegate-safe layers."""
  text_dim: int

  @nn.compact
  def __call__(self, sample, timestep, text, text_mask, time_ids):
    temb = L.MLPEmbedding(32)(L.timestep_embedding(timestep, 16))
    # time_ids[:, 0] would be a rank-2 SLICE and timestep_embedding(time_ids.reshape(-1))
    # a two-sided broadcast MUL, both off the GPU; an outer product as a matmul is not.
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4).astype(np.float32)[None, :]
    args = jnp.matmul(time_ids.reshape(-1, 1), freqs)  # [2B, 4]
    size = jnp.concatenate([jnp.cos(args), jnp.sin(args)], -1).reshape(sample.shape[0], 16)
    temb = temb + L.MLPEmbedding(32)(size)
    ctx = L.RMSNorm()(L.Dense(32)(text))
    bias = L.attention_bias_from_mask(text_mask)
    h = L.Conv(16, 3)(sample)
    skip = L.ResBlock(16, norm_groups=4)(h, temb)
    h = L.Downsample(32)(skip)
    h = L.ResBlock(32, norm_groups=8)(h, temb)
    h = L.SpatialTransformer(heads=2, depth=1, head_dim=16, norm_groups=8)(h, ctx, bias)
    h = L.Upsample(16)(h) + skip
    h = L.SpatialTransformer(heads=1, depth=1, head_dim=16, norm_groups=4,
                             self_attention=False)(h, ctx, bias)
    return L.Conv(4, 3)(nn.silu(L.GroupNorm(4)(h)))


class StandInVAE(nn.Module):
  """TAESD-shaped stand-in: encode `[B,H,W,3] -> [B,H/8,W/8,4]`, decode back."""

  def setup(self):
    self.enc = [L.Conv(16, 3, stride=2), L.Conv(16, 3, stride=2), L.Conv(16, 3, stride=2)]
    self.enc_out = L.Conv(4, 3)
    self.dec_in = L.Conv(16, 3)
    self.dec = [L.Upsample(16), L.Upsample(16), L.Upsample(16)]
    self.dec_out = L.Conv(3, 3)

  def encode(self, x):
    for conv in self.enc:
      x = nn.relu(conv(x))
    return self.enc_out(x)

  def decode(self, z):
    h = nn.relu(self.dec_in(jnp.tanh(z / 3) * 3))
    for up in self.dec:
      h = nn.relu(up(h))
    return self.dec_out(h)

  def __call__(self, x):
    return self.decode(self.encode(x))


def _random_params(abstract, seed: int):
  """Fast random init from shapes: norm scales near 1, He-scaled weights, small biases."""
  rng = np.random.default_rng(seed)
  def leaf(path, x):
    name = jax.tree_util.keystr(path)
    if 'scale' in name:
      return (1.0 + 0.1 * rng.standard_normal(x.shape, np.float32))
    if len(x.shape) < 2:  # biases
      return rng.standard_normal(x.shape, np.float32) * np.float32(0.05)
    fan_in = 1 if 'embed_tokens' in name else int(np.prod(x.shape[:-1]))
    return rng.standard_normal(x.shape, np.float32) * np.float32((2.0 / fan_in) ** 0.5)
  return jax.tree_util.tree_map_with_path(leaf, nn.meta.unbox(abstract))


@pytest.fixture(scope='session')
def tiny_models() -> export.DeployModels:
  text_model = Qwen3VLEncoder(Qwen3VLConfig.tiny())
  ids = jnp.zeros((1, 8), jnp.int32)
  text_params = _random_params(jax.eval_shape(text_model.init, jax.random.PRNGKey(0), ids, ids)
                               ['params'], 0)
  hidden = text_params['language_model']['embed_tokens'].shape[1]
  unet = StandInUNet(hidden)
  h, w = IMAGE[0] // 8, IMAGE[1] // 8
  unet_params = _random_params(jax.eval_shape(
      unet.init, jax.random.PRNGKey(1), jnp.zeros((1, h, 2 * w, 4)), jnp.ones((1,)),
      jnp.zeros((1, TEXT_LEN, hidden)), jnp.ones((1, TEXT_LEN)), jnp.ones((1, 2)))['params'], 1)
  vae = StandInVAE()
  vae_params = _random_params(jax.eval_shape(vae.init, jax.random.PRNGKey(2),
                                             jnp.zeros((1, *IMAGE, 3)))['params'], 2)
  return export.DeployModels(unet, unet_params, vae, vae_params, text_model, text_params,
                             text_len=TEXT_LEN)


@pytest.fixture(scope='session')
def export_fp32(tiny_models, tmp_path_factory):
  out = tmp_path_factory.mktemp('export_fp32')
  return out, export.export_all(tiny_models, out, 'fp32', IMAGE, log=lambda s: None)


@pytest.fixture(scope='session')
def export_fp16(tiny_models, tmp_path_factory):
  out = tmp_path_factory.mktemp('export_fp16')
  return out, export.export_all(tiny_models, out, 'fp16', IMAGE, log=lambda s: None)
