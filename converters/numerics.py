"""Numerics gate: a converted model must compute what the JAX function computes.

Conversion can go wrong quietly (a transposed weight, a dropped mask, fp16
overflow in a sum), so every exported model is run in the TFLite interpreter on
the same inputs as its JAX function and the outputs are compared. The gate
measures the max abs error relative to the output's scale (its max magnitude)
and reports PSNR over the reference's dynamic range.

Thresholds (max abs error / output scale, and a PSNR floor):
  fp32: 1e-4, no PSNR floor. Both sides compute in float32; only op order and
        fused kernels differ, which stays near 1e-6 relative at our depths.
  fp16: 5e-2 and PSNR >= 40 dB. Weights are rounded to float16 (relative step
        2^-11 ~ 4.9e-4), which alone costs ~1e-3 of the output scale. The larger
        term is the timestep sinusoid: `t * f` with the frequency table `f`
        stored in float16 moves the fastest channels by up to t * 2^-11 ~ 0.5 rad
        at t = 1000, which we measured as ~2e-2 max (51 dB) on a tiny U-Net. The
        max bound catches a broken op; the PSNR floor catches broad drift. A phone
        GPU computing in float16 adds its own error (904.53 is not a float16)
        that only a device run shows.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping

import numpy as np

from converters.litert import TFLiteModel

THRESHOLDS = {'fp32': 1e-4, 'fp16': 5e-2}
MIN_PSNR_DB = {'fp32': 0.0, 'fp16': 40.0}


class NumericsGateError(ValueError):
  """Raised when TFLite and JAX outputs differ by more than the precision allows."""


@dataclasses.dataclass(frozen=True)
class Comparison:
  """TFLite-vs-JAX agreement of one output tensor."""
  name: str
  max_abs_err: float
  scale: float  # max |reference|
  rel_err: float  # max_abs_err / scale
  psnr_db: float  # over the reference's dynamic range
  threshold: float
  passed: bool

  def __str__(self) -> str:
    verdict = 'ok' if self.passed else 'FAIL'
    return (f'{self.name}: max_abs_err={self.max_abs_err:.3e} scale={self.scale:.3e} '
            f'rel={self.rel_err:.3e} (limit {self.threshold:.0e}) '
            f'psnr={self.psnr_db:.1f} dB [{verdict}]')


def psnr_db(got: np.ndarray, want: np.ndarray, peak_to_peak: float | None = None) -> float:
  """PSNR in dB of `got` against `want`; the peak defaults to `want`'s range (inf if equal)."""
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  if peak_to_peak is None:
    peak_to_peak = float(want.max() - want.min()) if want.size else 0.0
  peak_to_peak = max(peak_to_peak, 1e-12)
  mse = float(np.mean((got - want) ** 2))
  return math.inf if mse == 0 else 10 * math.log10(peak_to_peak ** 2 / mse)


def compare_arrays(name: str, got: np.ndarray, want: np.ndarray, precision: str) -> Comparison:
  """Compares one TFLite output (`got`) with the JAX reference (`want`), same shape."""
  if precision not in THRESHOLDS:
    raise ValueError(f'unknown precision {precision!r}; expected one of {sorted(THRESHOLDS)}')
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  if got.shape != want.shape:
    raise NumericsGateError(f'{name}: TFLite output shape {got.shape} != JAX {want.shape}')
  threshold = THRESHOLDS[precision]
  if not np.all(np.isfinite(got)):
    return Comparison(name, math.inf, 0.0, math.inf, -math.inf, threshold, False)
  max_abs = float(np.max(np.abs(got - want))) if got.size else 0.0
  scale = max(float(np.max(np.abs(want))) if want.size else 0.0, 1e-6)
  rel = max_abs / scale
  psnr = psnr_db(got, want)
  passed = rel <= threshold and psnr >= MIN_PSNR_DB[precision]
  return Comparison(name, max_abs, scale, rel, psnr, threshold, passed)


def compare_model(model: TFLiteModel, jax_fn: Callable[..., Mapping[str, np.ndarray]],
                  inputs: Mapping[str, np.ndarray], precision: str) -> list[Comparison]:
  """Runs `model(**inputs)` and `jax_fn(**inputs)` and compares every named output."""
  got = model(**inputs)
  want = {k: np.asarray(v) for k, v in jax_fn(**inputs).items()}
  if set(got) != set(want):
    raise NumericsGateError(f'{model.label}: output names differ: TFLite {sorted(got)} '
                            f'vs JAX {sorted(want)}')
  return [compare_arrays(k, got[k], want[k], precision) for k in sorted(want)]


def numerics_gate(model: TFLiteModel, jax_fn: Callable[..., Mapping[str, np.ndarray]],
                  input_sets: list[Mapping[str, np.ndarray]], precision: str,
                  label: str | None = None) -> list[Comparison]:
  """Compares on every input set; raises NumericsGateError naming each failing output."""
  label = label or model.label
  results = []
  for k, inputs in enumerate(input_sets):
    for c in compare_model(model, jax_fn, inputs, precision):
      results.append(dataclasses.replace(c, name=f'{c.name}[set {k}]'))
  failed = [c for c in results if not c.passed]
  if failed:
    lines = '\n  '.join(str(c) for c in failed)
    raise NumericsGateError(f'{label}: numerics gate failed at {precision}:\n  {lines}')
  return results


def worst(results: list[Comparison]) -> Comparison:
  """The comparison with the largest relative error."""
  if not results:
    raise ValueError('no comparisons to summarise')
  return max(results, key=lambda c: c.rel_err)
