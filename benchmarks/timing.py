"""Fair wall-clock timing on a shared, noisy CPU: interleave the contenders.

Other processes come and go on the same cores, so timing "ours" for a minute
and then "theirs" for a minute lets a burst of load land on one side only.
`interleaved` runs the contenders round-robin (A B A B ...) in one process,
after warmup, and reports each one's median; the ratio of medians is what the
benchmarks print. Every timed call must block until its result is ready
(`jax.block_until_ready` on the JAX side; torch CPU ops are synchronous).
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Mapping

from dreamlite_jax import xla_cpu_flags

# Import this module before torch: with the default (spinning) OpenMP wait policy,
# torch's 2 intra-op threads on an oversubscribed shared CPU took 15 s for a step
# that takes 0.24 s with passive waiting. Passive is the fair setting for torch here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Ours runs with the XLA:CPU settings the job uses (set before JAX starts its backend).
xla_cpu_flags.use_memory_optimized_scheduler()


def interleaved(contenders: Mapping[str, Callable[[], object]], warmup: int = 2,
                repeats: int = 5) -> dict[str, list[float]]:
  """Runs each `fn()` `warmup` times, then `repeats` rounds of one call each, round-robin.

  Returns {name: [seconds per timed call]}.
  """
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}")
  for fn in contenders.values():
    for _ in range(warmup):
      fn()
  times: dict[str, list[float]] = {name: [] for name in contenders}
  for _ in range(repeats):
    for name, fn in contenders.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return times


def median(times: list[float]) -> float:
  return statistics.median(times)


def spread(times: list[float]) -> str:
  """`min..max` of a list of seconds, for judging the noise next to a median."""
  return f"{min(times):.4f}..{max(times):.4f}"


def report(name: str, times: list[float]) -> float:
  """Prints `name_seconds: median` and `name_range: min..max`; returns the median."""
  m = median(times)
  print(f"{name}_seconds: {m:.4f}")
  print(f"{name}_range: {spread(times)}")
  return m
