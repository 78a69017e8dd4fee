"""The four deployable pieces of DreamLite as (function, params, static signature).

Each builder returns a `Component`: a pure `fn(params, **inputs) -> {name: array}`
plus the exact input signature the phone sees. `export.py` converts each one and
runs the gates; `tflite_pipeline.py` calls the converted files by these names.

Signatures (batch 1, NHWC, all float32 so the GPU delegate takes every input):
  unet          sample [1, h, 2w, 4], timestep [1] (sigma*1000), text [1, L, D],
                text_mask [1, L] (+ time_ids [1, 2] only with `time_ids_input`)
                -> velocity [1, h, w, 4]  (target half only: the app never needs
                   the condition half, and slicing here halves the readback)
  vae_decoder   latents [1, h, w, 4] -> image [1, H, W, 3] in [-1, 1]
  vae_encoder   image [1, H, W, 3] in [-1, 1] -> latents [1, h, w, 4]
  text_encoder  embeds [1, S, D], mask [1, S] -> hidden [1, S, D]
The text encoder starts from embeddings: the token lookup on the 151,936-row
table is a GATHER the app does from an exported `.npy` (see `text_encoder_parts`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from converters.jax_to_tflite import FLATBUFFER_LIMIT, TensorSpec, param_bytes
from dreamlite_jax.models.text_encoder import causal_bias, rope_cos_sin, text_position_ids

LATENT_CHANNELS = 4
VAE_SCALE = 8  # DreamLite's VAE (TAESD); a tiny VAE's own scale comes from its config
# Parts of a split text encoder stay below this many weight bytes (2 GiB minus room
# for the graph), so each one is a valid flatbuffer.
MAX_PART_BYTES = FLATBUFFER_LIMIT - 256 * 2 ** 20


@dataclasses.dataclass(frozen=True)
class Component:
  """One `.tflite` file to be: `fn(params, **inputs)` over a static signature."""
  name: str
  fn: Callable[..., Mapping[str, Any]]
  params: Any
  inputs: list[TensorSpec]
  info: dict = dataclasses.field(default_factory=dict)  # extra manifest fields


def _unbox(params: Any) -> Any:
  return nn.meta.unbox(params)


def _latent_size(height: int, width: int, vae_scale: int) -> tuple[int, int]:
  if height % vae_scale or width % vae_scale:
    raise ValueError(f'image size {height}x{width} is not a multiple of the VAE scale {vae_scale}')
  return height // vae_scale, width // vae_scale


def unet_step(model: nn.Module, params: Any, *, height: int, width: int, text_len: int,
              text_dim: int, time_ids_input: bool = False,
              vae_scale: int = VAE_SCALE) -> Component:
  """One denoising step of `DreamLiteUNet` for `height x width` pixel outputs
  (latents `height / vae_scale x width / vae_scale`).

  `time_ids` (width, height) is baked in as a constant by default: a static-shape
  model serves exactly one size, so the input carries no information, and folding
  it removes the size embedding's outer product (`timestep_embedding` on the
  flattened `[2]` ids is a `[2, 1] x [1, d]` MUL, which the GPU delegate rejects).
  `time_ids_input=True` keeps it as the `[1, 2]` input instead.
  """
  h, w = _latent_size(height, width, vae_scale)
  size_ids = np.array([[width, height]], np.float32)

  def velocity(p, sample, timestep, text, text_mask, time_ids):
    out = model.apply({'params': p}, sample, timestep, text, text_mask, time_ids)
    return {'velocity': out[:, :, :w, :]}

  if time_ids_input:
    fn = velocity
  else:
    def fn(p, sample, timestep, text, text_mask):
      return velocity(p, sample, timestep, text, text_mask, jnp.asarray(size_ids))

  inputs = [TensorSpec('sample', (1, h, 2 * w, LATENT_CHANNELS)), TensorSpec('timestep', (1,)),
            TensorSpec('text', (1, text_len, text_dim)), TensorSpec('text_mask', (1, text_len))]
  if time_ids_input:
    inputs.append(TensorSpec('time_ids', (1, 2)))
  info = {'packing': 'sample = [noisy target | condition] along width; condition is zeros '
                     'for text-to-image, the source latents for editing',
          'output': 'velocity of the target (left) half',
          'time_ids': [width, height], 'time_ids_input': time_ids_input}
  return Component('unet', fn, _unbox(params), inputs, info)


def vae_decoder(model: nn.Module, params: Any, *, height: int, width: int) -> Component:
  """`TinyAutoencoder.decode`: latents -> image in [-1, 1]."""
  h, w = _latent_size(height, width, model.config.downsample_factor)

  def fn(p, latents):
    return {'image': model.apply({'params': p}, latents, method='decode')}

  return Component('vae_decoder', fn, _unbox(params),
                   [TensorSpec('latents', (1, h, w, LATENT_CHANNELS))])


def vae_encoder(model: nn.Module, params: Any, *, height: int, width: int) -> Component:
  """`TinyAutoencoder.encode`: image in [-1, 1] -> latents."""

  def fn(p, image):
    return {'latents': model.apply({'params': p}, image, method='encode')}

  return Component('vae_encoder', fn, _unbox(params), [TensorSpec('image', (1, height, width, 3))])


def _text_layer_range(model: nn.Module, embeds, mask, start: int, stop: int, last: bool):
  """Decoder layers [start, stop) of a `Qwen3VLEncoder` / `Qwen3TextModel` (text-only)."""
  lm = getattr(model, 'language_model', model)
  cfg = lm.config
  cos, sin = rope_cos_sin(text_position_ids(1, embeds.shape[1]), cfg)
  bias = causal_bias(mask, cfg.num_heads // cfg.num_kv_heads)
  x = embeds.astype(lm.dtype)
  for i in range(start, stop):
    x = lm.layers[i](x, cos, sin, bias)
  return lm.norm(x) if last and lm.final_norm else x


def text_encoder_parts(model: nn.Module, params: Any, *, seq_len: int, precision: str,
                       max_part_bytes: int = MAX_PART_BYTES
                       ) -> tuple[list[Component], np.ndarray]:
  """The text-only encoder split into as few layer ranges as fit one flatbuffer each.

  Returns (components, embedding_table `[vocab, hidden]`). The app looks token
  ids up in the table and feeds `embeds` to part 0, then each part's `hidden`
  to the next part's `embeds`; `mask` goes to every part. The GATHER on the
  table stays out of the graph: at 151,936 x 2,048 it is 0.6 GB the GPU would
  have to hold for a lookup that costs nothing on the CPU.
  """
  params = _unbox(params)
  nested = 'language_model' in params
  lm_params = params['language_model'] if nested else params
  table = np.asarray(lm_params['embed_tokens'])
  body = {k: v for k, v in lm_params.items() if k != 'embed_tokens'}
  layer_keys = sorted((k for k in body if k.startswith('layers_')), key=lambda k: int(k[7:]))
  if not layer_keys:
    raise ValueError('text encoder params have no layers_* entries')
  per_layer = param_bytes(body[layer_keys[0]], precision)
  total = param_bytes(body, precision)
  parts = max(1, math.ceil(total / max_part_bytes))
  while parts < len(layer_keys) and math.ceil(len(layer_keys) / parts) * per_layer > max_part_bytes:
    parts += 1
  per_part = math.ceil(len(layer_keys) / parts)
  parts = math.ceil(len(layer_keys) / per_part)
  if per_part * per_layer > max_part_bytes:
    raise ValueError(f'text encoder layers of {per_layer} bytes cannot be grouped under '
                     f'{max_part_bytes} bytes per part')
  hidden = table.shape[1]
  inputs = [TensorSpec('embeds', (1, seq_len, hidden)), TensorSpec('mask', (1, seq_len))]
  components = []
  for k in range(parts):
    start, stop = k * per_part, min(len(layer_keys), (k + 1) * per_part)
    last = stop == len(layer_keys)
    keep = set(layer_keys[start:stop]) | ({'norm'} if last and 'norm' in body else set())
    part_params = {name: body[name] for name in keep}

    def fn(p, embeds, mask, start=start, stop=stop, last=last):
      # setup() declares the table, so apply needs an entry of its shape; a traced
      # zeros (never read, so dead code) keeps the real table out of the graph.
      lm = {**p, 'embed_tokens': jnp.zeros(table.shape, table.dtype)}
      full = {'language_model': lm} if nested else lm
      out = model.apply({'params': full}, embeds, mask,
                        method=lambda m, e, msk: _text_layer_range(m, e, msk, start, stop, last))
      return {'hidden': out}

    name = 'text_encoder' if parts == 1 else f'text_encoder_{k}'
    components.append(Component(name, fn, part_params, inputs,
                                {'layers': [start, stop], 'part': k, 'parts': parts}))
  return components, table
