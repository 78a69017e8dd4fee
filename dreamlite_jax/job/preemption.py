"""A stage stopped on a signal: the exception a stage runner raises and the job runner catches.

The trainer saves a checkpoint and returns `preempted=True` when any process was
sent SIGTERM/SIGINT. The runner then calls `raise_if_preempted`, so the job stops
without writing the stage's DONE.json and a re-run resumes from the checkpoint.
Its own module: stage runners and the job runner both import it, neither imports
the other for it.
"""
from __future__ import annotations


class StagePreempted(RuntimeError):
  """A runner stopped early on SIGTERM/SIGINT (checkpoint written): no DONE.json, re-run resumes."""


def raise_if_preempted(result, stage: str) -> None:
  """Call after `trainer.train` (`result` has `.preempted`, `.final_step`): a preempted
  stage must not be marked finished."""
  if result.preempted:
    raise StagePreempted(f"stage {stage!r} stopped at step {result.final_step} on a signal; "
                         f"its checkpoint is saved and re-running the job resumes it")
