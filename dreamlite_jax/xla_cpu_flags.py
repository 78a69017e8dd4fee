"""XLA:CPU settings the job and the benchmarks run with (read when JAX starts its backend).

XLA:CPU's default instruction scheduler orders kernels for concurrency and ignores
memory, and under it remat barely lowers the temporaries. With the memory-optimised
scheduler (XLA's memory analysis, fp32): the tiny U-Net's gradient with remat at a
32x64 canvas keeps 66 MiB of temporaries instead of 164, the paper U-Net's full
train step at 1024 px 32.9 GiB instead of 50.0; the tiny job's U-Net step runs ~5%
faster (its VAE step ~4% slower) with the same results (README, Performance). GPU and
TPU backends ignore the flag.
"""
from __future__ import annotations

import os

MEMORY_OPTIMIZED_SCHEDULER = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"


def use_memory_optimized_scheduler() -> None:
  """Adds the scheduler flag to `XLA_FLAGS` unless the user chose a scheduler.

  Takes effect only if called before JAX initialises its backend (the first
  device query or computation); `import jax` alone does not initialise it.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_scheduler_type" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {MEMORY_OPTIMIZED_SCHEDULER}".strip()
