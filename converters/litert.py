"""One place that finds a TFLite interpreter and runs a model by signature.

`ai_edge_litert` is the maintained successor of `tflite_runtime`; phones and
older environments may only have the latter. Everything in `converters/` that
executes a `.tflite` file goes through `load_model` / `run_signature` so the
import fallback and the input validation are written once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

SIGNATURE_KEY = 'serving_default'


def interpreter_class() -> type:
  """The `Interpreter` class of ai_edge_litert, else tflite_runtime; ImportError if neither."""
  try:
    from ai_edge_litert.interpreter import Interpreter
    return Interpreter
  except ImportError:
    pass
  try:
    from tflite_runtime.interpreter import Interpreter
    return Interpreter
  except ImportError:
    raise ImportError(
        'No TFLite interpreter found: install `ai-edge-litert` (preferred) or '
        '`tflite-runtime`.') from None


class TFLiteModel:
  """A loaded `.tflite` model called through its `serving_default` signature.

  Inputs and outputs are dicts keyed by the signature names the exporter gave
  (e.g. `sample`, `timestep`; output `velocity`).
  """

  def __init__(self, model: bytes | str | Path, num_threads: int | None = None,
               label: str | None = None):
    if isinstance(model, (str, Path)):
      path = Path(model)
      if not path.is_file():
        raise FileNotFoundError(f'TFLite model not found: {path}')
      content = path.read_bytes()
      self.label = label or str(path)
    else:
      content = bytes(model)
      self.label = label or '<tflite bytes>'
    cls = interpreter_class()
    self.interpreter = cls(model_content=content, num_threads=num_threads)
    signatures = self.interpreter.get_signature_list()
    if SIGNATURE_KEY not in signatures:
      raise ValueError(f'{self.label}: no {SIGNATURE_KEY!r} signature (has {list(signatures)})')
    self._runner = self.interpreter.get_signature_runner(SIGNATURE_KEY)
    self.input_details = self._runner.get_input_details()
    self.output_details = self._runner.get_output_details()

  @property
  def input_names(self) -> list[str]:
    return list(self.input_details)

  @property
  def output_names(self) -> list[str]:
    return list(self.output_details)

  def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Runs one inference; every signature input must be given with its exact shape."""
    missing = set(self.input_details) - set(inputs)
    extra = set(inputs) - set(self.input_details)
    if missing or extra:
      raise ValueError(f'{self.label}: inputs mismatch: missing {sorted(missing)}, '
                       f'unexpected {sorted(extra)}')
    feed = {}
    for name, detail in self.input_details.items():
      value = np.asarray(inputs[name])
      want = tuple(int(d) for d in detail['shape'])
      if value.shape != want:
        raise ValueError(f'{self.label}: input {name!r} has shape {value.shape}, '
                         f'model expects {want}')
      feed[name] = value.astype(detail['dtype'], copy=False)
    out = self._runner(**feed)
    return {k: np.array(v) for k, v in out.items()}


def load_model(model: bytes | str | Path, num_threads: int | None = None,
               label: str | None = None) -> TFLiteModel:
  """Loads a `.tflite` path or bytes into a callable `TFLiteModel`."""
  return TFLiteModel(model, num_threads=num_threads, label=label)


def run_signature(model: bytes | str | Path | TFLiteModel,
                  inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Runs `model` once on named inputs and returns the named outputs."""
  if not isinstance(model, TFLiteModel):
    model = load_model(model)
  return model(**inputs)
