"""Loads CLIP weights from local safetensors: transformers `CLIPModel` or OpenCLIP layouts.

A directory with `config.json` + `model.safetensors` is read as transformers
`CLIPModel`; one with `open_clip_config.json` + `open_clip_model.safetensors`
(the OpenCLIP hub layout) is renamed to transformers names first (fused
`in_proj_weight` split into q/k/v, `proj` matrices transposed). Every Flax
parameter must be found with the right shape; leftover tensors are an error too,
so a wrong file never loads silently. Pickle files are never read.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from safetensors import numpy as st_numpy

from dreamlite_jax.rewards import clip_model


def _torch_key(path: tuple[str, ...]) -> tuple[str, str]:
  """Flax param path -> (transformers state-dict key, transform: 'T', 'conv' or '')."""
  *mods, leaf = path
  mods = [re.sub(r"^layers_(\d+)$", r"layers.\1", m) for m in mods]
  if mods[:1] in (["text_model"], ["vision_model"]) and len(mods) > 1 and mods[1] in (
      "token_embedding", "position_embedding", "patch_embedding"):
    mods.insert(1, "embeddings")
  if mods == ["vision_model"] and leaf == "class_embedding":
    return "vision_model.embeddings.class_embedding", ""
  if mods and mods[-1] in ("fc1", "fc2"):
    mods.insert(len(mods) - 1, "mlp")
  name = ".".join(mods)
  if leaf == "embedding":
    return f"{name}.weight", ""
  if leaf == "kernel":
    return f"{name}.weight", "conv" if mods[-1] == "patch_embedding" else "T"
  if leaf == "scale":
    return f"{name}.weight", ""
  if leaf == "bias":
    return f"{name}.bias", ""
  return (f"{name}.{leaf}" if name else leaf), ""


def from_state_dict(config: clip_model.CLIPConfig, tensors: dict[str, np.ndarray],
                    source: str = "state dict") -> Any:
  """Flax params of `CLIP(config)` from a transformers-named state dict (numpy)."""
  abstract = jax.eval_shape(lambda: clip_model.init_params(config, jax.random.PRNGKey(0)))
  flat = traverse_util.flatten_dict(abstract)
  out, used = {}, set()
  for path, want in flat.items():
    key, transform = _torch_key(path)
    if key not in tensors:
      raise KeyError(f"{source}: missing CLIP tensor {key!r} (for {'/'.join(path)})")
    value = np.asarray(tensors[key], np.float32)
    if transform == "T":
      value = value.T
    elif transform == "conv":
      value = value.transpose(2, 3, 1, 0)  # [O, I, kh, kw] -> [kh, kw, I, O]
    if value.shape != want.shape:
      raise ValueError(f"{source}: {key} has shape {value.shape} after conversion, "
                       f"expected {want.shape}")
    out[path] = value
    used.add(key)
  ignored = {k for k in tensors if k.endswith("position_ids")}
  extra = sorted(set(tensors) - used - ignored)
  if extra:
    raise ValueError(f"{source}: {len(extra)} tensors do not belong to CLIP({config}): {extra[:5]}")
  return traverse_util.unflatten_dict(out)


def openclip_to_transformers(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames an OpenCLIP state dict (numpy) to transformers `CLIPModel` names."""
  out = {}
  for key, value in tensors.items():
    if key == "attn_mask" or key.endswith(".attn_mask"):
      continue
    tower, rest = ("vision_model", key[len("visual."):]) if key.startswith("visual.") else (
        "text_model", key)
    m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)$", rest)
    if m:
      prefix = f"{tower}.encoder.layers.{m.group(1)}"
      sub = m.group(2)
      if sub in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = "weight" if sub.endswith("weight") else "bias"
        for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
          out[f"{prefix}.self_attn.{name}.{kind}"] = part
        continue
      sub = (sub.replace("attn.out_proj", "self_attn.out_proj").replace("ln_1", "layer_norm1")
             .replace("ln_2", "layer_norm2").replace("mlp.c_fc", "mlp.fc1")
             .replace("mlp.c_proj", "mlp.fc2"))
      out[f"{prefix}.{sub}"] = value
      continue
    renames = {
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
        "logit_scale": "logit_scale",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    }
    if key in renames:
      out[renames[key]] = value
    elif key == "text_projection":
      out["text_projection.weight"] = np.asarray(value).T  # OpenCLIP: x @ proj
    elif key == "visual.proj":
      out["visual_projection.weight"] = np.asarray(value).T
    else:
      raise ValueError(f"unknown OpenCLIP tensor {key!r}")
  return out


def openclip_config(model_cfg: dict) -> clip_model.CLIPConfig:
  """CLIPConfig from OpenCLIP's `model_cfg` (embed_dim, vision_cfg, text_cfg, quick_gelu)."""
  vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
  act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
  vw = vision["width"]
  return clip_model.CLIPConfig(
      text=clip_model.CLIPTowerConfig(
          hidden_size=text["width"], intermediate_size=int(text["width"] * text.get("mlp_ratio", 4.0)),
          num_hidden_layers=text["layers"], num_attention_heads=text["heads"], hidden_act=act,
          vocab_size=text.get("vocab_size", 49408),
          max_position_embeddings=text.get("context_length", 77),
          eos_token_id=2),  # OpenCLIP pools at argmax(ids): the end-of-text token has the top id
      vision=clip_model.CLIPTowerConfig(
          hidden_size=vw, intermediate_size=int(vw * vision.get("mlp_ratio", 4.0)),
          num_hidden_layers=vision["layers"], num_attention_heads=vw // vision.get("head_width", 64),
          hidden_act=act, image_size=vision["image_size"], patch_size=vision["patch_size"]),
      projection_dim=model_cfg["embed_dim"])


def load_clip(path: str) -> tuple[clip_model.CLIPConfig, Any]:
  """(config, params) from a local transformers or OpenCLIP directory (see module doc)."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"CLIP weights directory not found: {path}")
  hf_config, hf_weights = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
  oc_config = os.path.join(path, "open_clip_config.json")
  oc_weights = os.path.join(path, "open_clip_model.safetensors")
  if os.path.isfile(hf_config) and os.path.isfile(hf_weights):
    with open(hf_config) as f:
      config = clip_model.CLIPConfig.from_transformers(json.load(f))
    return config, from_state_dict(config, st_numpy.load_file(hf_weights), hf_weights)
  if os.path.isfile(oc_config) and os.path.isfile(oc_weights):
    with open(oc_config) as f:
      raw = json.load(f)
    if "model_cfg" not in raw:
      raise ValueError(f"{oc_config}: no 'model_cfg' section")
    config = openclip_config(raw["model_cfg"])
    tensors = openclip_to_transformers(st_numpy.load_file(oc_weights))
    return config, from_state_dict(config, tensors, oc_weights)
  raise FileNotFoundError(f"{path}: expected config.json + model.safetensors (transformers) or "
                          f"open_clip_config.json + open_clip_model.safetensors (OpenCLIP)")
