"""Checkpoint loading: transformers naming variants, shards, bf16, sharding, and the error report."""
import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from hf_reference import VOCAB, rel_err, tiny_hf_config
from dreamlite_jax.models.qwen3_vl import Qwen3VLEncoder
from dreamlite_jax.models.text_weights import CheckpointError, hf_name, load_qwen3_vl


@pytest.fixture(scope="module")
def text_only_dir(tmp_path_factory):
  """A Qwen3VLTextModel (names without prefix) saved as several shards plus an index."""
  torch.manual_seed(3)
  cfg = tiny_hf_config().text_config
  cfg._attn_implementation = "eager"
  model = transformers.Qwen3VLTextModel(cfg).eval()
  directory = str(tmp_path_factory.mktemp("text_only"))
  model.save_pretrained(directory, max_shard_size="40KB")
  return model, directory


def test_sharded_text_only_checkpoint_reproduces_outputs(text_only_dir):
  model, directory = text_only_dir
  assert os.path.exists(os.path.join(directory, "model.safetensors.index.json"))
  ids = np.random.default_rng(0).integers(0, VOCAB, (2, 9)).astype(np.int32)
  mask = np.ones_like(ids)
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids, dtype=torch.long)).last_hidden_state.numpy()
  config, params = load_qwen3_vl(directory, use_vision=False, final_norm=True)
  ours = jax.jit(Qwen3VLEncoder(config).apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
  assert rel_err(ours, ref) <= 1e-4


def test_bf16_loading_keeps_checkpoint_values(hf_vl, tmp_path):
  model, _ = hf_vl
  model = copy.deepcopy(model).to(torch.bfloat16)     # the session model stays float32
  model.save_pretrained(str(tmp_path))
  config, params = load_qwen3_vl(str(tmp_path), dtype=jnp.bfloat16)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  ref = model.model.language_model.layers[1].self_attn.k_proj.weight.detach().float().numpy()
  ours = np.asarray(params["language_model"]["layers_1"]["self_attn"]["k_proj"]["kernel"], np.float32)
  np.testing.assert_array_equal(ours, ref.T)


def test_mesh_loading_places_each_tensor_on_its_sharding(hf_vl):
  _, directory = hf_vl
  devices = np.array(jax.devices()[:8]).reshape(1, 2, 4)
  mesh = jax.sharding.Mesh(devices, ("data", "fsdp", "tensor"))
  config, params = load_qwen3_vl(directory, use_vision=False, mesh=mesh)
  q = params["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]            # [embed, heads]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  embed = params["language_model"]["embed_tokens"]                                     # [vocab, embed]
  assert embed.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  _, plain = load_qwen3_vl(directory, use_vision=False)
  ids = jnp.arange(10, dtype=jnp.int32)[None] % VOCAB
  mask = jnp.ones_like(ids)
  run = jax.jit(lambda p: Qwen3VLEncoder(config).apply({"params": p}, ids, mask))
  np.testing.assert_allclose(np.asarray(run(params)), np.asarray(run(plain)), atol=1e-5)


def test_bad_checkpoint_lists_missing_unexpected_and_misshaped(hf_vl, tmp_path):
  _, directory = hf_vl
  tensors = load_file(os.path.join(directory, "model.safetensors"))
  del tensors["model.language_model.layers.2.mlp.up_proj.weight"]
  tensors["model.language_model.layers.0.self_attn.extra.weight"] = np.zeros((2,), np.float32)
  tensors["model.visual.blocks.1.attn.qkv.bias"] = np.zeros((5,), np.float32)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with open(os.path.join(directory, "config.json")) as f:
    (tmp_path / "config.json").write_text(f.read())
  with pytest.raises(CheckpointError) as err:
    load_qwen3_vl(str(tmp_path))
  msg = str(err.value)
  assert "missing (1): language_model.layers.2.mlp.up_proj.weight" in msg
  assert "unexpected (1): language_model.layers.0.self_attn.extra.weight" in msg
  assert "mis-shaped (1): visual.blocks.1.attn.qkv.bias (5,) (expected (96,))" in msg
  # Text-only loading ignores the vision tower, so only the text problems remain.
  with pytest.raises(CheckpointError) as err:
    load_qwen3_vl(str(tmp_path), use_vision=False)
  assert "mis-shaped" not in str(err.value)


def test_missing_files_and_config_fields_are_named(tmp_path):
  with pytest.raises(CheckpointError, match="config.json not found"):
    load_qwen3_vl(str(tmp_path))
  cfg = tiny_hf_config().to_dict()
  del cfg["text_config"]["num_hidden_layers"]
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="num_hidden_layers"):
    load_qwen3_vl(str(tmp_path))


def test_param_names_map_to_transformers_names():
  assert hf_name(("language_model", "layers_3", "self_attn", "q_norm", "scale")) == \
      "language_model.layers.3.self_attn.q_norm.weight"
  assert hf_name(("visual", "blocks_0", "qkv", "kernel")) == "visual.blocks.0.attn.qkv.weight"
  assert hf_name(("visual", "deepstack_merger_1", "linear_fc2", "bias")) == \
      "visual.deepstack_merger_list.1.linear_fc2.bias"
  assert hf_name(("visual", "patch_embed", "kernel")) == "visual.patch_embed.proj.weight"
