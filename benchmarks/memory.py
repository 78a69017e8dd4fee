"""Memory of our train step per device (XLA memory analysis), and what remat buys.

  python -m benchmarks.memory [--repeats 5] [--skip-paper]

For the tiny config (the CPU default's shape) and the paper U-Net at 1024px
(batch 1 per device, canvas latent 128x256, 128 text tokens; compiled on
abstract inputs, nothing allocated), with `UNetConfig.remat` off and on:
parameter, optimiser and EMA bytes (from the state's shapes), and XLA's
argument / output / alias / temporary bytes of the compiled step. Temporaries
are the activations saved for backward plus scratch, which is what remat
trades for recompute. Then it times the real tiny and reduced steps with remat
off and on, interleaved. fp32 everywhere (the CPU run); on an accelerator the
paper config trains in bf16 compute with fp32 master weights.
XLA:CPU runs with the job's memory-optimised scheduler (`dreamlite_jax.xla_cpu_flags`);
`XLA_FLAGS=--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT` shows XLA's default,
which keeps about 1.5x the temporaries (paper at 1024: 50.0 against 32.9 GiB).
The last line is the paper-scale `remat_temp_ratio` (temporaries with / without).
"""
from __future__ import annotations

import argparse
import dataclasses
import os

import jax
import numpy as np

from benchmarks import timing
from benchmarks.train_step_vs_torch import SETUPS, Setup, build_our_step, make_batch
from dreamlite_jax.models.unet import UNetConfig
from dreamlite_jax.training import step as step_lib

PAPER_1024 = Setup(UNetConfig.paper(), batch=1, latent=128, text_len=128)


def _gib(n: float) -> str:
  return f"{n / 2**30:.4f}"


def _bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def with_remat(setup: Setup, remat: bool) -> Setup:
  return dataclasses.replace(setup, unet=dataclasses.replace(setup.unet, remat=remat))


def analyse(name: str, setup: Setup) -> dict[str, float]:
  """Compiles the step on abstract inputs; prints and returns its memory figures in bytes."""
  step = build_our_step(setup)
  abstract = step.abstract_state
  batch = step_lib.abstract_batch(make_batch(setup), step.mesh)
  rng = jax.ShapeDtypeStruct((2,), np.uint32, sharding=step.rng.sharding)
  compiled, seconds = step_lib.compile_step(step.step_fn, abstract, batch, rng, step.lr)
  mem = compiled.memory_analysis()
  out = {"params": _bytes(abstract.params), "optimizer": _bytes(abstract.opt_state),
         "ema": _bytes(abstract.ema_params), "argument": mem.argument_size_in_bytes,
         "output": mem.output_size_in_bytes, "alias": mem.alias_size_in_bytes,
         "temp": mem.temp_size_in_bytes}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  print(f"{name}_compile_seconds: {seconds:.1f}")
  for key, value in out.items():
    print(f"{name}_{key}_gib: {_gib(value)}")
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--skip-paper", action="store_true", help="no paper-scale compile")
  args = parser.parse_args()
  print(f"xla_flags: {os.environ.get('XLA_FLAGS', '')}")
  setups = {"tiny": SETUPS["tiny"]}
  if not args.skip_paper:
    setups["paper_1024"] = PAPER_1024
  temp = {}
  for name, setup in setups.items():
    print(f"{name}_batch: {setup.batch} canvas {setup.latent}x{2 * setup.latent} "
          f"text {setup.text_len}")
    for remat in (False, True):
      temp[name, remat] = analyse(f"{name}_remat_{'on' if remat else 'off'}",
                                  with_remat(setup, remat))["temp"]
    print(f"{name}_remat_temp_ratio: {temp[name, True] / temp[name, False]:.3f}")
  for name in ("tiny", "reduced"):
    steps = {f"remat_{k}": build_our_step(with_remat(SETUPS[name], r))
             for k, r in (("off", False), ("on", True))}
    times = timing.interleaved(steps, warmup=2, repeats=args.repeats)
    medians = {k: timing.report(f"{name}_step_{k}", v) for k, v in times.items()}
    print(f"{name}_remat_step_time_ratio: {medians['remat_on'] / medians['remat_off']:.3f}")
  last = "paper_1024" if "paper_1024" in setups else "tiny"
  print(f"remat_temp_ratio: {temp[last, True] / temp[last, False]:.3f}")


if __name__ == "__main__":
  main()
