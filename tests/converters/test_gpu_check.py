"""gpu_check rejects what the GPU delegate cannot run, naming op and tensors."""
import numpy as np
import pytest
import tensorflow as tf

from converters import gpu_check


def _convert(fn) -> bytes:
  module = tf.Module()
  module.fn = fn
  return tf.lite.TFLiteConverter.from_concrete_functions(
      [fn.get_concrete_function()], module).convert()


@pytest.fixture(scope='module')
def bad_model() -> bytes:
  @tf.function(input_signature=[tf.TensorSpec([1, 2, 3, 4], tf.float32, name='x')])
  def bad(x):
    five = tf.reshape(x, [1, 2, 3, 2, 2]) * 2.0
    wide = tf.broadcast_to(tf.reshape(x[:, :1], [1, 1, 3, 4]), [2, 2, 3, 4])
    return {'five': five, 'wide': wide, 'idx': tf.argmax(x, axis=-1)}  # argmax is int64
  return _convert(bad)


@pytest.fixture(scope='module')
def clean_model() -> bytes:
  w = tf.constant(np.random.default_rng(0).standard_normal((3, 3, 4, 8)), tf.float32)

  @tf.function(input_signature=[tf.TensorSpec([1, 8, 8, 4], tf.float32, name='x')])
  def clean(x):
    y = tf.nn.conv2d(x, w, 1, 'SAME')
    y = y - tf.reduce_mean(y, axis=[1, 2], keepdims=True)
    return {'y': tf.nn.softmax(tf.reshape(y, [1, 64, 8]), axis=-1)}
  return _convert(clean)


def test_bad_model_names_every_problem(bad_model):
  findings = gpu_check.check_model(bad_model)
  by_kind = {}
  for f in findings:
    by_kind.setdefault(f.kind, []).append(f)
  rank5 = [f for f in by_kind['rank'] if f.op_name in ('RESHAPE', 'MUL')]
  assert rank5 and all('[1, 2, 3, 2, 2]' in ' '.join(f.tensors) for f in rank5)
  broadcast = [f for f in by_kind['op'] if f.op_name == 'BROADCAST_TO']
  assert len(broadcast) == 1 and 'BROADCAST_TO' in broadcast[0].reason
  assert broadcast[0].op_index is not None
  int64 = [f for f in by_kind['dtype'] if 'INT64' in ' '.join(f.tensors)]
  assert int64 and int64[0].op_name == 'ARG_MAX'
  assert any(f.op_name == 'ARG_MAX' and f.kind == 'op' for f in findings)  # not on the allow-list
  with pytest.raises(gpu_check.GpuCheckError, match='BROADCAST_TO'):
    gpu_check.assert_gpu_clean(bad_model, 'bad')


def test_clean_model_has_no_findings(clean_model):
  assert gpu_check.check_model(clean_model) == []
  ops = gpu_check.op_histogram(clean_model)
  assert 'CONV_2D' in ops and 'SOFTMAX' in ops


def test_dynamic_shape_is_reported():
  @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name='x')])
  def dynamic(x):
    return {'y': tf.tanh(x)}
  findings = gpu_check.check_model(_convert(dynamic))
  assert findings and all(f.kind == 'dynamic' for f in findings)
  assert any('serving_default_x' in t and '-1' in t for f in findings for t in f.tensors)


def test_cli_exit_codes(tmp_path, bad_model, clean_model, capsys):
  bad, clean = tmp_path / 'bad.tflite', tmp_path / 'clean.tflite'
  bad.write_bytes(bad_model)
  clean.write_bytes(clean_model)
  assert gpu_check.main([str(clean)]) == 0
  assert gpu_check.main([str(bad)]) == 1
  out = capsys.readouterr().out
  assert 'BROADCAST_TO' in out and 'op #' in out
  junk = tmp_path / 'junk.tflite'
  junk.write_bytes(b'not a flatbuffer at all')
  assert gpu_check.main([str(junk)]) == 2


def test_rejects_non_tflite_bytes():
  with pytest.raises(ValueError, match='TFL3'):
    gpu_check.check_model(b'\x00' * 64)


def test_large_sum_reductions_are_warned_about():
  @tf.function(input_signature=[tf.TensorSpec([1, 64, 128, 8], tf.float32, name='x')])
  def means(x):
    big = tf.reduce_sum(x, axis=[1, 2], keepdims=True) * (1.0 / 8192)   # one sum of 8192 terms
    staged = tf.reduce_sum(tf.reduce_sum(x, axis=2, keepdims=True), axis=1, keepdims=True)
    return {'big': big, 'staged': staged}
  warnings = gpu_check.fp16_sum_risks(_convert(means))
  assert len(warnings) == 1 and 'SUM over 8192 elements' in warnings[0]
