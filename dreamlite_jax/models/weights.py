"""Weights in diffusers naming: our Flax params <-> PyTorch state dicts / safetensors.

Our module names are the diffusers state-dict names with list indices written
`name_i` (Flax names can't hold dots), so the mapping is a handful of explicit
rules, not a table. Kernels change layout (Dense `[in, out]` <-> `[out, in]`,
Conv HWIO <-> OIHW); norm `scale` is torch's `weight`.

Loading is strict: every missing, unexpected and mis-shaped tensor is listed in
one `WeightsMismatchError`. Only safetensors are read (no pickle), in any float
dtype the file holds (fp32, fp16, bf16); params are made in the dtype asked for.

Loading a folder (`load_unet_dir`, `load_vae_dir`, `load_dreamlite_dir`) reports
through `log` (default: this module's logger at INFO) what it found where it is not
what our code writes: the weight dtypes and files it read, config fields it did not
find and the value it assumed (e.g. `ff_mult` from the weight shapes), scheduler
settings, and files of the folder it does not use.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import re
import struct
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from dreamlite_jax.diffusion import flow
from dreamlite_jax.models.unet import DreamLiteUNet, UNetConfig
from dreamlite_jax.models.vae import TinyAutoencoder, VAEConfig

_LIST_NAMES = ("down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks",
               "downsamplers", "upsamplers", "layers", "conv")
_LIST_RE = re.compile(r"^(%s)_(\d+)$" % "|".join(_LIST_NAMES))
_SEGMENT_RENAMES = {"to_out": "to_out.0", "encoder_hid_proj": "encoder_hid_proj.0",
                    "encoder_hid_norm": "encoder_hid_proj.1"}
_FF_RENAMES = {"proj_in": "net.0.proj", "proj_out": "net.2"}

logger = logging.getLogger(__name__)
Log = Callable[[str], None]


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


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
                       "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """Every tensor of a `.safetensors` file, in its stored dtype (bf16 included, which
  `safetensors.numpy` cannot read), and `{dtype name: tensor count}`."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
  except (struct.error, ValueError) as e:
    raise ValueError(f"{path} is not a safetensors file: {e}") from None
  tensors, dtypes = {}, collections.Counter()
  base = 8 + n
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
    if dtype is None:
      raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, which is not supported")
    start, end = info["data_offsets"]
    tensors[name] = np.frombuffer(data, dtype, count=(end - start) // np.dtype(dtype).itemsize,
                                  offset=base + start).reshape(info["shape"])
    dtypes[np.dtype(dtype).name] += 1
  return tensors, dict(dtypes)


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
  return params_from_state_dict(read_safetensors(path)[0], abstract_params, source=path, dtype=dtype)


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


# Fields of `DreamLiteUNetModel`'s config.json we read, with the value its constructor
# takes when the file omits one (what diffusers would build).
_UNET_DEFAULTS = {"in_channels": 4, "out_channels": 4, "layers_per_block": 2,
                  "attention_head_dim": 8, "transformer_layers_per_block": 1, "num_kv_heads": 1,
                  "qk_norm": "rms_norm", "use_sep_conv": True, "norm_num_groups": 32,
                  "norm_eps": 1e-5, "time_embedding_dim": "4 x block_out_channels[0]"}
# Constructor fields our U-Net has no switch for: each must hold this (diffusers') default.
_UNET_FIXED = {"center_input_sample": False, "only_cross_attention": False, "downsample_padding": 1,
               "mid_block_scale_factor": 1, "dual_cross_attention": False, "class_embed_type": None,
               "num_class_embeds": None, "resnet_time_scale_shift": "default",
               "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
               "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
               "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
               "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
               "num_attention_heads": None, "cross_attention_norm": None}
# Fields that do not change the network's weights or outputs in float32 (bookkeeping, the
# default sample size, training-only dropout, fp16 upcasting, a size implied by others).
_UNET_NOT_READ = {"_class_name", "_diffusers_version", "_name_or_path", "sample_size", "dropout",
                  "upcast_attention", "projection_class_embeddings_input_dim",
                  "addition_embed_type_num_heads", "reverse_transformer_layers_per_block",
                  "num_mid_layers", "block_out_channels", "down_block_types", "up_block_types",
                  "cross_attention_dim", "encoder_hid_dim", "addition_time_embed_dim", "ff_mult"}


def unet_config_from_diffusers(cfg: Mapping[str, Any], state_dict: Mapping[str, Any] | None = None,
                               log: Log | None = None) -> UNetConfig:
  """`DreamLiteUNetModel` config.json dict -> UNetConfig; fails naming unsupported fields.

  `ff_mult` is not always in the released config.json; when absent it is read
  from the feed-forward weight shapes in `state_dict` (else diffusers' default, 6).
  `log` gets one line per field the dict lacks (with the value assumed) and per
  field it holds that no DreamLite U-Net reads (ignored).
  """
  log = log or (lambda message: None)
  for key, default in _UNET_DEFAULTS.items():
    if key not in cfg:
      log(f"unet config.json has no {key}: assumed {default} (DreamLiteUNetModel's default)")
  for key, want in _UNET_FIXED.items():
    if cfg.get(key, want) != want:
      raise ValueError(f"unet config.json: {key}={cfg[key]!r} is not supported (need {want!r})")
  for key, want in _REQUIRED.items():
    if key not in cfg:
      log(f"unet config.json has no {key}: assumed {want!r} (DreamLite's)")
    got = cfg.get(key, want)
    if key == "mid_block_type" and got in ("DreamLiteUNetMidBlock2DCrossAttn",):
      continue
    if got != want:
      raise ValueError(f"unet config.json: {key}={got!r} is not supported (need {want!r})")
  known = set(_UNET_DEFAULTS) | set(_UNET_FIXED) | set(_UNET_NOT_READ) | set(_REQUIRED)
  unknown = sorted(k for k in cfg if k not in known)
  if unknown:
    log(f"unet config.json fields that DreamLiteUNetModel does not take, ignored: {unknown}")
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
    inferred = _infer_ff_mult(state_dict) if state_dict is not None else None
    ff_mult = 6 if inferred is None else inferred
    log(f"unet config.json has no ff_mult: assumed {ff_mult:g} " + (
        "(from the feed-forward weight shapes)" if inferred is not None
        else "(DreamLiteUNetModel's default; no feed-forward weights to read it from)"))
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


def _infer_ff_mult(state_dict) -> float | None:
  for key, value in state_dict.items():
    if key.endswith("ff.net.2.weight"):
      dim, inner = np.asarray(value).shape
      return inner / dim
  return None


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


WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_VAE_DEFAULTS = {"in_channels": 3, "latent_channels": 4, "encoder_block_out_channels": "(64,) * 4",
                 "decoder_block_out_channels": "(64,) * 4", "num_encoder_blocks": "(1, 3, 3, 3)",
                 "num_decoder_blocks": "(3, 3, 3, 1)", "scaling_factor": 1.0, "shift_factor": 0.0}


def _default_log(message: str) -> None:
  logger.info(message)


def _weight_files(directory: str, log: Log) -> list[str]:
  """The safetensors file(s) of a diffusers model folder: `diffusion_pytorch_model.safetensors`,
  else the shards its `.safetensors.index.json` lists, else the one variant file
  (`diffusion_pytorch_model.fp16.safetensors`)."""
  plain = os.path.join(directory, WEIGHTS_NAME)
  if os.path.isfile(plain):
    return [plain]
  index = plain + ".index.json"
  if os.path.isfile(index):
    shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
    if not shards:
      raise ValueError(f"{index} lists no weight files")
    log(f"{directory}: weights sharded over {len(shards)} files ({os.path.basename(index)})")
    return [os.path.join(directory, f) for f in shards]
  variants = sorted(f for f in os.listdir(directory) if f.startswith("diffusion_pytorch_model.")
                    and f.endswith(".safetensors")) if os.path.isdir(directory) else []
  if len(variants) == 1:
    log(f"{directory}: no {WEIGHTS_NAME}; read the variant {variants[0]}")
    return [os.path.join(directory, variants[0])]
  found = f" (found {variants}; keep one)" if variants else ""
  raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME}{found} (only safetensors weights "
                          "are read)")


def read_weight_dir(directory: str, log: Log | None = None) -> dict[str, np.ndarray]:
  """The state dict of a diffusers model folder, with one line to `log` about its files and
  dtypes when they are not our single float32 file, and one naming files it does not read."""
  log = log or _default_log
  files = _weight_files(directory, log)
  state_dict, dtypes = {}, collections.Counter()
  for path in files:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"missing weight shard {path}")
    tensors, counts = read_safetensors(path)
    state_dict.update(tensors)
    dtypes.update(counts)
  if set(dtypes) != {"float32"}:
    found = ", ".join(f"{n} {d}" for d, n in sorted(dtypes.items()))
    log(f"{directory}: weights stored as {found}; converted to the model's param dtype")
  used = {os.path.basename(f) for f in files} | {"config.json", WEIGHTS_NAME + ".index.json"}
  extra = sorted(f for f in os.listdir(directory) if f not in used)
  if extra:
    log(f"{directory}: not read: {extra}")
  return state_dict


def load_unet_dir(directory: str, dtype=jnp.float32, log: Log | None = None,
                  abstract_params: Any = None) -> tuple[UNetConfig, Any]:
  """Loads `<dir>/config.json` + `diffusion_pytorch_model.safetensors` (diffusers layout);
  `log` gets what the folder holds that our code does not write (module docstring).

  The params are shaped like `abstract_params` when given (e.g. a train state's, which
  then must fit: `WeightsMismatchError` otherwise), else like the folder config's U-Net.
  """
  log = log or _default_log
  cfg = _read_json(os.path.join(directory, "config.json"))
  state_dict = read_weight_dir(directory, log)
  config = unet_config_from_diffusers(cfg, state_dict, log=lambda m: log(f"{directory}: {m}"))
  if abstract_params is None:
    abstract_params = unet_abstract_params(config)
  params = params_from_state_dict(state_dict, abstract_params, source=directory, dtype=dtype)
  return config, params


def load_vae_dir(directory: str, dtype=jnp.float32, log: Log | None = None
                 ) -> tuple[VAEConfig, Any]:
  """Loads an `AutoencoderTiny` directory (config.json + safetensors)."""
  log = log or _default_log
  cfg = _read_json(os.path.join(directory, "config.json"))
  missing = {k: v for k, v in _VAE_DEFAULTS.items() if k not in cfg}
  if missing:
    log(f"{directory}/config.json has no " + ", ".join(f"{k} (assumed {v})"
                                                      for k, v in missing.items()))
  config = VAEConfig.from_diffusers(cfg)
  state_dict = read_weight_dir(directory, log)
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


# ----------------------------------------------------------------------------- DreamLite folders

MODEL_INDEX = "model_index.json"
PIPELINE_CLASSES = ("DreamLitePipeline", "DreamLiteMobilePipeline")
# The components a DreamLite folder may hold, and what reads each (the rest is reported unused).
COMPONENTS = {"unet": "DreamLiteUNetModel", "vae": "AutoencoderTiny",
              "text_encoder": "Qwen3VLForConditionalGeneration", "tokenizer": "Qwen2Tokenizer",
              "scheduler": "FlowMatchEulerDiscreteScheduler", "processor": "Qwen3VLProcessor"}
# FlowMatchEulerDiscreteScheduler settings our sampler does not implement: each must hold this.
_SCHEDULER_FIXED = {"time_shift_type": "exponential", "shift_terminal": None, "invert_sigmas": False,
                    "use_karras_sigmas": False, "use_exponential_sigmas": False,
                    "use_beta_sigmas": False, "stochastic_sampling": False,
                    "num_train_timesteps": flow.NUM_TRAIN_TIMESTEPS}
# The scheduler's own defaults (what `from_pretrained` fills in for a missing field).
_SCHEDULER_DEFAULTS = {"use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15,
                       "base_image_seq_len": 256, "max_image_seq_len": 4096, "shift": 1.0}


def is_dreamlite_dir(path: str) -> bool:
  """Whether `path` is a diffusers-format DreamLite folder (`model_index.json` or `unet/`)."""
  return os.path.isfile(os.path.join(path, MODEL_INDEX)) or os.path.isfile(
      os.path.join(path, "unet", "config.json"))


def is_unet_dir(path: str) -> bool:
  """Whether `path` is a diffusers U-Net folder (config.json of a `DreamLiteUNetModel`, or
  without a class name, beside safetensors weights)."""
  config = os.path.join(path, "config.json")
  if not os.path.isfile(config) or not any(
      f.startswith("diffusion_pytorch_model.") and ".safetensors" in f for f in os.listdir(path)):
    return False
  return _read_json(config).get("_class_name", "DreamLiteUNetModel") == "DreamLiteUNetModel"


def find_unet_dir(path: str) -> str | None:
  """The U-Net folder a path names: `<path>/unet` of a DreamLite folder, `path` itself when
  it is a diffusers model folder, else None (e.g. a training run)."""
  if not os.path.isdir(path):
    return None
  if is_dreamlite_dir(path):
    return os.path.join(path, "unet")
  return path if is_unet_dir(path) else None


def read_model_index(directory: str, log: Log | None = None) -> dict:
  """`model_index.json` of a DreamLite folder ({} when absent), with one line to `log` per
  thing our code does not use: another pipeline class, components it does not read,
  component folders that are missing or unlisted."""
  log = log or _default_log
  path = os.path.join(directory, MODEL_INDEX)
  if not os.path.isfile(path):
    log(f"{directory}: no {MODEL_INDEX}; components read from its sub-folders")
    index = {}
  else:
    index = _read_json(path)
    cls = index.get("_class_name")
    if cls not in PIPELINE_CLASSES:
      log(f"{path}: _class_name {cls!r} is not one of {PIPELINE_CLASSES}; read as DreamLite")
  listed = {k: v for k, v in index.items() if not k.startswith("_")}
  for name, value in sorted(listed.items()):
    if name not in COMPONENTS:
      log(f"{path}: component {name!r} ({value}) is not read")
    elif value in (None, [None, None]) or (isinstance(value, list) and value[0] is None):
      continue
    elif not os.path.isdir(os.path.join(directory, name)):
      log(f"{path}: lists {name!r} but {directory}/{name}/ is missing")
  extra = sorted(f for f in os.listdir(directory)
                 if f != MODEL_INDEX and f not in COMPONENTS and not f.startswith("."))
  if extra:
    log(f"{directory}: not read: {extra}")
  if os.path.isdir(os.path.join(directory, "processor")):
    log(f"{directory}/processor/ is not read: edit sources are resized to the encoder's image "
        f"size with Lanczos and patchified by our vision tower, as Qwen3VLProcessor does")
  return index


def read_scheduler_dir(directory: str, log: Log | None = None) -> flow.ShiftConfig:
  """`scheduler/scheduler_config.json` -> the sampler's `ShiftConfig`; fails naming any
  setting our Euler sampler does not implement, and logs each field it assumed."""
  log = log or _default_log
  path = os.path.join(directory, "scheduler_config.json")
  cfg = _read_json(path)
  if cfg.get("_class_name", "FlowMatchEulerDiscreteScheduler") != "FlowMatchEulerDiscreteScheduler":
    raise ValueError(f"{path}: _class_name {cfg['_class_name']!r} is not supported "
                     f"(need FlowMatchEulerDiscreteScheduler)")
  for key, want in _SCHEDULER_FIXED.items():
    if cfg.get(key, want) != want:
      raise ValueError(f"{path}: {key}={cfg[key]!r} is not supported (need {want!r})")
  missing = {k: v for k, v in _SCHEDULER_DEFAULTS.items() if k not in cfg}
  if missing:
    log(f"{path} has no " + ", ".join(f"{k} (assumed {v!r}, the scheduler's default)"
                                      for k, v in missing.items()))
  values = {**_SCHEDULER_DEFAULTS, **{k: cfg[k] for k in _SCHEDULER_DEFAULTS if k in cfg}}
  shift = flow.ShiftConfig(dynamic=bool(values["use_dynamic_shifting"]),
                           base_seq_len=int(values["base_image_seq_len"]),
                           max_seq_len=int(values["max_image_seq_len"]),
                           base_shift=float(values["base_shift"]),
                           max_shift=float(values["max_shift"]), shift=float(values["shift"]))
  if shift != flow.ShiftConfig():
    log(f"{path}: sigma shift {shift} (DreamLite's default is {flow.ShiftConfig()})")
  known = set(_SCHEDULER_FIXED) | set(_SCHEDULER_DEFAULTS) | {"_class_name", "_diffusers_version"}
  unknown = sorted(k for k in cfg if k not in known)
  if unknown:
    log(f"{path}: fields not read: {unknown}")
  return shift


def load_dreamlite_dir(directory: str, dtype=jnp.float32, log: Log | None = None) -> dict:
  """A released DreamLite checkpoint in diffusers layout -> `{'unet': (cfg, params),
  'vae': (cfg, params), 'shift': ShiftConfig}` ('vae' when the folder has one; 'shift'
  from `scheduler/`, else DreamLite's). `log` gets what the folder holds that our code
  does not expect, and what was assumed (module docstring)."""
  log = log or _default_log
  read_model_index(directory, log)
  out = {"unet": load_unet_dir(os.path.join(directory, "unet"), dtype, log)}
  if os.path.isdir(os.path.join(directory, "vae")):
    out["vae"] = load_vae_dir(os.path.join(directory, "vae"), dtype, log)
  scheduler = os.path.join(directory, "scheduler")
  if os.path.isdir(scheduler):
    out["shift"] = read_scheduler_dir(scheduler, log)
  else:
    log(f"{directory}: no scheduler/; assumed DreamLite's sigma shift {flow.ShiftConfig()}")
    out["shift"] = flow.ShiftConfig()
  return out
