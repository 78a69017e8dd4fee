"""Runs the tiny trainer in a separate process (for kill/resume and multi-process tests).

  python tests/training/run_tiny_train.py --workdir DIR [--steps 6] [--fsdp 2]
      [--signal-at 3:TERM] [--delay 0.0]
      [--process-id 0 --num-processes 2 --port 12345]

Prints one line `RESULT {json}` with this run's losses when `train` returns.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--fsdp", type=int, default=2)
  parser.add_argument("--signal-at", default="")
  parser.add_argument("--delay", type=float, default=0.0, help="seconds to sleep per batch")
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument("--num-processes", type=int, default=1)
  parser.add_argument("--port", type=int, default=0)
  args = parser.parse_args()

  import jax
  jax.config.update("jax_default_matmul_precision", "highest")
  if os.environ.get("DREAMLITE_TEST_COMPILE_CACHE"):
    jax.config.update("jax_compilation_cache_dir", os.environ["DREAMLITE_TEST_COMPILE_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{args.port}",
                               num_processes=args.num_processes, process_id=args.process_id)

  import training_fixtures as fx
  from dreamlite_jax.training import trainer

  config = fx.tiny_config(steps=args.steps)
  config.mesh.fsdp = args.fsdp
  signal_at = {}
  if args.signal_at:
    index, name = args.signal_at.split(":")
    signal_at[int(index)] = fx.SIGNALS[name]
  local_batch = config.train.batch_size // jax.process_count()
  stream = fx.SyntheticStream(local_batch, process=jax.process_index(), signal_at=signal_at,
                              delay=args.delay)
  init_params, loss_fn = fx.make_model_fns()
  result = trainer.train(config, args.workdir, loss_fn, stream, init_params)
  print("RESULT " + json.dumps({
      "process": jax.process_index(), "start_step": result.start_step,
      "final_step": result.final_step, "preempted": result.preempted,
      "losses": {str(h["step"]): h["loss"] for h in result.history}}), flush=True)


if __name__ == "__main__":
  main()
