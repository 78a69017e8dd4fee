"""Tiny DreamLite models and one fp32 + one fp16 export, built once per session (TF is slow)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from converters import export
from dreamlite_jax.models.qwen3_vl import Qwen3VLConfig, Qwen3VLEncoder
from dreamlite_jax.models.text_conditioning import TextEncoder
from dreamlite_jax.models.unet import DreamLiteUNet, UNetConfig
from dreamlite_jax.models.vae import TinyAutoencoder, VAEConfig
from dreamlite_jax.pipeline import Pipeline

IMAGE = (32, 64)  # pixels (H, W): latent 4x8, packed canvas 4x16


def converter_unet_config(text_dim: int) -> UNetConfig:
  """Two levels of every DreamLite block kind (cross-only, self + cross, none): all the
  op patterns of the paper U-Net in ~1/3 of `UNetConfig.tiny()`'s graph, so TF converts fast."""
  return UNetConfig(block_out_channels=(16, 32), down_kinds=('cross', 'full'),
                    up_kinds=('full', 'none'), layers_per_block=1, transformer_depth=(1, 1),
                    mid_transformer_depth=1, heads=(1, 2), head_dim=16, norm_groups=8,
                    cross_attention_dim=32, encoder_hid_dim=text_dim, time_embed_dim=32,
                    addition_time_embed_dim=16)
TEXT_LEN = 8


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
  unet = DreamLiteUNet(converter_unet_config(hidden))
  h, w = IMAGE[0] // 8, IMAGE[1] // 8
  unet_params = _random_params(jax.eval_shape(
      unet.init, jax.random.PRNGKey(1), jnp.zeros((1, h, 2 * w, 4)), jnp.ones((1,)),
      jnp.zeros((1, TEXT_LEN, hidden)), jnp.ones((1, TEXT_LEN)), jnp.ones((1, 2)))['params'], 1)
  vae = TinyAutoencoder(VAEConfig.tiny())
  vae_params = _random_params(jax.eval_shape(vae.init, jax.random.PRNGKey(2),
                                             jnp.zeros((1, *IMAGE, 3)))['params'], 2)
  return export.DeployModels(unet, unet_params, vae, vae_params, text_model, text_params,
                             text_len=TEXT_LEN)


@pytest.fixture(scope='session')
def jax_pipeline(tiny_models) -> Pipeline:
  """`dreamlite_jax.pipeline.Pipeline` over the same tiny models."""
  m = tiny_models
  text = TextEncoder(Qwen3VLConfig.tiny(), m.text_params, text_length=TEXT_LEN)
  return Pipeline(text, m.unet, m.unet_params, m.vae, m.vae_params, size_multiple=16)


@pytest.fixture(scope='session')
def export_fp32(jax_pipeline, tmp_path_factory):
  """Exported through the CLI (`load_pipeline` stubbed to return the tiny pipeline)."""
  out = tmp_path_factory.mktemp('export_fp32')
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr('dreamlite_jax.pipeline.load_pipeline', lambda checkpoint, **kw: jax_pipeline)
    manifest = export.main(['--checkpoint', 'run/', '--out', str(out), '--precision', 'fp32',
                            '--size', str(IMAGE[0]), str(IMAGE[1])])
  return out, manifest


@pytest.fixture(scope='session')
def export_fp16(tiny_models, tmp_path_factory):
  out = tmp_path_factory.mktemp('export_fp16')
  return out, export.export_all(tiny_models, out, 'fp16', IMAGE, log=lambda s: None)
