"""CPU latency of one U-Net step: TFLite (XNNPACK) vs JAX (XLA:CPU) on this machine.

  python -m benchmarks.tflite_vs_jax [--paper-size 512] [--runs 3] [--skip-paper]

Converts the tiny and the paper-scale (0.39B, random weights) U-Net step to fp32
TFLite with the export path, then times the interpreter (XNNPACK, all cores)
and the jitted JAX function on identical inputs (median of `--runs`, after one
warm-up call that includes compilation). The paper-scale model runs at
`--paper-size` pixels (default 512: canvas 64x128) to keep this machine's run
short; 1024 works too. Prints `name: value` lines, the headline ratio last.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax

from benchmarks.export_paper_unet import random_unet, unet_inputs
from converters import components, litert
from converters.jax_to_tflite import convert_jax_function
from dreamlite_jax.models.unet import UNetConfig


def _median_s(fn, runs: int) -> float:
  fn()  # warm-up (JAX compiles here; XNNPACK packs weights)
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench(name: str, config, size: int, runs: int, threads: int) -> float:
  """Prints the two latencies for one config; returns TFLite / JAX time."""
  model, params = random_unet(config)
  comp = components.unet_step(model, params, height=size, width=size, text_len=128,
                              text_dim=config.encoder_hid_dim)
  inputs = unet_inputs(comp, size)
  jitted = jax.jit(comp.fn)
  jax_s = _median_s(lambda: jax.block_until_ready(jitted(comp.params, **inputs)), runs)
  start = time.time()
  tfl = litert.load_model(convert_jax_function(comp.fn, comp.params, comp.inputs, 'fp32', name),
                          num_threads=threads)
  print(f'{name}_convert_s: {time.time() - start:.1f}')
  tfl_s = _median_s(lambda: tfl(**inputs), runs)
  print(f'{name}_canvas: {list(comp.inputs[0].shape)}')
  print(f'{name}_jax_ms: {jax_s * 1e3:.1f}')
  print(f'{name}_tflite_xnnpack_ms: {tfl_s * 1e3:.1f}')
  print(f'{name}_tflite_over_jax: {tfl_s / jax_s:.2f}')
  return tfl_s / jax_s


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tiny-size', type=int, default=256)
  parser.add_argument('--paper-size', type=int, default=512)
  parser.add_argument('--runs', type=int, default=3)
  parser.add_argument('--threads', type=int, default=os.cpu_count())
  parser.add_argument('--skip-paper', action='store_true')
  args = parser.parse_args(argv)
  print(f'cpu_threads: {args.threads}')
  ratios = {'tiny': bench('tiny', UNetConfig.tiny(), args.tiny_size, args.runs, args.threads)}
  if not args.skip_paper:
    ratios['paper'] = bench('paper', UNetConfig.paper(), args.paper_size, args.runs,
                            args.threads)
  headline = 'paper' if 'paper' in ratios else 'tiny'
  print(f'{headline}_step_tflite_over_jax_ratio: {ratios[headline]:.2f}')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
