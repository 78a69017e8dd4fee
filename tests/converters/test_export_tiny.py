"""Tiny U-Net / VAE / text encoder export: GPU-clean files, gated numerics, a usable manifest."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from converters import export, gpu_check, jax_to_tflite, litert, numerics
from converters.components import Component

from conftest import IMAGE, TEXT_LEN

FILES = ('text_encoder', 'vae_encoder', 'vae_decoder', 'unet')


@pytest.mark.parametrize('which', ['export_fp32', 'export_fp16'])
def test_export_writes_gpu_clean_models_and_manifest(which, request):
  out, manifest = request.getfixturevalue(which)
  precision = 'fp32' if which == 'export_fp32' else 'fp16'
  on_disk = json.loads((out / 'manifest.json').read_text())
  assert on_disk == manifest
  assert set(manifest['models']) == set(FILES)
  for name, entry in manifest['models'].items():
    path = out / entry['file']
    assert gpu_check.check_model(path) == []
    assert entry['sha256'] == export.sha256_file(path)
    assert entry['numerics']['max_rel_err'] <= numerics.THRESHOLDS[precision]
  unet = manifest['models']['unet']
  h, w = IMAGE[0] // 8, IMAGE[1] // 8
  assert [i['name'] for i in unet['inputs']] == ['sample', 'timestep', 'text', 'text_mask']
  assert unet['time_ids'] == [IMAGE[1], IMAGE[0]] and not manifest['unet']['time_ids_input']
  assert unet['inputs'][0]['shape'] == [1, h, 2 * w, 4]
  assert unet['outputs'] == [{'name': 'velocity', 'shape': [1, h, w, 4], 'dtype': 'float32'}]
  assert manifest['models']['vae_decoder']['outputs'][0]['shape'] == [1, *IMAGE, 3]
  assert len(manifest['scheduler']['timesteps']) == 4
  assert manifest['scheduler']['sigmas'][0] == 1.0 and manifest['scheduler']['sigmas'][-1] == 0.0
  table = np.load(out / manifest['text']['embedding_table']['file'])
  assert table.dtype == (np.float16 if precision == 'fp16' else np.float32)
  assert manifest['text']['encoder_length'] == 64 + TEXT_LEN
  loaded = litert.load_model(out / 'unet.tflite')
  assert sorted(loaded.input_names) == sorted(i['name'] for i in unet['inputs'])
  # Training on CPU computes depthwise convs as shifted sums; the exported graph must
  # still carry one DEPTHWISE_CONV_2D per separable conv (layers.export_lowering).
  assert gpu_check.op_histogram(out / 'unet.tflite').get('DEPTHWISE_CONV_2D', 0) >= 4


def test_fp16_stores_half_weights_and_fp32_is_tighter(export_fp32, export_fp16):
  (out32, m32), (out16, m16) = export_fp32, export_fp16
  for name in FILES:
    assert m16['models'][name]['bytes'] < m32['models'][name]['bytes']
    assert 'DEQUANTIZE' in gpu_check.op_histogram(out16 / f'{name}.tflite')
    assert 'DEQUANTIZE' not in gpu_check.op_histogram(out32 / f'{name}.tflite')
    assert m32['models'][name]['numerics']['max_rel_err'] <= 1e-4


def test_text_encoder_split_matches_single_model(tiny_models, tmp_path):
  """Forcing tiny parts exercises the >2 GB path: the parts chained equal the whole."""
  from converters import components
  parts, table = components.text_encoder_parts(
      tiny_models.text_encoder, tiny_models.text_params, seq_len=16, precision='fp32',
      max_part_bytes=320_000)
  assert len(parts) >= 2 and [p.info['part'] for p in parts] == list(range(len(parts)))
  rng = np.random.default_rng(0)
  embeds = table[rng.integers(0, 5000, (1, 16))].astype(np.float32)
  mask = np.ones((1, 16), np.float32)
  mask[:, 11:] = 0
  want = np.asarray(tiny_models.text_encoder.apply(
      {'params': tiny_models.text_params}, embeds, mask, method='forward_embeddings'))
  x = embeds
  for part in parts:
    content = jax_to_tflite.convert_jax_function(part.fn, part.params, part.inputs, 'fp32')
    assert gpu_check.check_model(content) == []
    x = litert.load_model(content)(embeds=x, mask=mask)['hidden']
  assert numerics.compare_arrays('hidden', x[:, :11], want[:, :11], 'fp32').passed


def test_too_large_model_fails_clearly():
  huge = {'w': jax.ShapeDtypeStruct((2 ** 29 + 2 ** 26,), jnp.float32)}  # 2.25 GiB fp32, 1.1 fp16
  with pytest.raises(jax_to_tflite.FlatbufferTooLargeError, match='2 GiB flatbuffer limit'):
    jax_to_tflite.check_fits(huge, 'fp32', 'huge')
  assert jax_to_tflite.check_fits(huge, 'fp16', 'huge') < 2 ** 31


def test_export_fails_when_a_gate_fails(tmp_path):
  """flax's own GroupNorm goes 5-D; the export must refuse it and name the op."""
  import flax.linen as nn

  class FlaxGroupNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.GroupNorm(num_groups=2)(x)

  model = FlaxGroupNorm()
  x = jnp.ones((1, 4, 4, 8))
  params = model.init(jax.random.PRNGKey(0), x)['params']
  comp = Component('flax_group_norm', lambda p, x: {'y': model.apply({'params': p}, x)}, params,
                   [jax_to_tflite.TensorSpec('x', (1, 4, 4, 8))])
  with pytest.raises(export.ExportGateError, match=r'rank-5'):
    export.export_component(comp, [{'x': np.ones((1, 4, 4, 8), np.float32)}], 'fp32', tmp_path,
                            log=lambda s: None)
  assert not (tmp_path / 'flax_group_norm.tflite').exists()


def test_unet_time_ids_input_variant_matches_baked(tiny_models):
  """With `time_ids_input` the size ids are an input; fed [W, H] it equals the baked model."""
  from converters import components
  kw = dict(height=IMAGE[0], width=IMAGE[1], text_len=TEXT_LEN, text_dim=64)
  baked = components.unet_step(tiny_models.unet, tiny_models.unet_params, **kw)
  fed = components.unet_step(tiny_models.unet, tiny_models.unet_params, time_ids_input=True, **kw)
  assert [s.name for s in fed.inputs] == [s.name for s in baked.inputs] + ['time_ids']
  rng = np.random.default_rng(0)
  inputs = {s.name: rng.standard_normal(s.shape).astype(np.float32) for s in baked.inputs}
  inputs['timestep'] = np.array([500.0], np.float32)
  want = jax.jit(baked.fn)(baked.params, **inputs)['velocity']
  fed_fn = jax.jit(fed.fn)
  got = fed_fn(fed.params, **inputs, time_ids=np.array([[IMAGE[1], IMAGE[0]]], np.float32))
  np.testing.assert_allclose(got['velocity'], want, rtol=1e-5, atol=1e-5)
  other = fed_fn(fed.params, **inputs, time_ids=np.array([[512.0, 512.0]], np.float32))
  assert not np.allclose(other['velocity'], want, atol=1e-4)
