"""JAX function + params -> `.tflite` bytes with a fixed, named signature.

Path: `jax2tf.convert` (native StableHLO serialization, the only mode jax 0.10
has) -> `tf.function` with a fixed `input_signature` over `tf.Variable` params
-> SavedModel in a temp dir -> `TFLiteConverter.from_saved_model`, whose
StableHLO legalization emits TFLite builtin ops (no Flex, no XLA custom ops).
Params travel as variables, not closure constants, so a 0.39B-parameter model
never has to fit into a single 2 GB GraphDef protobuf.

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

PRECISIONS = ('fp32', 'fp16')
FLATBUFFER_LIMIT = 2 ** 31  # bytes; flatbuffers use 32-bit signed offsets
_HEADROOM = 64 * 2 ** 20  # graph structure, signatures, alignment padding


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
  names = [s.name for s in input_specs]
  if len(set(names)) != len(names):
    raise ValueError(f'{label}: duplicate input names {names}')
  converted = jax2tf.convert(fn, with_gradient=False)
  module = tf.Module()
  module.params = tf.nest.map_structure(
      lambda x: tf.Variable(np.asarray(x), trainable=False), params)
  signature = [tf.TensorSpec(s.shape, getattr(tf, s.dtype), name=s.name) for s in input_specs]

  @tf.function(autograph=False, input_signature=signature)
  def serve(*args):
    return converted(module.params, **dict(zip(names, args)))

  module.serve = serve
  with tempfile.TemporaryDirectory(prefix='dreamlite_export_') as tmp:
    tf.saved_model.save(module, tmp, signatures={'serving_default': serve.get_concrete_function()})
    del module  # the SavedModel owns the weights now; free the TF copy early
    converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if precision == 'fp16':
      converter.optimizations = [tf.lite.Optimize.DEFAULT]
      converter.target_spec.supported_types = [tf.float16]
    content = converter.convert()
  if len(content) >= FLATBUFFER_LIMIT:
    raise FlatbufferTooLargeError(f'{label}: converted flatbuffer is {len(content)} bytes, '
                                  'over the 2 GiB limit')
  return content


def output_specs(fn: Callable[..., Mapping[str, Any]], params: Any,
                 input_specs: list[TensorSpec]) -> list[TensorSpec]:
  """The named outputs of `fn` for `input_specs`, by abstract evaluation (no compute)."""
  args = {s.name: jax.ShapeDtypeStruct(s.shape, np.dtype(s.dtype)) for s in input_specs}
  out = jax.eval_shape(lambda p, a: fn(p, **a), params, args)
  return [TensorSpec(k, tuple(v.shape), str(v.dtype)) for k, v in sorted(out.items())]
