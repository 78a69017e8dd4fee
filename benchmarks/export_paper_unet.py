"""Does the paper-scale U-Net ship? Export it at 1024x1024 to fp16 TFLite and gate it.

  python -m benchmarks.export_paper_unet [--size 1024] [--precision fp16] [--out DIR]

Builds `DreamLiteUNet(UNetConfig.paper())` (0.39B params) with random weights,
converts one denoising step (packed canvas 128x256 at 1024px) with the same
path as `converters.export`, and checks the three deployment limits: file size
(< 1 GiB at fp16), `gpu_check` findings (must be 0), and the numerics gate
against the JAX forward on the same inputs. Prints `name: value` lines.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from converters import components, gpu_check, litert, numerics
from converters.jax_to_tflite import convert_jax_function, param_bytes
from dreamlite_jax.diffusion import flow
from dreamlite_jax.models.unet import DreamLiteUNet, UNetConfig

GIB = 2 ** 30


def random_unet(config, seed: int = 0):
  """`(model, params)` with the model's own initialisers (params traced at a tiny size)."""
  model = DreamLiteUNet(config)
  args = (jnp.zeros((1, 8, 16, 4)), jnp.ones((1,)),
          jnp.zeros((1, 8, config.encoder_hid_dim)), jnp.ones((1, 8)), jnp.ones((1, 2)))
  params = jax.jit(model.init)(jax.random.PRNGKey(seed), *args)['params']
  return model, jax.device_get(nn.meta.unbox(params))


def unet_inputs(component: components.Component, size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A T2I step at the first 4-step timestep: noise | zeros, random text with padding."""
  rng = np.random.default_rng(seed)
  shapes = {s.name: s.shape for s in component.inputs}
  sample = rng.standard_normal(shapes['sample']).astype(np.float32)
  sample[:, :, shapes['sample'][2] // 2:] = 0
  text_len = shapes['text_mask'][1]
  mask = np.zeros(shapes['text_mask'], np.float32)
  mask[:, :text_len // 3] = 1
  timesteps = flow.timesteps_from_sigmas(flow.schedule_for_size(4, size, size))
  inputs = {'sample': sample, 'timestep': timesteps[:1].astype(np.float32),
            'text': rng.standard_normal(shapes['text']).astype(np.float32) * mask[..., None],
            'text_mask': mask, 'time_ids': np.array([[size, size]], np.float32)}
  return {k: v for k, v in inputs.items() if k in shapes}  # time_ids only when an input


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', type=int, default=1024, help='image side in pixels')
  parser.add_argument('--precision', choices=('fp16', 'fp32'), default='fp16')
  parser.add_argument('--text-len', type=int, default=128)
  parser.add_argument('--out', default=None, help='write unet.tflite here (default: temp dir)')
  parser.add_argument('--threads', type=int, default=os.cpu_count())
  args = parser.parse_args(argv)
  config = UNetConfig.paper()

  start = time.time()
  model, params = random_unet(config)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  print(f'params: {n_params}')
  print(f'init_s: {time.time() - start:.1f}')
  comp = components.unet_step(model, params, height=args.size, width=args.size,
                              text_len=args.text_len, text_dim=config.encoder_hid_dim)
  print(f"canvas: {list(comp.inputs[0].shape)}")
  print(f'weight_bytes_{args.precision}: {param_bytes(params, args.precision)}')

  start = time.time()
  content = convert_jax_function(comp.fn, comp.params, comp.inputs, args.precision, 'unet')
  print(f'convert_s: {time.time() - start:.1f}')
  out_dir = Path(args.out or tempfile.mkdtemp(prefix='paper_unet_'))
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / 'unet.tflite'
  path.write_bytes(content)
  print(f'tflite_path: {path}')
  print(f'tflite_mib: {len(content) / 2 ** 20:.1f}')
  print(f'under_1gib: {len(content) < GIB}')

  findings = gpu_check.check_model(content)
  for f in findings[:20]:
    print(f'  finding: {f}')
  ops = gpu_check.op_histogram(content)
  print(f'ops: {sum(ops.values())} ({", ".join(f"{k} x{v}" for k, v in list(ops.items())[:8])}, ...)')
  print(f'gpu_check_findings: {len(findings)}')

  inputs = unet_inputs(comp, args.size)
  start = time.time()
  want = np.asarray(jax.jit(comp.fn)(comp.params, **inputs)['velocity'])
  print(f'jax_step_s: {time.time() - start:.1f}')
  del content
  model_tfl = litert.load_model(path, num_threads=args.threads)
  start = time.time()
  got = model_tfl(**inputs)['velocity']
  print(f'tflite_step_s: {time.time() - start:.1f}')
  c = numerics.compare_arrays('velocity', got, want, args.precision)
  print(f'numerics: {c}')
  small = path.stat().st_size < GIB or args.precision == 'fp32'
  ok = small and not findings and c.passed
  print(f'export_ok: {ok}')
  return 0 if ok else 1


if __name__ == '__main__':
  raise SystemExit(main())
