"""Benchmark exported models on an Android phone with the official `benchmark_model` binary.

Pushes the `.tflite` files of an export directory and the binary (TFLite's
`benchmark_model` or LiteRT's; the path is given by the user) with adb, runs it
once per model, parses init / first / warmup / average inference times, memory,
and whether the GPU delegate took the whole graph, then prints a table and the
estimated end-to-end latency:
  generate = text encoder (all parts) + num_steps x U-Net + VAE decoder
  edit     = generate + VAE encoder

  python -m converters.android_bench --models DIR --benchmark-binary PATH \
      [--serial S] [--use-gpu] [--runs N] [--warmup-runs N]

adb always gets argument lists (never a local shell string), and file names that
reach the device shell are restricted to [A-Za-z0-9_.-].
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

REMOTE_DIR = '/data/local/tmp/dreamlite'
_SAFE_NAME = re.compile(r'^[A-Za-z0-9_.-]+$')
_NUM = r'([0-9.]+(?:[eE][+-]?[0-9]+)?)'
_TIMINGS = re.compile(rf'Inference timings in us: Init: {_NUM}, First inference: {_NUM}, '
                      rf'Warmup \(avg\): {_NUM}, Inference \(avg\): {_NUM}')
_COUNT = re.compile(rf'count=(\d+) first={_NUM} curr={_NUM} min={_NUM} max={_NUM} avg={_NUM} '
                    rf'std={_NUM}')
_REPLACING = re.compile(r'Replacing (\d+) out of (\d+) node\(s\) with delegate \(([^)]*)\) node, '
                        r'yielding (\d+) partitions')
_GPU_CPU_SPLIT = re.compile(r'(\d+) operations will run on the GPU, and the remaining (\d+) '
                            r'operations? will run on the CPU')
_UNSUPPORTED_HEADER = 'operations are not supported by GPU delegate'
_UNSUPPORTED_OP = re.compile(r'^(?:\w+: )?([A-Z][A-Z0-9_]+): (.+)$')
_MEM_DELTA = re.compile(rf'Memory footprint delta from the start of the tool \(MB\): '
                        rf'init={_NUM} overall={_NUM}')
_MEM_PEAK = re.compile(rf'Overall peak memory footprint \(MB\) via periodic monitoring: {_NUM}')
_FAILURES = ('Failed to apply', 'Failed to compile model', 'Failed to create', 'Benchmarking failed',
             'Failed to invoke', 'Failed to allocate', 'Failed to load model',
             'will not be executed by the delegate')


class BenchError(RuntimeError):
  """adb or the benchmark binary failed in a way that leaves no timings."""


@dataclasses.dataclass
class BenchResult:
  """Parsed `benchmark_model` output of one model (times in ms, memory in MB)."""
  model: str
  init_ms: float | None = None
  first_ms: float | None = None
  warmup_ms: float | None = None
  avg_ms: float | None = None
  std_ms: float | None = None
  runs: int | None = None
  mem_init_mb: float | None = None
  mem_overall_mb: float | None = None
  peak_mem_mb: float | None = None
  delegate: str | None = None
  delegated_nodes: int | None = None
  total_nodes: int | None = None
  partitions: int | None = None
  cpu_ops: int | None = None
  unsupported_ops: list[str] = dataclasses.field(default_factory=list)
  errors: list[str] = dataclasses.field(default_factory=list)

  @property
  def cpu_fallback(self) -> bool:
    """True when part of the graph runs on the CPU instead of the delegate."""
    partial = (self.delegated_nodes is not None and self.total_nodes is not None
               and self.delegated_nodes < self.total_nodes)
    multi = self.partitions is not None and self.partitions > 1
    return bool(partial or multi or (self.cpu_ops or 0) > 0 or self.unsupported_ops)

  @property
  def status(self) -> str:
    if self.errors or self.avg_ms is None:
      return 'FAILED'
    return 'CPU-FALLBACK' if self.cpu_fallback else 'ok'


def parse_benchmark_output(model: str, text: str) -> BenchResult:
  """Parses classic TFLite and LiteRT `benchmark_model` output (log prefixes are ignored)."""
  r = BenchResult(model)
  in_unsupported = False
  for raw in text.splitlines():
    line = re.sub(r'^(?:[IWEF]\d{4} [\d:.]+\s+\d+ \S+\] |(?:INFO|WARNING|ERROR|VERBOSE): '
                  r'(?:\[[^\]]*\] )?)', '', raw.strip())
    if _UNSUPPORTED_HEADER in line:
      in_unsupported = True
      continue
    if in_unsupported:
      m = _UNSUPPORTED_OP.match(line)
      if m:
        r.unsupported_ops.append(f'{m.group(1)}: {m.group(2)}')
        continue
      in_unsupported = False
    if m := _TIMINGS.search(line):
      r.init_ms, r.first_ms, r.warmup_ms, r.avg_ms = (float(v) / 1000 for v in m.groups())
    elif m := _COUNT.search(line):
      r.runs, r.std_ms = int(m.group(1)), float(m.group(7)) / 1000
    elif m := _REPLACING.search(line):
      delegated, total = int(m.group(1)), int(m.group(2))
      # Several delegates (GPU, then XNNPACK on what is left) each print a line; the GPU
      # one, else the first one, is the accelerator that was asked for.
      is_gpu = 'gpu' in m.group(3).lower()
      if r.delegate is None or (is_gpu and 'gpu' not in r.delegate.lower()):
        r.delegated_nodes, r.total_nodes = delegated, total
        r.delegate, r.partitions = m.group(3), int(m.group(4))
    elif m := _GPU_CPU_SPLIT.search(line):
      r.cpu_ops = int(m.group(2))
    elif m := _MEM_DELTA.search(line):
      r.mem_init_mb, r.mem_overall_mb = float(m.group(1)), float(m.group(2))
    elif m := _MEM_PEAK.search(line):
      r.peak_mem_mb = float(m.group(1))
    elif 'partially executed by the delegate' in line and r.cpu_ops is None:
      r.cpu_ops = r.cpu_ops or 1  # the tool says so even when it prints no counts
    if any(f in line for f in _FAILURES):
      r.errors.append(line)
  return r


def _adb(adb: str, serial: str | None, *args: str, timeout: float = 600) -> str:
  cmd = [adb] + (['-s', serial] if serial else []) + list(args)
  try:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
  except FileNotFoundError:
    raise BenchError(f'adb executable not found: {adb!r} (install platform-tools or pass --adb)')
  except subprocess.TimeoutExpired:
    raise BenchError(f'{" ".join(cmd)} timed out after {timeout:.0f}s')
  if done.returncode != 0:
    raise BenchError(f'{" ".join(cmd)} exited {done.returncode}: '
                     f'{(done.stderr or done.stdout).strip()[-2000:]}')
  return done.stdout + done.stderr


def model_files(models_dir: Path) -> dict[str, Path]:
  """Component name -> `.tflite` path, from manifest.json when present."""
  manifest = models_dir / 'manifest.json'
  if manifest.is_file():
    entries = json.loads(manifest.read_text())['models']
    files = {name: models_dir / e['file'] for name, e in entries.items()}
  else:
    files = {p.stem: p for p in sorted(models_dir.glob('*.tflite'))}
  if not files:
    raise BenchError(f'no .tflite models in {models_dir}')
  for name, path in files.items():
    if not path.is_file():
      raise BenchError(f'{path}: listed model file is missing')
    if not _SAFE_NAME.match(path.name):
      raise BenchError(f'{path.name}: model file names must match [A-Za-z0-9_.-]+')
  return files


def run_benchmarks(models_dir: Path, binary: Path, *, serial: str | None = None,
                   use_gpu: bool = True, runs: int = 20, warmup_runs: int = 3,
                   adb: str = 'adb') -> dict[str, BenchResult]:
  """Pushes everything, runs `benchmark_model` per model, returns parsed results."""
  if not binary.is_file():
    raise BenchError(f'--benchmark-binary not found: {binary}')
  if not _SAFE_NAME.match(binary.name):
    raise BenchError(f'{binary.name}: binary name must match [A-Za-z0-9_.-]+')
  files = model_files(models_dir)
  state = _adb(adb, serial, 'get-state', timeout=30).strip()
  if state != 'device':
    raise BenchError(f'adb device state is {state!r}, expected "device"')
  _adb(adb, serial, 'shell', 'mkdir', '-p', REMOTE_DIR)
  remote_bin = f'{REMOTE_DIR}/{binary.name}'
  _adb(adb, serial, 'push', str(binary), remote_bin)
  _adb(adb, serial, 'shell', 'chmod', '755', remote_bin)
  results = {}
  for name, path in files.items():
    remote = f'{REMOTE_DIR}/{path.name}'
    _adb(adb, serial, 'push', str(path), remote)
    args = [f'--graph={remote}', f'--use_gpu={str(use_gpu).lower()}', f'--num_runs={runs}',
            f'--warmup_runs={warmup_runs}', '--report_peak_memory_footprint=true']
    # The benchmark exits non-zero when the delegate fails; keep its output to report why.
    cmd = [adb] + (['-s', serial] if serial else []) + ['shell', remote_bin, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    result = parse_benchmark_output(name, done.stdout + done.stderr)
    if done.returncode != 0 and not result.errors:
      result.errors.append(f'benchmark_model exited {done.returncode}')
    results[name] = result
  return results


def end_to_end_ms(results: dict[str, BenchResult], num_steps: int,
                  text_parts: list[str]) -> dict[str, float | None]:
  """Estimated generate / edit latency from per-model averages (None if any is missing)."""
  def avg(name):
    r = results.get(name)
    return None if r is None or r.avg_ms is None else r.avg_ms
  parts = [avg(p) for p in text_parts] + [avg('unet'), avg('vae_decoder')]
  if any(p is None for p in parts) or not text_parts:
    return {'generate': None, 'edit': None}
  generate = sum(parts[:-2]) + num_steps * parts[-2] + parts[-1]
  enc = avg('vae_encoder')
  return {'generate': generate, 'edit': None if enc is None else generate + enc}


def _fmt(v, spec='.1f') -> str:
  return '-' if v is None else format(v, spec)


def format_table(results: dict[str, BenchResult]) -> str:
  head = (f'{"model":<16}{"status":<14}{"init ms":>10}{"first ms":>10}{"warmup ms":>11}'
          f'{"avg ms":>10}{"std ms":>8}{"peak MB":>9}  delegated')
  rows = [head, '-' * len(head)]
  for r in results.values():
    delegated = ('-' if r.total_nodes is None
                 else f'{r.delegated_nodes}/{r.total_nodes} nodes, {r.partitions} partition(s)')
    rows.append(f'{r.model:<16}{r.status:<14}{_fmt(r.init_ms):>10}{_fmt(r.first_ms):>10}'
                f'{_fmt(r.warmup_ms):>11}{_fmt(r.avg_ms):>10}{_fmt(r.std_ms, ".2f"):>8}'
                f'{_fmt(r.peak_mem_mb):>9}  {delegated}')
    for line in r.unsupported_ops + r.errors:
      rows.append(f'{"":<16}! {line}')
  return '\n'.join(rows)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', required=True, type=Path, help='export directory')
  parser.add_argument('--benchmark-binary', required=True, type=Path,
                      help='benchmark_model built for the phone (TFLite or LiteRT)')
  parser.add_argument('--serial', default=None, help='adb device serial')
  parser.add_argument('--use-gpu', action='store_true', help='run on the GPU delegate')
  parser.add_argument('--runs', type=int, default=20)
  parser.add_argument('--warmup-runs', type=int, default=3)
  parser.add_argument('--adb', default=shutil.which('adb') or 'adb', help='adb executable')
  args = parser.parse_args(argv)
  if args.runs < 1 or args.warmup_runs < 0:
    parser.error('--runs must be >= 1 and --warmup-runs >= 0')
  try:
    results = run_benchmarks(args.models, args.benchmark_binary, serial=args.serial,
                             use_gpu=args.use_gpu, runs=args.runs, warmup_runs=args.warmup_runs,
                             adb=args.adb)
  except BenchError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(format_table(results))
  manifest_path = args.models / 'manifest.json'
  if manifest_path.is_file():
    manifest = json.loads(manifest_path.read_text())
    steps = manifest['scheduler']['num_steps']
    text_parts = manifest['text']['encoder_models']
  else:
    steps, text_parts = 4, [n for n in results if n.startswith('text_encoder')]
  e2e = end_to_end_ms(results, steps, text_parts)
  print(f'text encoder + {steps} x unet + vae_decoder (generate): {_fmt(e2e["generate"])} ms')
  print(f'generate + vae_encoder (edit): {_fmt(e2e["edit"])} ms')
  bad = [r.model for r in results.values() if r.status != 'ok']
  if bad:
    print(f'not clean on this device: {", ".join(bad)}', file=sys.stderr)
  return 1 if bad else 0


if __name__ == '__main__':
  sys.exit(main())
