"""Flax CLIP against transformers' CLIPModel at a small random config."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import numpy as st_numpy
from transformers import CLIPConfig as HFConfig, CLIPModel

from dreamlite_jax.rewards import clip_model, clip_reward, clip_weights


def _hf_model(eos_token_id=99, act="quick_gelu"):
  torch.manual_seed(0)
  config = HFConfig(
      text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=16, hidden_act=act,
                       eos_token_id=eos_token_id, bos_token_id=98, pad_token_id=0),
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, image_size=32, patch_size=8, hidden_act=act),
      projection_dim=16)
  return CLIPModel(config).eval()


def _inputs():
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(3, 3, 32, 32)).astype(np.float32)
  ids = rng.integers(3, 97, size=(3, 10)).astype(np.int64)
  ids[:, 0] = 98
  ends = [9, 5, 7]
  mask = np.zeros_like(ids)
  for i, end in enumerate(ends):
    ids[i, end] = 99
    ids[i, end + 1:] = 0
    mask[i, :end + 1] = 1
  return pixels, ids, mask


def _reference(model, pixels, ids, mask):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                pixel_values=torch.tensor(pixels))
  return out.logits_per_image.numpy(), out.image_embeds.numpy(), out.text_embeds.numpy()


def _flax(config, params, pixels, ids, mask):
  model = clip_model.CLIP(config)
  x = jnp.asarray(pixels.transpose(0, 2, 3, 1))
  logits = model.apply({"params": params}, x, jnp.asarray(ids), jnp.asarray(mask))
  img = model.apply({"params": params}, x, method=clip_model.CLIP.image_features)
  txt = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                    method=clip_model.CLIP.text_features)
  norm = lambda v: np.asarray(v / jnp.linalg.norm(v, axis=-1, keepdims=True))
  return np.asarray(logits), norm(img), norm(txt)


@pytest.mark.parametrize("eos_token_id,act", [(99, "quick_gelu"), (2, "gelu")])
def test_transformers_directory_matches_clipmodel(tmp_path, eos_token_id, act):
  model = _hf_model(eos_token_id, act)
  model.save_pretrained(tmp_path)
  config, params = clip_weights.load_clip(str(tmp_path))
  pixels, ids, mask = _inputs()
  for ours, ref in zip(_flax(config, params, pixels, ids, mask),
                       _reference(model, pixels, ids, mask)):
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-4)


def _to_openclip(sd: dict) -> dict:
  """transformers names -> OpenCLIP names (the inverse of the loader's renaming)."""
  out = {}
  for tower, prefix in (("text_model", ""), ("vision_model", "visual.")):
    layers = sorted({int(k.split(".")[3]) for k in sd if k.startswith(f"{tower}.encoder.layers.")})
    for i in layers:
      src, dst = f"{tower}.encoder.layers.{i}", f"{prefix}transformer.resblocks.{i}"
      for kind in ("weight", "bias"):
        out[f"{dst}.attn.in_proj_{kind}"] = np.concatenate(
            [sd[f"{src}.self_attn.{n}.{kind}"] for n in ("q_proj", "k_proj", "v_proj")])
        out[f"{dst}.attn.out_proj.{kind}"] = sd[f"{src}.self_attn.out_proj.{kind}"]
        out[f"{dst}.ln_1.{kind}"] = sd[f"{src}.layer_norm1.{kind}"]
        out[f"{dst}.ln_2.{kind}"] = sd[f"{src}.layer_norm2.{kind}"]
        out[f"{dst}.mlp.c_fc.{kind}"] = sd[f"{src}.mlp.fc1.{kind}"]
        out[f"{dst}.mlp.c_proj.{kind}"] = sd[f"{src}.mlp.fc2.{kind}"]
  out["token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
  out["positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
  for kind in ("weight", "bias"):
    out[f"ln_final.{kind}"] = sd[f"text_model.final_layer_norm.{kind}"]
    out[f"visual.ln_pre.{kind}"] = sd[f"vision_model.pre_layrnorm.{kind}"]
    out[f"visual.ln_post.{kind}"] = sd[f"vision_model.post_layernorm.{kind}"]
  out["text_projection"] = sd["text_projection.weight"].T.copy()
  out["visual.proj"] = sd["visual_projection.weight"].T.copy()
  out["visual.class_embedding"] = sd["vision_model.embeddings.class_embedding"]
  out["visual.positional_embedding"] = sd["vision_model.embeddings.position_embedding.weight"]
  out["visual.conv1.weight"] = sd["vision_model.embeddings.patch_embedding.weight"]
  out["logit_scale"] = sd["logit_scale"]
  return out


def test_openclip_directory_matches_clipmodel(tmp_path):
  model = _hf_model(eos_token_id=2, act="gelu")  # OpenCLIP pools at argmax(ids), plain GELU
  sd = {k: v.numpy() for k, v in model.state_dict().items() if "position_ids" not in k}
  st_numpy.save_file(_to_openclip(sd), str(tmp_path / "open_clip_model.safetensors"))
  cfg = {"model_cfg": {"embed_dim": 16, "quick_gelu": False,
                       "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8,
                                      "head_width": 8, "mlp_ratio": 2.0},
                       "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32,
                                    "heads": 4, "layers": 2, "mlp_ratio": 2.0}}}
  (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
  config, params = clip_weights.load_clip(str(tmp_path))
  pixels, ids, mask = _inputs()
  for ours, ref in zip(_flax(config, params, pixels, ids, mask),
                       _reference(model, pixels, ids, mask)):
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-4)


def test_wrong_weights_fail_loudly(tmp_path):
  model = _hf_model()
  model.save_pretrained(tmp_path)
  tensors = st_numpy.load_file(str(tmp_path / "model.safetensors"))
  config, _ = clip_weights.load_clip(str(tmp_path))
  with pytest.raises(KeyError, match="missing CLIP tensor"):
    clip_weights.from_state_dict(config, {k: v for k, v in tensors.items()
                                          if "fc2" not in k})
  with pytest.raises(ValueError, match="do not belong"):
    clip_weights.from_state_dict(config, dict(tensors, extra=np.zeros(3)))
  with pytest.raises(FileNotFoundError, match="expected config.json"):
    clip_weights.load_clip(str(tmp_path.parent))


def test_clip_reward_is_differentiable_and_prefers_own_caption(tmp_path):
  import jax
  model = _hf_model()
  model.save_pretrained(tmp_path)
  config, params = clip_weights.load_clip(str(tmp_path))
  _, ids, mask = _inputs()
  reward = clip_reward.ClipReward(config, params, tokenize=lambda p: (ids[:len(p)], mask[:len(p)]))
  images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (3, 16, 16, 3)), jnp.float32)
  scores = reward(np.asarray(images), ["a", "b", "c"])
  assert scores.shape == (3,) and np.all(np.abs(scores) <= 1.0)
  grad = jax.grad(lambda x: reward.differentiable(x, ids, mask).sum())(images)
  assert np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad).sum()) > 0
