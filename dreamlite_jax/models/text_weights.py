"""Loads a local Qwen3-VL checkpoint (transformers naming, safetensors) into our Flax params.

A checkpoint directory holds `config.json` and either `model.safetensors` or
shards listed in `model.safetensors.index.json`. Every expected tensor must be
present with the right shape and every tensor in the files must be used (the LM
head is known to be unused, so is the final norm when `final_norm=False`, so is
the vision tower when it is off). Anything else is one `CheckpointError` listing all
missing, unexpected and mis-shaped tensors. Loading can cast to bf16 and place
each tensor straight onto its sharding when a mesh is given.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open

from dreamlite_jax.models.qwen3_vl import Qwen3VLConfig, Qwen3VLEncoder
from dreamlite_jax.training.mesh import logical_shardings

# Tensors a checkpoint may hold that DreamLite never reads.
KNOWN_UNUSED = ("lm_head.weight",)
_LIST_LIMIT = 20


class CheckpointError(ValueError):
  """A checkpoint directory does not match the model (names every offending tensor)."""


def canonical_name(name: str) -> str:
  """transformers tensor name -> `language_model.*` / `visual.*` / `lm_head.weight`.

  Accepts Qwen3VLForConditionalGeneration (`model.language_model.*`), Qwen3VLModel
  (`language_model.*`) and Qwen3VLTextModel (`layers.*`, `embed_tokens.*`, `norm.*`).
  """
  if name.startswith("model."):
    name = name[len("model."):]
  if name.split(".", 1)[0] in ("layers", "embed_tokens", "norm"):
    name = "language_model." + name
  return name


def hf_name(path: tuple[str, ...]) -> str:
  """Our param path (e.g. `('language_model', 'layers_0', 'self_attn', 'q_proj', 'kernel')`) -> HF name."""
  parts = []
  for i, p in enumerate(path):
    last = i == len(path) - 1
    if m := re.fullmatch(r"(layers|blocks)_(\d+)", p):
      parts += [m.group(1), m.group(2)]
    elif m := re.fullmatch(r"deepstack_merger_(\d+)", p):
      parts += ["deepstack_merger_list", m.group(1)]
    elif p in ("qkv", "proj") and path[i - 1].startswith("blocks_"):
      parts += ["attn", p]
    elif p in ("linear_fc1", "linear_fc2") and path[i - 1].startswith("blocks_"):
      parts += ["mlp", p]
    elif p == "patch_embed":
      parts += ["patch_embed", "proj"]
    elif last and p in ("kernel", "scale"):
      parts.append("weight")
    elif last and p in ("embed_tokens", "pos_embed"):
      parts += [p, "weight"]
    else:
      parts.append(p)
  return ".".join(parts)


def to_ours(path: tuple[str, ...], tensor: np.ndarray) -> np.ndarray:
  """Converts one HF tensor to our layout (Linear `[out, in]` -> kernel `[in, out]`, Conv3d flattened)."""
  if path[-1] == "kernel":
    if tensor.ndim == 5:                                   # Conv3d [hidden, C, T, P, P]
      tensor = tensor.reshape(tensor.shape[0], -1)
    return tensor.T
  return tensor


def _hf_shape(path, shape):
  if path[-1] == "kernel":
    return tuple(reversed(shape))
  return tuple(shape)


class _TensorFiles:
  """Name -> (file, original name) over one or many safetensors files."""

  def __init__(self, directory: str):
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: no 'weight_map' object")
      files = {os.path.join(directory, v) for v in weight_map.values()}
    elif os.path.exists(single):
      files = {single}
    else:
      raise CheckpointError(f"{directory}: neither model.safetensors nor model.safetensors.index.json found")
    self.where: dict[str, tuple[str, str]] = {}
    self.shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(files):
      if not os.path.exists(file):
        raise CheckpointError(f"{directory}: shard {os.path.basename(file)} listed in the index is missing")
      with safe_open(file, framework="numpy") as f:
        for name in f.keys():
          canon = canonical_name(name)
          if canon in self.where:
            raise CheckpointError(f"{directory}: tensor {name} appears twice")
          self.where[canon] = (file, name)
          self.shapes[canon] = tuple(f.get_slice(name).get_shape())

  def read(self, canon: str) -> np.ndarray:
    file, name = self.where[canon]
    with safe_open(file, framework="numpy") as f:
      return f.get_tensor(name)


def read_config(directory: str, use_vision: bool = True, final_norm: bool = True) -> Qwen3VLConfig:
  """`config.json` of a checkpoint directory -> `Qwen3VLConfig`."""
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise CheckpointError(f"{directory}: config.json not found")
  with open(path) as f:
    return Qwen3VLConfig.from_hf_config(json.load(f), use_vision=use_vision, final_norm=final_norm)


def _format(kind: str, names: list[str]) -> str:
  shown = names[:_LIST_LIMIT]
  more = f" ... and {len(names) - len(shown)} more" if len(names) > len(shown) else ""
  return f"{kind} ({len(names)}): " + ", ".join(shown) + more


def load_qwen3_vl(directory: str, config: Qwen3VLConfig | None = None, use_vision: bool = True,
                  final_norm: bool = True, dtype: Any = jnp.float32,
                  mesh: jax.sharding.Mesh | None = None) -> tuple[Qwen3VLConfig, dict]:
  """Loads params for `Qwen3VLEncoder` from a transformers checkpoint directory.

  Args:
    directory: holds config.json and model.safetensors (or sharded + index).
    config: overrides the directory's config.json when given.
    use_vision: False loads the text stack only (vision tensors become known-unused).
    final_norm: whether the encoder applies the LLM's final norm (see `Qwen3VLConfig`).
    dtype: parameter dtype (`jnp.bfloat16` for the 2B model on small hosts).
    mesh: when given, each tensor is placed straight onto the NamedSharding its
      logical axes get from `training.mesh.logical_shardings`.
  Returns:
    (config, params) where params is the `{'language_model': ..., 'visual': ...}` tree.
  Raises:
    CheckpointError listing every missing, unexpected and mis-shaped tensor.
  """
  config = config or read_config(directory, use_vision, final_norm)
  files = _TensorFiles(directory)
  model = Qwen3VLEncoder(config, param_dtype=dtype)
  abstract = _abstract_params(model, config)
  flat = traverse_util.flatten_dict(nn.unbox(abstract))
  shardings = _shardings(abstract, mesh) if mesh is not None else None

  expected = {hf_name(p): p for p in flat}
  missing = sorted(n for n in expected if n not in files.where)
  unused = set(KNOWN_UNUSED)
  if config.vision is None:
    unused |= {n for n in files.where if n.startswith("visual.")}
  if not config.final_norm:
    unused.add("language_model.norm.weight")
  unexpected = sorted(n for n in files.where if n not in expected and n not in unused)
  misshaped = sorted(f"{n} {files.shapes[n]} (expected {_hf_shape(p, flat[p].shape)})"
                     for n, p in expected.items()
                     if n in files.where and not _shape_matches(files.shapes[n], p, flat[p].shape))
  if missing or unexpected or misshaped:
    problems = [_format(k, v) for k, v in (("missing", missing), ("unexpected", unexpected),
                                            ("mis-shaped", misshaped)) if v]
    raise CheckpointError(f"{directory}: checkpoint does not match the Qwen3-VL model:\n  " + "\n  ".join(problems))

  params = {}
  for name, path in expected.items():
    value = to_ours(path, files.read(name))
    arr = np.asarray(value, dtype=jnp.dtype(dtype))
    params[path] = jax.device_put(arr, shardings[path]) if shardings is not None else jnp.asarray(arr)
  return config, traverse_util.unflatten_dict(params)


def _shape_matches(file_shape, path, our_shape) -> bool:
  if path[-1] == "kernel" and len(file_shape) == 5:
    return (file_shape[0], int(np.prod(file_shape[1:]))) == tuple(reversed(our_shape))
  return tuple(file_shape) == _hf_shape(path, our_shape)


def _example_inputs(config: Qwen3VLConfig) -> tuple:
  """Smallest inputs that touch every parameter (the image path when the vision tower is on)."""
  if config.vision is None:
    return jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32)
  v = config.vision
  grid = (v.image_factor // v.patch_size,) * 2
  patches = jnp.zeros((1, grid[0] * grid[1], v.patch_dim), jnp.float32)
  ids = jnp.full((1, 1), config.image_token_id, jnp.int32)
  return ids, jnp.ones((1, 1), jnp.int32), patches, grid, jnp.zeros((3, 1, 1), jnp.int32)


def _abstract_params(model: Qwen3VLEncoder, config: Qwen3VLConfig):
  """Boxed param shapes (with logical axes) without allocating anything."""
  inputs = _example_inputs(config)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *inputs))["params"]


def _shardings(abstract, mesh) -> dict:
  return traverse_util.flatten_dict(logical_shardings(abstract, mesh))


def init_params(config: Qwen3VLConfig, seed: int = 0, dtype: Any = jnp.float32) -> dict:
  """Random params (unboxed) for `Qwen3VLEncoder(config)`, e.g. for the tiny CPU default.

  Norm scales are 1, biases 0, every other tensor N(0, 0.02) (transformers' init).
  Drawn with numpy from the abstract shapes: no model run and no compilation.
  """
  flat = traverse_util.flatten_dict(nn.unbox(_abstract_params(Qwen3VLEncoder(config), config)))
  rng = np.random.default_rng(seed)
  params = {}
  for path in sorted(flat):
    shape = flat[path].shape
    if path[-1] == "scale":
      value = np.ones(shape, np.float32)
    elif path[-1] == "bias":
      value = np.zeros(shape, np.float32)
    else:
      value = 0.02 * rng.standard_normal(shape, dtype=np.float32)
    params[path] = jnp.asarray(value, dtype)
  return traverse_util.unflatten_dict(params)
