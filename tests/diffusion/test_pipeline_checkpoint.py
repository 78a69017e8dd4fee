"""load_pipeline(): a training run's checkpoint + run config -> a working Pipeline."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dreamlite_jax import pipeline as pipeline_lib
from dreamlite_jax.models.unet import DreamLiteUNet, UNetConfig
from dreamlite_jax.models.vae import TinyAutoencoder, VAEConfig
from dreamlite_jax.models import weights
from dreamlite_jax.training import checkpoints
from dreamlite_jax.training.state import TrainState

# Two levels, one block each: every DreamLite feature, the smallest graph.
UNET = UNetConfig(block_out_channels=(16, 32), down_kinds=("cross", "full"), up_kinds=("full", "none"),
                  layers_per_block=1, transformer_depth=(1, 1), mid_transformer_depth=1, heads=(1, 2),
                  head_dim=16, norm_groups=8, cross_attention_dim=32, encoder_hid_dim=64,
                  time_embed_dim=32, addition_time_embed_dim=8)
VAE = VAEConfig(encoder_channels=(8, 8, 8, 8), decoder_channels=(8, 8, 8, 8),
                encoder_blocks=(1, 1, 1, 1), decoder_blocks=(1, 1, 1, 1))


def _save_run(workdir, params, ema_params, model: dict | None):
  state = TrainState(step=jnp.array(3, jnp.int32), params=params, opt_state=(), ema_params=ema_params,
                     rng=jax.random.PRNGKey(0), skipped=jnp.zeros((), jnp.int32))
  config = ml_collections.ConfigDict({"model": model} if model else {"seed": 0})
  manager = checkpoints.make_manager(checkpoints.checkpoint_dir(str(workdir)), async_save=False)
  checkpoints.save(manager, state, None, config)
  manager.wait_until_finished()
  manager.close()


def _init(abstract, seed):
  """Random params with numpy (no per-shape compilation)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape, np.float32)), abstract)


def test_load_pipeline_from_a_run(tmp_path):
  import flax.linen as nn
  unet_params = _init(nn.unbox(weights.unet_abstract_params(UNET)), 1)
  unet_ema = jax.tree.map(lambda x: x * 0.5, unet_params)
  vae_params = _init(nn.unbox(weights.vae_abstract_params(VAE)), 2)
  _save_run(tmp_path / "vae_run", vae_params, vae_params, None)
  model = {"unet": dataclasses.asdict(UNET), "vae": dataclasses.asdict(VAE),
           "vae_checkpoint": str(tmp_path / "vae_run"),
           "text_encoder": {"spec": "tiny:0", "text_length": 16}}
  _save_run(tmp_path / "run", unet_params, unet_ema, model)

  pipe = pipeline_lib.load_pipeline(str(tmp_path / "run"))
  assert isinstance(pipe.unet, DreamLiteUNet) and isinstance(pipe.vae, TinyAutoencoder)
  assert pipe.unet.config == UNET and pipe.size_multiple == 16
  for got, want in zip(jax.tree.leaves(pipe.unet_params), jax.tree.leaves(unet_ema)):
    np.testing.assert_array_equal(got, want)
  for got, want in zip(jax.tree.leaves(pipe.vae_params), jax.tree.leaves(vae_params)):
    np.testing.assert_array_equal(got, want)
  images = pipe.generate(["a red circle", "a blue square"], seed=0, steps=2, size=16, output="np")
  assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
  assert np.abs(images[0].astype(int) - images[1]).max() > 0

  raw = pipeline_lib.load_pipeline(str(tmp_path / "run"), ema=False, text_encoder=pipe.text_encoder)
  for got, want in zip(jax.tree.leaves(raw.unet_params), jax.tree.leaves(unet_params)):
    np.testing.assert_array_equal(got, want)
  try:
    pipeline_lib.load_pipeline(str(tmp_path / "vae_run"))
  except KeyError as e:
    assert "model.unet" in str(e)
  else:
    raise AssertionError("a run without model.unet must not load")
