"""Our Flax language stack vs transformers' Qwen3-VL text model at a tiny random config."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxpr_walk import jaxpr_eqns
from hf_reference import VOCAB, last_layer_output, rel_err
from dreamlite_jax.models.qwen3_vl import Qwen3VLConfig, Qwen3VLEncoder
from dreamlite_jax.models.text_encoder import Qwen3TextConfig, mrope_axis_selector
from dreamlite_jax.models.text_weights import load_qwen3_vl

TOL = 1e-4


def _batch():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, VOCAB - 30, size=(2, 11)).astype(np.int32)
  mask = np.ones((2, 11), np.int32)
  mask[1, 6:] = 0                                      # right padding on the second row
  return ids, mask


def test_text_stack_matches_transformers_before_and_after_final_norm(hf_vl):
  model, directory = hf_vl
  ids, mask = _batch()
  ref_pre, ref_post = last_layer_output(model, input_ids=torch.tensor(ids, dtype=torch.long),
                                        attention_mask=torch.tensor(mask))
  for final_norm, ref in ((False, ref_pre), (True, ref_post)):
    config, params = load_qwen3_vl(directory, use_vision=False, final_norm=final_norm)
    ours = jax.jit(Qwen3VLEncoder(config).apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    err = rel_err(ours, ref)
    assert err <= TOL, f"final_norm={final_norm}: relative max error {err:.2e}"
  # Padding must not leak into real tokens: row 1's real tokens equal a run on that prefix alone.
  alone = jax.jit(Qwen3VLEncoder(config).apply)({"params": params}, jnp.asarray(ids[1:, :6]), jnp.asarray(mask[1:, :6]))
  np.testing.assert_allclose(np.asarray(alone)[0], np.asarray(ours)[1, :6], atol=1e-5)


def test_text_config_from_hf_matches_fields(hf_vl):
  model, _ = hf_vl
  cfg = Qwen3TextConfig.from_hf_config(model.config.to_dict())
  assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (64, 3, 4, 2, 16)
  assert cfg.mrope_section == (2, 3, 3) and cfg.rope_theta == 5e6


def test_mrope_selector_matches_interleaved_layout():
  # Qwen3-VL-2B: 64 frequencies, sections (24, 20, 20): h at 1,4,..,58, w at 2,5,..,59, t elsewhere.
  sel = mrope_axis_selector(128, (24, 20, 20))
  axis = sel.argmax(0)
  assert sel.sum(0).tolist() == [1.0] * 64
  assert list(np.nonzero(axis == 1)[0]) == list(range(1, 60, 3))
  assert list(np.nonzero(axis == 2)[0]) == list(range(2, 60, 3))
  assert (axis == 0).sum() == 24


def test_text_only_forward_lowers_with_rank_at_most_4():
  config = Qwen3TextConfig.tiny()
  vl = Qwen3VLConfig(text=config, vision=None)
  model = Qwen3VLEncoder(vl)
  ids = jnp.zeros((1, 16), jnp.int32)
  mask = jnp.ones((1, 16), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, mask))["params"]
  embeds = jax.ShapeDtypeStruct((1, 16, config.hidden_size), jnp.float32)

  def forward(p, e, m):
    return model.apply({"params": p}, e, m, method=Qwen3VLEncoder.forward_embeddings)

  jaxpr = jax.make_jaxpr(jax.jit(forward))(params, embeds, mask)
  eqns = list(jaxpr_eqns(jaxpr.jaxpr))
  ranks = {(e.primitive.name, v.aval.ndim) for e in eqns for v in e.outvars if v.aval.ndim > 4}
  assert not ranks, f"rank > 4 tensors in the text-only forward: {ranks}"
  prims = {e.primitive.name for e in eqns}
  assert not prims & {"gather", "scatter", "scatter-add", "while", "cond"}, prims
  assert "dot_general" in prims                     # the check saw the real graph
  full = jax.make_jaxpr(lambda p, i, m: model.apply({"params": p}, i, m))(params, ids, mask)
  gathers = [e for e in jaxpr_eqns(full.jaxpr) if e.primitive.name == "gather"]
  assert len(gathers) == 1, "only the embedding lookup may gather"


def test_released_style_config_gives_the_2b_presets():
  # Qwen3-VL-2B's config.json as written by transformers 4.57 (rope_scaling + top-level rope_theta).
  cfg = {"text_config": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
                         "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
                         "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 5000000,
                         "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                                          "rope_type": "default"}, "tie_word_embeddings": True},
         "vision_config": {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16,
                           "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2,
                           "out_hidden_size": 2048, "num_position_embeddings": 2304,
                           "deepstack_visual_indexes": [5, 11, 17], "hidden_act": "gelu_pytorch_tanh"},
         "image_token_id": 151655, "vision_start_token_id": 151652}
  assert Qwen3VLConfig.from_hf_config(cfg) == Qwen3VLConfig.qwen3_vl_2b()
  cfg["text_config"]["rope_scaling"]["mrope_interleaved"] = False
  with pytest.raises(ValueError, match="interleaved"):
    Qwen3VLConfig.from_hf_config(cfg)
