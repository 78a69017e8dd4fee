"""Where the time of our train step goes: a profiler trace, summarised by XLA kernel.

  python -m benchmarks.profile_step [--configs tiny] [--batch 16 --latent 8 --text-len 48] [--steps 5]

The `mfu` benchmark says how far the step is from the matmul peak; this says why.
It times the real jitted step (`benchmarks.train_step_vs_torch`) untraced, then
traces `--steps` calls with `jax.profiler`, reads the trace's XLA:CPU kernel events
and prints, per step: the wall time (untraced), how many kernels ran, the time
inside kernels summed over XLA's threads, the share of it in kernels that contain a
dot or convolution (`matmul_kernel_ms`), and the time per kernel kind (the HLO
instruction name without its number: `ynn_fusion`, `dot`, `multiply_add_fusion`, ...). The default
shape is the tiny job's `pretrain_t2i` step (batch 16, 8x16 canvas, 48 text tokens).

Reading the trace needs the XPlane protobuf, which TensorFlow ships
(`pip install -e ".[tflite]"`); without it the script stops with that message.
The last line is `busy_fraction`: kernel time / (wall time x threads that ran
kernels); tracing slows kernels a little, so it is an upper bound. Far below 1 means
the threads mostly wait between many small kernels (dispatch and synchronisation),
not compute.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import re
import tempfile

import jax

from benchmarks import timing
from benchmarks.train_step_vs_torch import SETUPS, build_our_step

# Executor bookkeeping events, not kernels.
_NOT_KERNELS = ("ThunkExecutor", "SlinkyThreadPool", "ThreadpoolListener", "end: ")


def _xplane_pb2():
  try:
    from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SystemExit("benchmarks.profile_step reads the trace with TensorFlow's XPlane "
                     "protobuf; install it with: pip install -e '.[tflite]'") from e
  return xplane_pb2


def matmul_instructions(hlo_text: str) -> set[str]:
  """Names of the entry-level HLO instructions (kernels) that run a dot or convolution.

  A fusion counts if the computation it calls (or one that computation calls) has one.
  """
  bodies: dict[str, str] = {}
  name = None
  for line in hlo_text.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if header:
      name = header.group(1)
      bodies[name] = ""
    elif name is not None:
      bodies[name] += line + "\n"

  def has_matmul(comp: str, seen: frozenset = frozenset()) -> bool:
    body = bodies.get(comp, "")
    if re.search(r"\b(dot|convolution)\(", body):
      return True
    return any(has_matmul(c, seen | {comp}) for c in re.findall(r"calls=%?([\w.\-]+)", body)
               if c not in seen)

  found = set()
  for body in bodies.values():
    for inst, op, rest in re.findall(r"%?([\w.\-]+) = [^=]*?\b(\w[\w\-]*)\((.*)", body):
      if op in ("dot", "convolution"):
        found.add(inst)
      elif op == "fusion" or op == "custom-call":
        called = re.search(r"calls=%?([\w.\-]+)", rest)
        if called and has_matmul(called.group(1)):
          found.add(inst)
  return found


@dataclasses.dataclass
class KernelSummary:
  """Per-step figures from a trace; times in seconds."""
  kernels: float                            # kernel launches
  kernel_s: float                           # time inside kernels, summed over threads
  threads: int                              # threads that ran kernels (>= 1% of kernel time)
  by_kind: dict[str, tuple[float, float]]   # kind -> (seconds, launches)
  matmul_s: float                           # inside kernels with a dot or convolution


def summarise(trace_dir: str, steps: int, matmul_names: set[str]) -> KernelSummary:
  """Reads the XPlane trace of `steps` calls; returns per-step kernel figures."""
  xplane_pb2 = _xplane_pb2()
  files = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
  if not files:
    raise SystemExit(f"no .xplane.pb trace under {trace_dir}")
  space = xplane_pb2.XSpace()
  with open(files[0], "rb") as f:
    space.ParseFromString(f.read())
  seconds: collections.Counter = collections.Counter()
  launches: collections.Counter = collections.Counter()
  per_thread: collections.Counter = collections.Counter()
  matmul = 0.0
  for plane in space.planes:
    for line in plane.lines:
      if line.name == "python":  # the host's Python frames; kernels run on XLA's threads
        continue
      for event in line.events:
        name = plane.event_metadata[event.metadata_id].name
        if name.startswith(_NOT_KERNELS):
          continue
        s = event.duration_ps * 1e-12
        kind = re.sub(r"\.\d+$", "", name)
        seconds[kind] += s
        launches[kind] += 1
        per_thread[plane.name, line.name] += s
        if name in matmul_names or name.removeprefix("wrapped_") in matmul_names:
          matmul += s
  total = sum(per_thread.values())
  threads = sum(1 for s in per_thread.values() if s >= 0.01 * total)
  return KernelSummary(kernels=sum(launches.values()) / steps, kernel_s=total / steps,
                       threads=max(threads, 1),
                       by_kind={k: (seconds[k] / steps, launches[k] / steps) for k in seconds},
                       matmul_s=matmul / steps)


def profile(setup, steps: int) -> tuple[float, KernelSummary]:
  """(median untraced step seconds, kernel summary of `steps` traced steps)."""
  step = build_our_step(setup)
  step.state = step.make_state()
  hlo = step.step_fn.lower(step.state, step.batch, step.rng, step.lr).compile().as_text()
  wall = timing.median(timing.interleaved({"step": step}, warmup=3, repeats=10)["step"])
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(steps):
        step()
    return wall, summarise(trace_dir, steps, matmul_instructions(hlo))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default="tiny", help=f"comma list of {sorted(SETUPS)}")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--latent", type=int, default=8, help="target latent side (canvas latent x 2*latent)")
  parser.add_argument("--text-len", type=int, default=48)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--top", type=int, default=12, help="kernel kinds to list")
  args = parser.parse_args()
  print(f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform})")
  busy = {}
  for name in args.configs.split(","):
    if name not in SETUPS:
      parser.error(f"unknown config {name!r}; choose from {sorted(SETUPS)}")
    setup = dataclasses.replace(SETUPS[name], batch=args.batch, latent=args.latent,
                                text_len=args.text_len)
    wall, s = profile(setup, args.steps)
    print(f"{name}_batch: {setup.batch} canvas {setup.latent}x{2 * setup.latent} text {setup.text_len}")
    print(f"{name}_step_ms: {wall * 1e3:.1f}")
    print(f"{name}_kernels_per_step: {s.kernels:.0f}")
    print(f"{name}_kernel_threads: {s.threads}")
    print(f"{name}_kernel_ms: {s.kernel_s * 1e3:.1f} (all threads, traced)")
    print(f"{name}_matmul_kernel_ms: {s.matmul_s * 1e3:.1f} ({s.matmul_s / s.kernel_s:.2f} of kernel time)")
    for kind, (sec, n) in sorted(s.by_kind.items(), key=lambda kv: -kv[1][0])[:args.top]:
      print(f"{name}_kind {kind}: {sec * 1e3:.2f} ms in {n:.0f} kernels")
    busy[name] = min(s.kernel_s / (wall * s.threads), 1.0)
    print(f"{name}_busy_fraction: {busy[name]:.2f}")
  print(f"busy_fraction: {busy.get('tiny', next(iter(busy.values()))):.2f}")


if __name__ == "__main__":
  main()
