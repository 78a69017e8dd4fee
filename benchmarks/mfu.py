"""Model FLOP utilisation of our train step against this machine's measured matmul peak.

  python -m benchmarks.mfu [--configs tiny,reduced] [--repeats 5]

The FLOPs of one step come from XLA's cost analysis of the compiled step (the
real `make_train_step` with the flow-matching loss, AdamW and EMA, see
`benchmarks.train_step_vs_torch`). The peak is not a datasheet number: it is
the median FLOP/s of a large fp32 matmul (`--matmul-size`^3, jitted) timed in
the same process, interleaved with the step, so both see the same load from
other processes. `mfu_vs_matmul_peak` = (step FLOPs / step seconds) / peak;
the last line is the tiny config's.
"""
from __future__ import annotations

import argparse

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


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default="tiny,reduced")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--matmul-size", type=int, default=2048)
  args = parser.parse_args()
  names = args.configs.split(",")
  unknown = [n for n in names if n not in SETUPS]
  if unknown:
    parser.error(f"unknown --configs {unknown}; choose from {sorted(SETUPS)}")
  print(f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform})")
  matmul, matmul_flops = matmul_fn(args.matmul_size)
  mfu = {}
  for name in names:
    setup = SETUPS[name]
    step = build_our_step(setup)
    flops = step_flops(step)
    times = timing.interleaved({"matmul": matmul, "step": step}, warmup=2, repeats=args.repeats)
    peak = matmul_flops / timing.median(times["matmul"])
    achieved = flops / timing.median(times["step"])
    print(f"{name}_batch: {setup.batch} canvas {setup.latent}x{2 * setup.latent}")
    print(f"{name}_step_gflops: {flops / 1e9:.3f}")
    timing.report(f"{name}_step", times["step"])
    print(f"{name}_achieved_gflops_per_s: {achieved / 1e9:.2f}")
    print(f"{name}_matmul_peak_gflops_per_s: {peak / 1e9:.2f}")
    mfu[name] = achieved / peak
    print(f"{name}_mfu_vs_matmul_peak: {mfu[name]:.3f}")
  print(f"mfu_vs_matmul_peak: {mfu.get('tiny', next(iter(mfu.values()))):.3f}")


if __name__ == "__main__":
  main()
