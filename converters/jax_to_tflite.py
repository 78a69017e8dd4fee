"""JAX function + params -> `.tflite` bytes with a fixed, named signature.

Path: `jax2tf.convert` (native StableHLO serialization, the only mode jax 0.10
has) -> `tf.function` with a fixed `input_signature`
-> `TFLiteConverter`, whose StableHLO legalization emits TFLite builtin ops (no
Flex, no XLA custom ops). Models with over 1 GiB of fp32 weights carry them as
variables through a SavedModel in a temp dir (`from_saved_model`), so a
0.39B-parameter model never has to fit into a single 2 GB GraphDef protobuf;
smaller ones bake the weights in as constants and convert the concrete function
directly, which traces JAX once instead of several times.

A flatbuffer cannot exceed 2 GB; `convert_jax_function` refuses before spending
minutes converting when the weights alone would not fit, and checks the result.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from typing import Any, Callable, Mapping

import jax
import numpy as np

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
import tensorflow as tf  # noqa: E402
from jax.experimental import jax2tf  # noqa: E402

from dreamlite_jax.models import layers  # noqa: E402

PRECISIONS = ('fp32', 'fp16')
FLATBUFFER_LIMIT = 2 ** 31  # bytes; flatbuffers use 32-bit signed offsets
_HEADROOM = 64 * 2 ** 20  # graph structure, signatures, alignment padding
_GRAPHDEF_SAFE_BYTES = 2 ** 30  # fp32 weights above this go through a SavedModel


class FlatbufferTooLargeError(ValueError):
  """The model cannot be one `.tflite` file; split it or use fp16."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """A named static-shape signature tensor, e.g. `TensorSpec('sample', (1, 128, 256, 4))`."""
  name: str
  shape: tuple[int, ...]
  dtype: str = 'float32'

  def to_json(self) -> dict[str, Any]:
    return {'name': self.name, 'shape': list(self.shape), 'dtype': self.dtype}


def param_bytes(params: Any, precision: str) -> int:
  """Bytes the float params take in the flatbuffer at `precision` (2 or 4 per element)."""
  if precision not in PRECISIONS:
    raise ValueError(f'unknown precision {precision!r}; expected one of {PRECISIONS}')
  per = 2 if precision == 'fp16' else 4
  return sum(int(np.prod(np.shape(x))) * per for x in jax.tree.leaves(params))


def check_fits(params: Any, precision: str, label: str) -> int:
  """Raises FlatbufferTooLargeError if `params` cannot fit one flatbuffer; returns the bytes."""
  size = param_bytes(params, precision)
  if size + _HEADROOM > FLATBUFFER_LIMIT:
    raise FlatbufferTooLargeError(
        f'{label}: weights take {size / 2 ** 30:.2f} GiB at {precision}, over the 2 GiB '
        f'flatbuffer limit; export it in {math.ceil((size + _HEADROOM) / FLATBUFFER_LIMIT)}+ '
        'parts or use --precision fp16')
  return size


def convert_jax_function(fn: Callable[..., Mapping[str, Any]], params: Any,
                         input_specs: list[TensorSpec], precision: str = 'fp32',
                         label: str = 'model') -> bytes:
  """Converts `fn(params, **inputs) -> {output_name: array}` to TFLite bytes.

  The model gets one `serving_default` signature whose inputs are `input_specs`
  (static shapes, batch included) and whose outputs are the dict keys of `fn`.
  `precision='fp16'` stores float weights as float16 (DEQUANTIZE'd at load,
  which the GPU delegate folds); activations stay float32 in the file.
  """
  check_fits(params, precision, label)
  with layers.export_lowering():  # jax2tf traces lazily, inside the converter calls below
    return _convert_jax_function(fn, params, input_specs, precision, label)


def _convert_jax_function(fn, params, input_specs, precision, label) -> bytes:
  names = [s.name for s in input_specs]
  if len(set(names)) != len(names):
    raise ValueError(f'{label}: duplicate input names {names}')
  signature = [tf.TensorSpec(s.shape, getattr(tf, s.dtype), name=s.name) for s in input_specs]
  module = tf.Module()
  if param_bytes(params, 'fp32') < _GRAPHDEF_SAFE_BYTES:
    # Small models: weights become constants of the serialized module and the concrete
    # function converts directly (one jax trace instead of several through a SavedModel).
    host_params = jax.tree.map(np.asarray, params)
    converted = jax2tf.convert(lambda *args: fn(host_params, **dict(zip(names, args))),
                               with_gradient=False)

    @tf.function(autograph=False, input_signature=signature)
    def serve(*args):
      return converted(*args)

    module.serve = serve
    content = _convert(tf.lite.TFLiteConverter.from_concrete_functions(
        [serve.get_concrete_function()], module), precision)
  else:
    # Large models: as constants every weight would sit in one GraphDef protobuf (2 GB
    # cap); as variables in a SavedModel the importer reads them from the checkpoint.
    converted = jax2tf.convert(fn, with_gradient=False)
    module.params = tf.nest.map_structure(
        lambda x: tf.Variable(np.asarray(x), trainable=False), params)

    @tf.function(autograph=False, input_signature=signature)
    def serve(*args):
      return converted(module.params, **dict(zip(names, args)))

    module.serve = serve
    with tempfile.TemporaryDirectory(prefix='dreamlite_export_') as tmp:
      tf.saved_model.save(module, tmp,
                          signatures={'serving_default': serve.get_concrete_function()})
      del module, serve
      content = _convert(tf.lite.TFLiteConverter.from_saved_model(tmp), precision)
  if len(content) >= FLATBUFFER_LIMIT:
    raise FlatbufferTooLargeError(f'{label}: converted flatbuffer is {len(content)} bytes, '
                                  'over the 2 GiB limit')
  return content


def _convert(converter, precision: str) -> bytes:
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]  # no Flex fallback
  if precision == 'fp16':
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
  return converter.convert()


def output_specs(fn: Callable[..., Mapping[str, Any]], params: Any,
                 input_specs: list[TensorSpec]) -> list[TensorSpec]:
  """The named outputs of `fn` for `input_specs`, by abstract evaluation (no compute)."""
  args = {s.name: jax.ShapeDtypeStruct(s.shape, np.dtype(s.dtype)) for s in input_specs}
  out = jax.eval_shape(lambda p, a: fn(p, **a), params, args)
  return [TensorSpec(k, tuple(v.shape), str(v.dtype)) for k, v in sorted(out.items())]
