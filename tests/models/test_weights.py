"""Safetensors save/load round trips and strict errors on mismatched files."""
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jax

from dreamlite_jax.models import weights
from dreamlite_jax.models.unet import DreamLiteUNet, UNetConfig
from dreamlite_jax.models.vae import TinyAutoencoder, VAEConfig


def _init_unet(config, seed=0):
  return DreamLiteUNet(config).init(jax.random.key(seed), *weights.unet_example_inputs(config))["params"]


def test_unet_dir_round_trip(tmp_path):
  config = UNetConfig.tiny()
  params = _init_unet(config)
  weights.save_unet_dir(str(tmp_path / "unet"), config, params)
  loaded_config, loaded = weights.load_unet_dir(str(tmp_path / "unet"))
  assert loaded_config == config
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  inputs = weights.unet_example_inputs(config)
  np.testing.assert_array_equal(DreamLiteUNet(config).apply({"params": params}, *inputs),
                                DreamLiteUNet(config).apply({"params": loaded}, *inputs))


def test_saved_unet_loads_into_diffusers(tmp_path):
  diffusers = pytest.importorskip("diffusers")
  from diffusers.models.unets.unet_dreamlite import DreamLiteUNetModel
  config = UNetConfig.tiny()
  weights.save_unet_dir(str(tmp_path / "unet"), config, _init_unet(config))
  model = DreamLiteUNetModel.from_pretrained(str(tmp_path / "unet"))
  assert sum(p.numel() for p in model.parameters()) == weights.count_params(weights.unet_abstract_params(config))


def test_mismatched_file_names_the_tensors(tmp_path):
  config = UNetConfig.tiny()
  path = str(tmp_path / "w.safetensors")
  weights.save_safetensors(_init_unet(config), path)
  state = load_file(path)
  del state["conv_in.weight"]
  state["mid_block.bogus.weight"] = np.zeros((3,), np.float32)
  state["conv_out.weight"] = np.zeros((4, 32, 1, 1), np.float32)
  save_file(state, path)
  with pytest.raises(weights.WeightsMismatchError) as info:
    weights.load_safetensors(path, weights.unet_abstract_params(config))
  msg = str(info.value)
  assert "missing (1): conv_in.weight" in msg
  assert "unexpected (1): mid_block.bogus.weight" in msg
  assert "conv_out.weight file (4, 32, 1, 1)" in msg


def test_vae_dir_round_trip_and_missing_files(tmp_path):
  config = VAEConfig.tiny()
  params = TinyAutoencoder(config).init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))["params"]
  weights.save_vae_dir(str(tmp_path / "vae"), config, params)
  loaded_config, loaded = weights.load_vae_dir(str(tmp_path / "vae"))
  assert loaded_config == config
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(params),
                                                  jax.tree_util.tree_leaves(loaded)))
  with pytest.raises(FileNotFoundError, match="config.json"):
    weights.load_vae_dir(str(tmp_path))
  os.makedirs(tmp_path / "bad")
  (tmp_path / "bad" / "config.json").write_text(json.dumps({"act_fn": "silu"}))
  with pytest.raises(ValueError, match="act_fn"):
    weights.load_vae_dir(str(tmp_path / "bad"))


def test_unsupported_diffusers_config_is_named():
  cfg = weights.unet_config_to_diffusers(UNetConfig.tiny())
  with pytest.raises(ValueError, match="encoder_hid_dim_type"):
    weights.unet_config_from_diffusers({**cfg, "encoder_hid_dim_type": "text_proj"})
  with pytest.raises(ValueError, match="unsupported block type"):
    weights.unet_config_from_diffusers({**cfg, "down_block_types": ["Foo"] * 3})


def test_ff_mult_is_inferred_from_weights_when_config_lacks_it():
  config = UNetConfig.tiny()
  cfg = weights.unet_config_to_diffusers(config)
  del cfg["ff_mult"]
  state = weights.params_to_state_dict(_init_unet(config))
  assert weights.unet_config_from_diffusers(cfg, state).ff_mult == config.ff_mult


def test_param_count_benchmark_reports_release_count(capsys):
  from benchmarks import param_count
  param_count.main(["--config", "experiments/dreamlite_1024_pretrain_t2i.py"])
  out = capsys.readouterr().out.strip().splitlines()
  assert out[-1] == f"unet_params: {param_count.RELEASED_UNET_PARAMS}"
  assert "up_blocks_0: 166235264" in out
