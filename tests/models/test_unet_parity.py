"""Our U-Net and VAE against the diffusers PyTorch references, weights carried over."""
import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from dreamlite_jax.models import weights
from dreamlite_jax.models.unet import DreamLiteUNet, UNetConfig
from dreamlite_jax.models.vae import TinyAutoencoder, VAEConfig

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderTiny  # noqa: E402
from diffusers.models.unets.unet_dreamlite import DreamLiteUNetModel  # noqa: E402

SMALL = UNetConfig(block_out_channels=(32, 64, 64), transformer_depth=(1, 2, 1), mid_transformer_depth=1,
                   heads=(2, 4, 4), head_dim=16, norm_groups=8, cross_attention_dim=48, encoder_hid_dim=40,
                   time_embed_dim=64, addition_time_embed_dim=16, ff_mult=3.0)


def _randomize(module, seed):
  """Random weights everywhere, norms included, so a mis-mapped scale/bias shows."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      scale = 0.2 if p.ndim > 1 else 0.1
      base = 1.0 if (p.ndim == 1 and name.endswith("weight")) else 0.0
      p.copy_(base + scale * torch.randn(p.shape, generator=gen))
  return module.eval()


def _torch_unet(config, seed=0):
  return _randomize(DreamLiteUNetModel(**weights.unet_config_to_diffusers(config)), seed)


def _max_rel_err(ours, ref):
  return float(np.abs(ours - ref).max() / (np.abs(ref).max() + 1e-12))


@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_unet_matches_diffusers(task):
  torch_model = _torch_unet(SMALL)
  state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  params = weights.params_from_state_dict(state, weights.unet_abstract_params(SMALL))
  rng = np.random.default_rng(1)
  b, h, w, L = 2, 8, 8, 7
  target = rng.standard_normal((b, h, w, 4)).astype(np.float32)
  condition = (rng.standard_normal((b, h, w, 4)).astype(np.float32) if task == "edit"
               else np.zeros((b, h, w, 4), np.float32))
  canvas = np.concatenate([target, condition], axis=2)            # [B, h, 2w, 4]
  timestep = np.array([999.0, 312.5], np.float32)
  text = rng.standard_normal((b, L, SMALL.encoder_hid_dim)).astype(np.float32)
  mask = np.ones((b, L), np.float32)
  mask[1, 4:] = 0.0                                                 # right padding
  time_ids = np.array([[64.0, 64.0], [64.0, 48.0]], np.float32)

  with torch.no_grad():
    ref = torch_model(torch.from_numpy(canvas).permute(0, 3, 1, 2), torch.from_numpy(timestep),
                      encoder_hidden_states=torch.from_numpy(text),
                      encoder_attention_mask=torch.from_numpy(mask),
                      added_cond_kwargs={"time_ids": torch.from_numpy(time_ids)}).sample
  ref = ref.permute(0, 2, 3, 1).numpy()
  ours = DreamLiteUNet(SMALL).apply({"params": params}, canvas, timestep, text, mask, time_ids)
  assert ours.shape == canvas.shape
  err = _max_rel_err(np.asarray(ours), ref)
  assert err <= 1e-4, err
  # The mask matters: changing padded text tokens leaves the output unchanged, real tokens don't.
  text2 = text.copy()
  text2[1, 5:] += 3.0
  ours2 = DreamLiteUNet(SMALL).apply({"params": params}, canvas, timestep, text2, mask, time_ids)
  assert np.abs(np.asarray(ours2) - np.asarray(ours)).max() < 1e-3
  text2[1, 0] += 3.0
  ours3 = DreamLiteUNet(SMALL).apply({"params": params}, canvas, timestep, text2, mask, time_ids)
  assert np.abs(np.asarray(ours3) - np.asarray(ours)).max() > 1e-2


def test_paper_config_has_reference_parameter_count():
  abstract = weights.unet_abstract_params(UNetConfig.paper())
  assert weights.count_params(abstract) == 389_968_388
  with torch.device("meta"):
    ref = DreamLiteUNetModel(**weights.unet_config_to_diffusers(UNetConfig.paper()))
  assert sum(p.numel() for p in ref.parameters()) == 389_968_388


def test_vae_matches_autoencoder_tiny():
  config = VAEConfig(encoder_channels=(16, 16, 16, 16), decoder_channels=(16, 16, 16, 16),
                     encoder_blocks=(1, 2, 1, 1), decoder_blocks=(1, 1, 2, 1))
  torch_vae = _randomize(AutoencoderTiny(**weights.vae_config_to_diffusers(config)), 3)
  state = {k: v.numpy() for k, v in torch_vae.state_dict().items()}
  params = weights.params_from_state_dict(state, weights.vae_abstract_params(config))
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (2, 32, 48, 3)).astype(np.float32)
  latents = rng.standard_normal((2, 4, 6, 4)).astype(np.float32) * 2
  with torch.no_grad():
    ref_lat = torch_vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latents.permute(0, 2, 3, 1).numpy()
    ref_img = torch_vae.decode(torch.from_numpy(latents).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
  model = TinyAutoencoder(config)
  ours_lat = model.apply({"params": params}, images, method="encode")
  ours_img = model.apply({"params": params}, latents, method="decode")
  assert ours_lat.shape == (2, 4, 6, 4) and ours_img.shape == (2, 32, 48, 3)
  assert _max_rel_err(np.asarray(ours_lat), ref_lat) <= 1e-4
  assert _max_rel_err(np.asarray(ours_img), ref_img) <= 1e-4
