"""`benchmarks.profile_step`: kernels are found in a real trace and classified by what they run."""
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import profile_step


def _program(a, b):
  # A matmul (a dot kernel) followed by elementwise work that XLA fuses into its own kernel.
  return jnp.tanh(a @ b) * 3.0 + jnp.exp(-a)


def test_matmul_instructions_names_the_dot_kernel_only():
  a = jnp.ones((256, 256), jnp.float32)
  hlo = jax.jit(_program).lower(a, a).compile().as_text()
  names = profile_step.matmul_instructions(hlo)
  assert names, "the dot of a @ b must be classified as a matmul kernel"
  entry_ops = [line.split("=")[0].strip().lstrip("%") for line in hlo.splitlines()
               if " = " in line and ("fusion(" in line or "dot(" in line)]
  assert any(op not in names for op in entry_ops), "the elementwise fusion is not a matmul"


def test_summarise_counts_the_kernels_of_a_traced_program():
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((512, 512)), jnp.float32)
  fn = jax.jit(_program)
  compiled_hlo = fn.lower(a, a).compile().as_text()
  jax.block_until_ready(fn(a, a))
  steps = 3
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(steps):
        jax.block_until_ready(fn(a, a))
    summary = profile_step.summarise(trace_dir, steps,
                                     profile_step.matmul_instructions(compiled_hlo))
  assert summary.kernels >= 2          # at least the dot and the elementwise fusion, per call
  assert 0.0 < summary.matmul_s < summary.kernel_s
  assert summary.kernel_s == pytest.approx(sum(s for s, _ in summary.by_kind.values()))
  assert summary.threads >= 1
