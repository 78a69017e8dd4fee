"""Entry point: run a job's stages in a workdir.

  python -m dreamlite_jax.main --config experiments/shapes_tiny.py --workdir runs/demo \
      [--stages vae,pretrain_t2i] [--config.preset=smoke] [--config.sft.train.steps=100]

Only parses flags; the work is `dreamlite_jax.stages.run_job`.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(prog="python -m dreamlite_jax.main", description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True, help="experiment config file (get_config())")
  parser.add_argument("--workdir", required=True, help="job directory; one sub-directory per stage")
  parser.add_argument("--stages", default=None,
                      help="comma-separated stages to run (default: config.stages)")
  parser.add_argument("--compile-cache", default=os.path.expanduser("~/.cache/dreamlite_jax/xla"),
                      help="persistent XLA compilation cache ('' = off): re-runs skip compiling")
  args, rest = parser.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith("--config.")]
  if bad:
    parser.error(f"unrecognised arguments {bad} (config overrides look like --config.a.b=value)")
  return args, rest


def main(argv: Sequence[str] | None = None) -> dict:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  from dreamlite_jax import xla_cpu_flags
  xla_cpu_flags.use_memory_optimized_scheduler()
  if args.compile_cache:
    import jax
    jax.config.update("jax_compilation_cache_dir", args.compile_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  from dreamlite_jax import stages
  config = stages.load_job_config(args.config, overrides)
  return stages.run_job(config, args.workdir, stages=args.stages)


if __name__ == "__main__":
  from dreamlite_jax.config import ConfigError
  try:
    main()
  except ConfigError as e:  # a config or workdir mistake: the message, not a traceback
    sys.exit(f"error: {e}")
