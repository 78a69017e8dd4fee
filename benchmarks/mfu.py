"""Model FLOP utilisation of our train step against this machine's measured matmul peak.

  python -m benchmarks.mfu [--configs tiny,reduced] [--repeats 5] [--batches 4,16,64]

The FLOPs of one step come from XLA's cost analysis of the compiled step (the
real `make_train_step` with the flow-matching loss, AdamW and EMA, see
`benchmarks.train_step_vs_torch`). The peak is not a datasheet number: it is
the median FLOP/s of a large fp32 matmul (`--matmul-size`^3, jitted) timed in
the same process, interleaved with the step, so both see the same load from
other processes. `mfu_vs_matmul_peak` = (step FLOPs / step seconds) / peak;
the last line is the tiny config's (at its own batch).

`--batches` times each config at other batch sizes too (`<config>_b<batch>_*` lines).
If the kernels only waited on dispatch, MFU would climb with the batch; if it stays
flat, the step is bound by per-element work (norms, activations, depthwise
convolutions, skinny matmuls at these widths), which no batch size amortises.
"""
from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from benchmarks.train_step_vs_torch import SETUPS, build_our_step


def matmul_fn(n: int):
  """A jitted fp32 `[n, n] @ [n, n]` and its FLOPs (2 n^3)."""
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
  b = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
  mm = jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST))
  return (lambda: jax.block_until_ready(mm(a, b))), 2.0 * n**3


def step_flops(step) -> float:
  """FLOPs of one call of an `OurStep`, from XLA's cost analysis of its compiled program."""
  state = step.make_state()
  compiled = step.step_fn.lower(state, step.batch, step.rng, step.lr).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  step.state = state
  return float(cost["flops"])


def _measure(label: str, setup, matmul, matmul_flops: float, repeats: int) -> float:
  """Prints one config's step FLOPs, times and MFU; returns the MFU."""
  step = build_our_step(setup)
  flops = step_flops(step)
  times = timing.interleaved({"matmul": matmul, "step": step}, warmup=2, repeats=repeats)
  peak = matmul_flops / timing.median(times["matmul"])
  achieved = flops / timing.median(times["step"])
  print(f"{label}_batch: {setup.batch} canvas {setup.latent}x{2 * setup.latent}")
  print(f"{label}_step_gflops: {flops / 1e9:.3f}")
  timing.report(f"{label}_step", times["step"])
  print(f"{label}_achieved_gflops_per_s: {achieved / 1e9:.2f}")
  print(f"{label}_matmul_peak_gflops_per_s: {peak / 1e9:.2f}")
  print(f"{label}_mfu_vs_matmul_peak: {achieved / peak:.3f}")
  return achieved / peak


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default="tiny,reduced")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--matmul-size", type=int, default=2048)
  parser.add_argument("--batches", default="",
                      help="comma list of extra batch sizes per config (default: only its own)")
  args = parser.parse_args()
  names = args.configs.split(",")
  unknown = [n for n in names if n not in SETUPS]
  if unknown:
    parser.error(f"unknown --configs {unknown}; choose from {sorted(SETUPS)}")
  print(f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform})")
  matmul, matmul_flops = matmul_fn(args.matmul_size)
  batches = [int(b) for b in args.batches.split(",")] if args.batches else []
  mfu = {}
  for name in names:
    for batch in [SETUPS[name].batch] + [b for b in batches if b != SETUPS[name].batch]:
      setup = dataclasses.replace(SETUPS[name], batch=batch)
      label = name if batch == SETUPS[name].batch else f"{name}_b{batch}"
      mfu[label] = _measure(label, setup, matmul, matmul_flops, args.repeats)
  print(f"mfu_vs_matmul_peak: {mfu.get('tiny', next(iter(mfu.values()))):.3f}")


if __name__ == "__main__":
  main()
