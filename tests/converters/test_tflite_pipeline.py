"""The TFLite reference app reproduces the JAX pipeline's images from the same seed."""
import json
import shutil

import numpy as np
import pytest

from converters import numerics
from converters.tflite_pipeline import TFLitePipeline, main
from conftest import IMAGE

PROMPT = 'a red circle above a blue square'


@pytest.fixture(scope='module')
def pipelines(jax_pipeline, export_fp32):
  return jax_pipeline, TFLitePipeline(export_fp32[0])


def _psnr_uint8(a, b):
  return numerics.psnr_db(a.astype(np.float64), b.astype(np.float64), peak_to_peak=255.0)


def test_generate_matches_jax_pipeline(pipelines):
  jax_pipe, app = pipelines
  want = jax_pipe.generate(PROMPT, seed=3, steps=4, guidance=None, size=IMAGE, output='np')[0]
  noise = np.asarray(jax_pipe._noise(3, 1, IMAGE))
  got = app.generate(PROMPT, noise=noise)
  assert got.shape == (*IMAGE, 3) and got.dtype == np.uint8
  assert _psnr_uint8(got, want) >= 35.0
  other = app.generate('a green triangle', noise=noise)
  assert _psnr_uint8(other, got) < _psnr_uint8(got, want)  # the prompt reaches the image


def test_edit_matches_jax_pipeline(pipelines):
  jax_pipe, app = pipelines
  rng = np.random.default_rng(0)
  source = (rng.uniform(0, 255, (IMAGE[0] // 4, IMAGE[1] // 4, 3))).astype(np.uint8)
  source = np.kron(source, np.ones((4, 4, 1), np.uint8))  # blocky, so resizing is benign
  want = jax_pipe.edit(source, 'make it blue', seed=5, steps=4, guidance=None, size=IMAGE,
                       output='np')[0]
  got = app.edit(source, 'make it blue', noise=np.asarray(jax_pipe._noise(5, 1, IMAGE)))
  assert _psnr_uint8(got, want) >= 35.0


def test_cli_and_checksum_guard(export_fp32, tmp_path):
  out = main(['--models', str(export_fp32[0]), '--prompt', PROMPT, '--out',
              str(tmp_path / 'a.png')])
  assert out.is_file()
  broken = tmp_path / 'broken'
  shutil.copytree(export_fp32[0], broken)
  manifest = json.loads((broken / 'manifest.json').read_text())
  manifest['models']['unet']['sha256'] = '0' * 64
  (broken / 'manifest.json').write_text(json.dumps(manifest))
  with pytest.raises(ValueError, match='unet.tflite: sha256'):
    TFLitePipeline(broken)
