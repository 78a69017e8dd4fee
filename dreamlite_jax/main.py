"""Entry point: run a job's stages in a workdir.

  python -m dreamlite_jax.main --config experiments/shapes_tiny.py --workdir runs/demo \
      [--stages vae,pretrain_t2i] [--config.preset=smoke] [--config.sft.train.steps=100]

Several processes (one per host of a pod; the workdir shared by all, e.g. `gs://...`):

  # TPU pod slice / SLURM / a GPU cluster JAX detects: run the same command on every host
  python -m dreamlite_jax.main --distributed --config ... --workdir gs://bucket/run
  # explicit start (e.g. CPU hosts, gloo collectives): process I of N, process 0 at HOST
  python -m dreamlite_jax.main --coordinator HOST:PORT --num-processes N --process-id I \
      --config ... --workdir DIR

Only parses flags and starts JAX; the work is `dreamlite_jax.job.stages.run_job`, after
`stages.load_job_config` has validated the whole job (a config or workdir mistake
exits with one `error: ...` line, no traceback).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import jax

from dreamlite_jax.job import stages
from dreamlite_jax import xla_cpu_flags
from dreamlite_jax.config import ConfigError


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(prog="python -m dreamlite_jax.main", description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True, help="experiment config file (get_config())")
  parser.add_argument("--workdir", required=True,
                      help="job directory (a path or a URL such as gs://bucket/run); one "
                           "sub-directory per stage")
  parser.add_argument("--stages", default=None,
                      help="comma-separated stages to run (default: config.stages)")
  parser.add_argument("--compile-cache", default=os.path.expanduser("~/.cache/dreamlite_jax/xla"),
                      help="persistent XLA compilation cache ('' = off): re-runs skip compiling")
  parser.add_argument("--distributed", action="store_true",
                      help="multi-process job: jax.distributed.initialize() from the cluster "
                           "environment (TPU pod slices, SLURM, GPU clusters)")
  parser.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                      help="multi-process job with an explicit start: process 0's address "
                           "(with --num-processes and --process-id)")
  parser.add_argument("--num-processes", type=int, default=None)
  parser.add_argument("--process-id", type=int, default=None)
  args, rest = parser.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith("--config.")]
  if bad:
    parser.error(f"unrecognised arguments {bad} (config overrides look like --config.a.b=value)")
  explicit = (args.coordinator, args.num_processes, args.process_id)
  if args.distributed and any(v is not None for v in explicit):
    parser.error("--distributed reads the cluster environment; it takes no --coordinator, "
                 "--num-processes or --process-id")
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      parser.error("an explicit multi-process start needs all of --coordinator HOST:PORT, "
                   "--num-processes N and --process-id I")
    if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
      parser.error(f"--process-id {args.process_id} must be in [0, --num-processes "
                   f"{args.num_processes})")
  return args, rest


def start_processes(args: argparse.Namespace) -> None:
  """Joins the job's processes (before anything touches the devices).

  `--distributed`: `jax.distributed.initialize()` reads the cluster environment.
  `--coordinator`: an explicit start; CPU processes use gloo for their collectives
  (the option only concerns the CPU backend).
  """
  if args.distributed:
    jax.distributed.initialize()
  elif args.coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)


def main(argv: Sequence[str] | None = None) -> dict:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  xla_cpu_flags.use_memory_optimized_scheduler()
  if args.compile_cache:
    jax.config.update("jax_compilation_cache_dir", args.compile_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  start_processes(args)
  config = stages.load_job_config(args.config, overrides, stages=args.stages)
  return stages.run_job(config, args.workdir, stages=args.stages)


if __name__ == "__main__":
  try:
    main()
  except ConfigError as e:  # a config or workdir mistake: the message, not a traceback
    sys.exit(f"error: {e}")
