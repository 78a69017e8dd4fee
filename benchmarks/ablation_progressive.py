"""Ablation: task-progressive vs joint-from-scratch pretraining, spatial vs channel conditioning.

Trains the tiny shapes model three ways with the same total U-Net steps and
the same VAE, text encoder and data, then scores each with the shapes evaluator:
  progressive_spatial  pretrain_t2i -> pretrain_edit -> pretrain_joint (DreamLite)
  joint_spatial        pretrain_joint only, from scratch, for the summed steps
  progressive_channel  as progressive_spatial, the source stacked on channels
                       (U-Net in_channels = 8 on the W-wide canvas)

  python -m benchmarks.ablation_progressive [--workdir runs/ablation] [--scale 1.0]
      [--vae-job runs/demo] [--config.<field>=value ...]

`--scale` multiplies the U-Net stages' steps (0.1 for a quick look); the VAE is
trained once at full length (every variant decodes with it, and a short VAE
caps every score near 0), or taken from `--vae-job`, a finished job's workdir
(its `vae/` stage and rendered `data/raw.npz`). Prints `name: value` lines;
the headline (progressive / joint edit accuracy) last.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from dreamlite_jax.job import stages

CONFIG = os.path.join(os.path.dirname(__file__), "..", "experiments", "shapes_tiny.py")
PRETRAIN = ("pretrain_t2i", "pretrain_edit", "pretrain_joint")


def variant_overrides(name: str, steps: dict[str, int], vae_dir: str) -> list[str]:
  """Config overrides of one variant (the shared VAE, the stage list, the parent chain)."""
  # No distillation here: every variant is scored with the teacher sampler (28 steps, CFG).
  common = [f"model.vae_checkpoint={vae_dir}", "eval.stage_check.enabled=False",
            "eval.sampler.steps=28", "eval.sampler.guidance=3.5", "eval.sampler.image_guidance=1.0"]
  if name == "joint_spatial":
    total = sum(steps.values())
    return common + ["stages=pretrain_joint,eval", "pretrain_joint.parent=",
                     f"pretrain_joint.train.steps={total}", "eval.parent=pretrain_joint"]
  chain = [f"{s}.train.steps={steps[s]}" for s in PRETRAIN]
  out = common + chain + ["stages=" + ",".join(PRETRAIN) + ",eval", "eval.parent=pretrain_joint"]
  if name == "progressive_channel":
    out.append("model.conditioning=channel")
  return out


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="runs/ablation")
  parser.add_argument("--scale", type=float, default=1.0,
                      help="multiplies the U-Net stages' steps")
  parser.add_argument("--vae-job", default="",
                      help="a finished job's workdir whose vae/ stage and data/ to reuse")
  args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
  base = stages.load_job_config(CONFIG, overrides)
  scaled = lambda n: max(1, int(round(n * args.scale)))
  steps = {s: scaled(base[s].train.steps) for s in PRETRAIN}
  warmups = [f"{s}.train.warmup_steps={min(base[s].train.warmup_steps, scaled(base[s].train.steps))}"
             for s in PRETRAIN]
  vae_job = os.path.abspath(args.vae_job or os.path.join(args.workdir, "vae_job"))
  if not args.vae_job:
    stages.run_job(stages.load_job_config(CONFIG, overrides), vae_job, stages="vae")
  elif not os.path.exists(os.path.join(vae_job, "vae", stages.DONE_FILE)):
    sys.exit(f"--vae-job {args.vae_job}: no finished vae stage there")
  results = {}
  for name in ("progressive_spatial", "joint_spatial", "progressive_channel"):
    workdir = os.path.abspath(os.path.join(args.workdir, name))
    config = stages.load_job_config(
        CONFIG, overrides + warmups + variant_overrides(name, steps, os.path.join(vae_job, "vae")))
    # The variants read the shared VAE job's rendered data instead of re-rendering it.
    os.makedirs(os.path.join(workdir, "data"), exist_ok=True)
    raw = os.path.join(workdir, "data", "raw.npz")
    if not os.path.exists(raw):
      os.symlink(os.path.join(vae_job, "data", "raw.npz"), raw)
    start = time.time()
    records = stages.run_job(config, workdir, log=lambda m: None)
    scores = records["eval"]["results"]["scores"]
    results[name] = scores
    print(f"{name}_wall_s: {time.time() - start:.0f}")
    for task, key in (("t2i", "overall"), ("t2i", "heldout_overall"), ("edit", "accuracy"),
                      ("edit", "heldout_accuracy")):
      print(f"{name}_{task}_{key}: {scores[task][key]:.3f}")
  print(f"total_unet_steps: {sum(steps.values())}")
  joint = results["joint_spatial"]["edit"]["accuracy"]
  channel = results["progressive_channel"]["edit"]["accuracy"]
  progressive = results["progressive_spatial"]["edit"]["accuracy"]
  print(f"spatial_over_channel_edit_accuracy: {progressive / max(channel, 1e-3):.2f}")
  print(f"progressive_over_joint_edit_accuracy: {progressive / max(joint, 1e-3):.2f}")
  return results


if __name__ == "__main__":
  main()
