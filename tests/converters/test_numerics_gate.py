"""The numerics gate: metrics are right, and the gate fires on real mismatches."""
import math

import numpy as np
import pytest
import tensorflow as tf

from converters import litert, numerics


def test_compare_arrays_metrics():
  want = np.linspace(-2.0, 2.0, 101)
  got = want.copy()
  got[10] += 2e-4
  c = numerics.compare_arrays('y', got, want, 'fp32')
  assert c.max_abs_err == pytest.approx(2e-4)
  assert c.scale == pytest.approx(2.0)
  assert c.rel_err == pytest.approx(1e-4) and c.passed  # exactly at the fp32 limit
  expected_psnr = 10 * math.log10(4.0 ** 2 / ((2e-4) ** 2 / 101))
  assert c.psnr_db == pytest.approx(expected_psnr, rel=1e-6)
  assert not numerics.compare_arrays('y', want + 1e-3, want, 'fp32').passed
  assert numerics.compare_arrays('y', want + 1e-3, want, 'fp16').passed
  assert not numerics.compare_arrays('y', np.full_like(want, np.nan), want, 'fp16').passed
  drift = numerics.compare_arrays('y', want + 0.06, want, 'fp16')  # within max, broad drift
  assert drift.rel_err < numerics.THRESHOLDS['fp16'] and drift.psnr_db < 40 and not drift.passed
  with pytest.raises(ValueError, match='precision'):
    numerics.compare_arrays('y', want, want, 'int8')


@pytest.fixture(scope='module')
def double_model() -> litert.TFLiteModel:
  module = tf.Module()

  @tf.function(input_signature=[tf.TensorSpec([2, 3], tf.float32, name='x')])
  def double(x):
    return {'y': 2.0 * x}
  module.fn = double
  content = tf.lite.TFLiteConverter.from_concrete_functions(
      [double.get_concrete_function()], module).convert()
  return litert.load_model(content, label='double')


def test_gate_passes_and_fails(double_model):
  x = np.arange(6, dtype=np.float32).reshape(2, 3)
  ok = numerics.numerics_gate(double_model, lambda x: {'y': 2 * x}, [{'x': x}], 'fp32')
  assert ok[0].max_abs_err == 0.0 and ok[0].passed
  with pytest.raises(numerics.NumericsGateError, match=r'(?s)double.*y\[set 0\]'):
    numerics.numerics_gate(double_model, lambda x: {'y': 2.001 * x}, [{'x': x}], 'fp32')
  with pytest.raises(numerics.NumericsGateError, match='output names'):
    numerics.numerics_gate(double_model, lambda x: {'z': 2 * x}, [{'x': x}], 'fp32')


def test_model_checks_input_shapes(double_model):
  assert double_model.input_names == ['x'] and double_model.output_names == ['y']
  with pytest.raises(ValueError, match="input 'x' has shape"):
    double_model(x=np.zeros((3, 2), np.float32))
  with pytest.raises(ValueError, match='missing'):
    double_model()
