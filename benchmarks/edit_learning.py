"""What makes editing learn: the job's `pretrain_edit` stage, variants side by side.

Every variant starts from the same finished job's `pretrain_t2i` checkpoint (its `vae`,
`pretrain_t2i` and `data` directories are linked into a fresh workdir per variant), runs
`pretrain_edit` with the variant's `--config.*` overrides on top of the common ones, and
is scored by the stage check every `--every` steps (the same points the report's learning
curve plots). Prints one table: variant, steps, final loss, edit accuracy (held-in,
held-out) at each check, T2I at the end, wall time.

  python -m benchmarks.edit_learning --job runs/demo --out runs/edit_learning --steps 400 \\
      --variant baseline: \\
      --variant high_noise:--config.pretrain_edit.loss.logit_mean=1.0
"""
from __future__ import annotations

import argparse
import json
import os
import time

from dreamlite_jax import main as main_lib
from dreamlite_jax.training import metrics as metrics_lib

CONFIG = "experiments/shapes_tiny.py"
LINKED = ("vae", "pretrain_t2i", "data")


def parse_variant(text: str) -> tuple[str, list[str]]:
  """`name:--config.a=1,--config.b=2` -> (name, overrides)."""
  name, _, overrides = text.partition(":")
  return name, [o for o in overrides.split(",") if o]


def run_variant(job: str, out: str, name: str, overrides: list[str], steps: int, every: int,
                per_type: int) -> dict:
  workdir = os.path.join(out, name)
  os.makedirs(workdir, exist_ok=True)
  for sub in LINKED:
    link = os.path.join(workdir, sub)
    if not os.path.exists(link):
      os.symlink(os.path.abspath(os.path.join(job, sub)), link)
  common = [f"--config.pretrain_edit.train.steps={steps}", f"--config.eval.stage_check.every={every}",
            f"--config.eval.stage_check.per_type={per_type}"]
  start = time.time()
  main_lib.main(["--config", CONFIG, "--workdir", workdir, "--stages", "pretrain_edit",
                 *common, *overrides])
  seconds = time.time() - start
  stage = os.path.join(workdir, "pretrain_edit")
  with open(os.path.join(stage, "DONE.json")) as f:
    results = json.load(f)["results"]
  checks = {int(h["step"]): h["check_edit"] for h in metrics_lib.read_metrics(stage)
            if "check_edit" in h}
  scores = results["scores"]
  checks[int(results["steps"])] = scores["edit"]["accuracy"]
  return {"variant": name, "overrides": overrides, "steps": results["steps"],
          "final_loss": results["final_loss"], "edit_by_step": dict(sorted(checks.items())),
          "edit_heldout": scores["edit"]["heldout_accuracy"], "t2i": scores["t2i"]["overall"],
          "edit_types": {k: v for k, v in scores["edit"].items()
                         if k not in ("accuracy", "heldout_accuracy")},
          "wall_time_s": seconds}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--job", required=True, help="a finished job's workdir (pretrain_t2i done)")
  parser.add_argument("--out", required=True)
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--every", type=int, default=100)
  parser.add_argument("--per-type", type=int, default=8, help="edits per type per check")
  parser.add_argument("--variant", action="append", required=True,
                      help="name:--config.x=1,--config.y=2 (overrides of the edit stage)")
  args = parser.parse_args()
  rows = [run_variant(args.job, args.out, *parse_variant(v), args.steps, args.every,
                      args.per_type) for v in args.variant]
  with open(os.path.join(args.out, "edit_learning.json"), "w") as f:
    json.dump(rows, f, indent=2)
  print("\n| variant | steps | final loss | edit accuracy by step | held-out | T2I | wall s |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    by_step = ", ".join(f"{s}: {a:.2f}" for s, a in r["edit_by_step"].items())
    print(f"| {r['variant']} | {r['steps']} | {r['final_loss']:.3f} | {by_step} | "
          f"{r['edit_heldout']:.2f} | {r['t2i']:.2f} | {r['wall_time_s']:.0f} |")


if __name__ == "__main__":
  main()
