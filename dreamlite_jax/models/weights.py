"""Weights in diffusers naming: our Flax params <-> PyTorch state dicts / safetensors.

Our module names are the diffusers state-dict names with list indices written
`name_i` (Flax names can't hold dots), so the mapping is a handful of explicit
rules, not a table. Kernels change layout (Dense `[in, out]` <-> `[out, in]`,
Conv HWIO <-> OIHW); norm `scale` is torch's `weight`.

Loading is strict: every missing, unexpected and mis-shaped tensor is listed in
one `WeightsMismatchError`. Only safetensors are read (no pickle).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from dreamlite_jax.models.unet import DreamLiteUNet, UNetConfig
from dreamlite_jax.models.vae import TinyAutoencoder, VAEConfig

_LIST_NAMES = ("down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks",
               "downsamplers", "upsamplers", "layers", "conv")
_LIST_RE = re.compile(r"^(%s)_(\d+)$" % "|".join(_LIST_NAMES))
_SEGMENT_RENAMES = {"to_out": "to_out.0", "encoder_hid_proj": "encoder_hid_proj.0",
                    "encoder_hid_norm": "encoder_hid_proj.1"}
_FF_RENAMES = {"proj_in": "net.0.proj", "proj_out": "net.2"}


class WeightsMismatchError(ValueError):
  """A weight file does not fit the model; lists every offending tensor."""

  def __init__(self, source: str, missing=(), unexpected=(), mis_shaped=()):
    self.missing, self.unexpected, self.mis_shaped = list(missing), list(unexpected), list(mis_shaped)
    lines = [f"weights from {source} do not match the model:"]
    if self.missing:
      lines.append(f"  missing ({len(self.missing)}): " + ", ".join(self.missing[:50]))
    if self.unexpected:
      lines.append(f"  unexpected ({len(self.unexpected)}): " + ", ".join(self.unexpected[:50]))
    if self.mis_shaped:
      lines.append(f"  mis-shaped ({len(self.mis_shaped)}): " + ", ".join(
          f"{k} file {f} vs model {m}" for k, f, m in self.mis_shaped[:50]))
    super().__init__("\n".join(lines))


def torch_name(path: tuple[str, ...]) -> str:
  """Flax param path (e.g. `('down_blocks_0', 'resnets_1', 'conv1', 'kernel')`) -> diffusers key."""
  out = []
  for i, seg in enumerate(path[:-1]):
    if i > 0 and path[i - 1] == "ff" and seg in _FF_RENAMES:
      out.append(_FF_RENAMES[seg])
      continue
    match = _LIST_RE.match(seg)
    out.append(f"{match.group(1)}.{match.group(2)}" if match else _SEGMENT_RENAMES.get(seg, seg))
  leaf = path[-1]
  out.append("bias" if leaf == "bias" else "weight")
  return ".".join(out)


def to_torch_layout(array: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel" and array.ndim == 2:
    return np.ascontiguousarray(array.T)
  if leaf == "kernel" and array.ndim == 4:
    return np.ascontiguousarray(array.transpose(3, 2, 0, 1))
  return np.ascontiguousarray(array)


def from_torch_layout(array: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel" and array.ndim == 2:
    return np.ascontiguousarray(array.T)
  if leaf == "kernel" and array.ndim == 4:
    return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
  return np.ascontiguousarray(array)


def params_to_state_dict(params) -> dict[str, np.ndarray]:
  """Our params pytree -> `{diffusers key: array in torch layout}` (float32)."""
  flat = traverse_util.flatten_dict(nn.unbox(params))
  return {torch_name(path): to_torch_layout(np.asarray(v, np.float32), path[-1]) for path, v in flat.items()}


def params_from_state_dict(state_dict: Mapping[str, Any], abstract_params, source: str = "state dict",
                           dtype=jnp.float32):
  """`{diffusers key: array}` -> params shaped like `abstract_params` (arrays or ShapeDtypeStructs).

  Raises WeightsMismatchError naming every missing, unexpected and mis-shaped tensor.
  """
  flat = traverse_util.flatten_dict(nn.unbox(abstract_params))
  missing, mis_shaped, out, used = [], [], {}, set()
  for path, ref in flat.items():
    key = torch_name(path)
    if key not in state_dict:
      missing.append(key)
      continue
    used.add(key)
    value = from_torch_layout(np.asarray(state_dict[key], np.float32), path[-1])
    if tuple(value.shape) != tuple(ref.shape):
      mis_shaped.append((key, tuple(np.asarray(state_dict[key]).shape), tuple(to_torch_layout(
          np.zeros(ref.shape, np.float32), path[-1]).shape)))
      continue
    out[path] = jnp.asarray(value, dtype)
  unexpected = sorted(set(state_dict) - used)
  if missing or unexpected or mis_shaped:
    raise WeightsMismatchError(source, missing, unexpected, mis_shaped)
  return traverse_util.unflatten_dict(out)


def save_safetensors(params, path: str) -> None:
  """Writes params in diffusers naming and torch layout (loadable by diffusers)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  save_file(params_to_state_dict(params), path)


def load_safetensors(path: str, abstract_params, dtype=jnp.float32):
  """Reads a diffusers-named safetensors file into params shaped like `abstract_params`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weight file not found: {path}")
  if not path.endswith(".safetensors"):
    raise ValueError(f"{path}: only .safetensors weights are loaded (no pickle)")
  return params_from_state_dict(load_file(path), abstract_params, source=path, dtype=dtype)


# ----------------------------------------------------------------------------- shapes

def unet_example_inputs(config: UNetConfig, batch: int = 1, latent_hw=(8, 8), text_len: int = 8):
  """Zero inputs of the right shapes for `DreamLiteUNet` (canvas `[B, h, 2w, C]`)."""
  h, w = latent_hw
  return (jnp.zeros((batch, h, 2 * w, config.in_channels)), jnp.zeros((batch,)),
          jnp.zeros((batch, text_len, config.encoder_hid_dim)), jnp.ones((batch, text_len)),
          jnp.full((batch, 2), 8.0 * h))


def unet_abstract_params(config: UNetConfig):
  """Param shapes of the U-Net (no allocation), logical-partitioning boxes kept."""
  f = config.downsample_factor
  model = DreamLiteUNet(config)
  return jax.eval_shape(model.init, jax.random.key(0), *unet_example_inputs(config, 1, (f, f)))["params"]


def vae_abstract_params(config: VAEConfig):
  f = config.downsample_factor
  images = jnp.zeros((1, 2 * f, 2 * f, config.in_channels))
  return jax.eval_shape(TinyAutoencoder(config).init, jax.random.key(0), images)["params"]


def count_params(abstract_params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.unbox(abstract_params))))


# ----------------------------------------------------------------------------- diffusers configs

_DOWN_KINDS = {"DreamLiteCrossAttnNoSelfAttnDownBlock2D": "cross", "CrossAttnDownRemoveSelfAttnBlock2D": "cross",
               "DreamLiteCrossAttnDownBlock2D": "full", "CrossAttnDownBlock2D": "full",
               "DreamLiteDownBlock2D": "none", "DownBlock2D": "none"}
_UP_KINDS = {"DreamLiteCrossAttnNoSelfAttnUpBlock2D": "cross", "CrossAttnUpRemoveSelfAttnBlock2D": "cross",
             "CrossAttnUpRemoveSelfAttnBlock2DV1": "cross", "DreamLiteCrossAttnUpBlock2D": "full",
             "CrossAttnUpBlock2D": "full", "DreamLiteUpBlock2D": "none", "UpBlock2D": "none"}
_KIND_NAMES_DOWN = {"cross": "DreamLiteCrossAttnNoSelfAttnDownBlock2D", "full": "DreamLiteCrossAttnDownBlock2D",
                    "none": "DreamLiteDownBlock2D"}
_KIND_NAMES_UP = {"cross": "DreamLiteCrossAttnNoSelfAttnUpBlock2D", "full": "DreamLiteCrossAttnUpBlock2D",
                  "none": "DreamLiteUpBlock2D"}
_REQUIRED = {"encoder_hid_dim_type": "text_proj_rms", "addition_embed_type": "time",
             "use_linear_projection": True, "flip_sin_to_cos": True, "freq_shift": 0,
             "time_embedding_type": "positional", "act_fn": "silu", "mid_block_type": "UNetMidBlock2DCrossAttn"}


def _per_level(value, n):
  return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


def unet_config_from_diffusers(cfg: Mapping[str, Any], state_dict: Mapping[str, Any] | None = None) -> UNetConfig:
  """`DreamLiteUNetModel` config.json dict -> UNetConfig; fails naming unsupported fields.

  `ff_mult` is not always in the released config.json; when absent it is read
  from the feed-forward weight shapes in `state_dict`.
  """
  for key, want in _REQUIRED.items():
    got = cfg.get(key, want)
    if key == "mid_block_type" and got in ("DreamLiteUNetMidBlock2DCrossAttn",):
      continue
    if got != want:
      raise ValueError(f"unet config.json: {key}={got!r} is not supported (need {want!r})")
  if cfg.get("num_mid_layers", 1) != 1:
    raise ValueError(f"unet config.json: num_mid_layers={cfg['num_mid_layers']} is not supported (need 1)")
  channels = tuple(cfg["block_out_channels"])
  n = len(channels)
  try:
    down = tuple(_DOWN_KINDS[t] for t in cfg["down_block_types"])
    up = tuple(_UP_KINDS[t] for t in cfg["up_block_types"])
  except KeyError as e:
    raise ValueError(f"unet config.json: unsupported block type {e.args[0]!r}") from None
  heads = _per_level(cfg.get("attention_head_dim", 8), n)   # diffusers' name; these are head counts
  head_dims = {c // h for c, h in zip(channels, heads)}
  if len(head_dims) != 1:
    raise ValueError(f"unet config.json: head size differs across levels {sorted(head_dims)}")
  depth = _per_level(cfg.get("transformer_layers_per_block", 1), n)
  if cfg.get("reverse_transformer_layers_per_block") is not None:
    raise ValueError("unet config.json: reverse_transformer_layers_per_block is not supported")
  layers_per_block = cfg.get("layers_per_block", 2)
  if not isinstance(layers_per_block, int):
    raise ValueError("unet config.json: layers_per_block must be one int")
  qk_norm = cfg.get("qk_norm", "rms_norm")
  if qk_norm not in ("rms_norm", None):
    raise ValueError(f"unet config.json: qk_norm={qk_norm!r} is not supported (rms_norm or null)")
  ff_mult = cfg.get("ff_mult")
  if ff_mult is None:
    ff_mult = _infer_ff_mult(state_dict, channels) if state_dict is not None else 6
  return UNetConfig(
      in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4),
      block_out_channels=channels, down_kinds=down, up_kinds=up, layers_per_block=layers_per_block,
      transformer_depth=depth, mid_transformer_depth=depth[-1], heads=heads, head_dim=head_dims.pop(),
      kv_heads=cfg.get("num_kv_heads", 1), qk_norm=qk_norm is not None, ff_mult=float(ff_mult),
      separable_resblocks=cfg.get("use_sep_conv", True), norm_groups=cfg.get("norm_num_groups", 32),
      norm_eps=cfg.get("norm_eps", 1e-5), cross_attention_dim=cfg["cross_attention_dim"],
      encoder_hid_dim=cfg["encoder_hid_dim"],
      time_embed_dim=cfg.get("time_embedding_dim") or channels[0] * 4,
      addition_time_embed_dim=cfg["addition_time_embed_dim"])


def _infer_ff_mult(state_dict, channels) -> float:
  for key, value in state_dict.items():
    if key.endswith("ff.net.2.weight"):
      dim, inner = np.asarray(value).shape
      return inner / dim
  return 6.0


def unet_config_to_diffusers(config: UNetConfig) -> dict:
  """UNetConfig -> kwargs for diffusers `DreamLiteUNetModel(**kwargs)`."""
  return dict(
      in_channels=config.in_channels, out_channels=config.out_channels,
      block_out_channels=list(config.block_out_channels),
      down_block_types=[_KIND_NAMES_DOWN[k] for k in config.down_kinds],
      up_block_types=[_KIND_NAMES_UP[k] for k in config.up_kinds],
      mid_block_type="DreamLiteUNetMidBlock2DCrossAttn", layers_per_block=config.layers_per_block,
      transformer_layers_per_block=list(config.transformer_depth), attention_head_dim=list(config.heads),
      num_kv_heads=config.kv_heads, qk_norm="rms_norm" if config.qk_norm else None,
      use_sep_conv=config.separable_resblocks, ff_mult=config.ff_mult if config.ff_mult % 1 else int(config.ff_mult),
      norm_num_groups=config.norm_groups, norm_eps=config.norm_eps,
      cross_attention_dim=config.cross_attention_dim, encoder_hid_dim=config.encoder_hid_dim,
      encoder_hid_dim_type="text_proj_rms", addition_embed_type="time",
      addition_time_embed_dim=config.addition_time_embed_dim,
      projection_class_embeddings_input_dim=2 * config.addition_time_embed_dim,
      time_embedding_dim=config.time_embed_dim, use_linear_projection=True, flip_sin_to_cos=True,
      freq_shift=0, act_fn="silu")


def vae_config_to_diffusers(config: VAEConfig) -> dict:
  """VAEConfig -> kwargs for diffusers `AutoencoderTiny(**kwargs)`."""
  return dict(in_channels=config.in_channels, out_channels=config.in_channels,
              encoder_block_out_channels=list(config.encoder_channels),
              decoder_block_out_channels=list(config.decoder_channels),
              num_encoder_blocks=list(config.encoder_blocks), num_decoder_blocks=list(config.decoder_blocks),
              latent_channels=config.latent_channels, act_fn="relu", upsample_fn="nearest",
              scaling_factor=config.scaling_factor, shift_factor=config.shift_factor)


# ----------------------------------------------------------------------------- checkpoint dirs

def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"missing {path}")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON: {e}") from None


def _weight_file(directory: str) -> str:
  path = os.path.join(directory, "diffusion_pytorch_model.safetensors")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory} has no diffusion_pytorch_model.safetensors "
                            "(only safetensors weights are supported)")
  return path


def load_unet_dir(directory: str, dtype=jnp.float32) -> tuple[UNetConfig, Any]:
  """Loads `<dir>/config.json` + `diffusion_pytorch_model.safetensors` (diffusers layout)."""
  cfg = _read_json(os.path.join(directory, "config.json"))
  state_dict = load_file(_weight_file(directory))
  config = unet_config_from_diffusers(cfg, state_dict)
  params = params_from_state_dict(state_dict, unet_abstract_params(config), source=directory, dtype=dtype)
  return config, params


def load_vae_dir(directory: str, dtype=jnp.float32) -> tuple[VAEConfig, Any]:
  """Loads an `AutoencoderTiny` directory (config.json + safetensors)."""
  config = VAEConfig.from_diffusers(_read_json(os.path.join(directory, "config.json")))
  state_dict = load_file(_weight_file(directory))
  params = params_from_state_dict(state_dict, vae_abstract_params(config), source=directory, dtype=dtype)
  return config, params


def save_unet_dir(directory: str, config: UNetConfig, params) -> None:
  """Writes a diffusers-layout U-Net directory that `DreamLiteUNetModel.from_pretrained` reads."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump({"_class_name": "DreamLiteUNetModel", **unet_config_to_diffusers(config)}, f, indent=2)
  save_safetensors(params, os.path.join(directory, "diffusion_pytorch_model.safetensors"))


def save_vae_dir(directory: str, config: VAEConfig, params) -> None:
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump({"_class_name": "AutoencoderTiny", **vae_config_to_diffusers(config)}, f, indent=2)
  save_safetensors(params, os.path.join(directory, "diffusion_pytorch_model.safetensors"))


def load_dreamlite_dir(directory: str, dtype=jnp.float32):
  """A released DreamLite checkpoint in diffusers layout -> `{'unet': (cfg, params), 'vae': (cfg, params)}`."""
  out = {"unet": load_unet_dir(os.path.join(directory, "unet"), dtype)}
  if os.path.isdir(os.path.join(directory, "vae")):
    out["vae"] = load_vae_dir(os.path.join(directory, "vae"), dtype)
  return out
