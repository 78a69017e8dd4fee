"""Evaluate a model: `python -m dreamlite_jax.eval --checkpoint DIR --suite ... --out DIR`.

DIR is any model `dreamlite_jax.model_ref` names: a training run, a job's stage
directory (`runs/demo/distill/student`: the job's VAE, text encoder and image size come
from its records), or a diffusers DreamLite folder (evaluated at its own image size).

Suites:
  shapes   exact scores on the synthetic shapes world (`shapes_scoring.evaluate`),
           with per-category sample grids.
  geneval  N samples per prompt of `--metadata` in GenEval's layout (score them
           with GenEval's own detector); scores.json holds export counts.
  imgedit  edits of `--manifest` items from `--images`, named by item key;
           scores.json holds export counts and load failures per reason.
Every suite writes `scores.json`, `scores.png` (bar chart) and `report.md` to --out.
"""
from __future__ import annotations

import argparse
import os
from typing import Sequence

from data_pipelines import shapes
from dreamlite_jax import model_ref
from dreamlite_jax import pipeline as pipeline_lib
from dreamlite_jax.diffusion import sampling
from dreamlite_jax.eval import geneval_export, imgedit_export, report
from dreamlite_jax.eval import shapes_scoring


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m dreamlite_jax.eval", description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", "--model", dest="checkpoint", required=True,
                 help="a training run, a job's stage directory (runs/demo/distill/student) or a "
                      "diffusers DreamLite folder")
  p.add_argument("--suite", required=True, choices=("shapes", "geneval", "imgedit"))
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--metadata", help="GenEval evaluation_metadata.jsonl (suite geneval)")
  p.add_argument("--manifest", help="ImgEdit manifest JSON (suite imgedit)")
  p.add_argument("--images", help="ImgEdit image folder (suite imgedit)")
  p.add_argument("--n", type=int, default=4, help="samples per prompt (geneval)")
  p.add_argument("--steps", type=int, default=None,
                 help="Euler steps (default: the model's: 28, a distilled student's 4)")
  p.add_argument("--guidance", type=float, default=None,
                 help="CFG scale; 0 = none (default: 3.5, none for a distilled student)")
  p.add_argument("--image-guidance", type=float, default=1.0,
                 help="edit image guidance; 0 = text CFG only")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--size", type=int, default=None,
                 help="image size (default: the model's: its run or job config's data.image_size, "
                      "a DreamLite folder's native size; else 1024, shapes: 64)")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--per-category", type=int, default=16, help="shapes prompts per T2I category")
  p.add_argument("--per-type", type=int, default=8, help="shapes edits per edit type")
  p.add_argument("--text-encoder", default=None,
                 help="Qwen3-VL folder or tiny:SEED (default: what the model names)")
  p.add_argument("--vae-checkpoint", default=None,
                 help="VAE run or AutoencoderTiny folder (default: what the model names)")
  p.add_argument("--step", type=int, default=-1)
  p.add_argument("--no-ema", action="store_true", help="use the raw (non-EMA) U-Net params")
  return p


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  if args.suite == "geneval" and not args.metadata:
    parser.error("--suite geneval needs --metadata PATH")
  if args.suite == "imgedit" and not (args.manifest and args.images):
    parser.error("--suite imgedit needs --manifest PATH and --images DIR")
  if args.n < 1 or (args.steps is not None and args.steps < 1) or args.batch_size < 1:
    parser.error("--n, --steps and --batch-size must be >= 1")
  if (args.guidance is not None and args.guidance < 0) or args.image_guidance < 0:
    parser.error("--guidance and --image-guidance must be >= 0 (0 = off)")


def run_shapes(pipe, args: argparse.Namespace, size: int) -> tuple[dict, list[str]]:
  """Shapes scores (nested t2i/edit) and the sample grid PNG paths."""
  sets = {
      "t2i": shapes.t2i_eval_prompts("train", args.per_category, size),
      "t2i_heldout": shapes.t2i_eval_prompts("heldout", args.per_category, size),
      "edit": shapes.edit_eval_set("train", args.per_type, size),
      "edit_heldout": shapes.edit_eval_set("heldout", args.per_type, size),
  }
  sampler = sampling.SamplerConfig(args.steps, args.guidance, args.image_guidance)
  scores = shapes_scoring.evaluate(pipe, sets, sampler, args.batch_size, args.seed,
                                   grid_dir=args.out)
  return scores, [os.path.join(args.out, "t2i.png"), os.path.join(args.out, "edit.png")]


def main(argv: Sequence[str] | None = None) -> dict:
  parser = _parser()
  args = parser.parse_args(argv)
  _check_args(parser, args)
  model_ref.log_to_console()
  ref = model_ref.resolve(args.checkpoint, step=args.step)
  pipe = pipeline_lib.load_pipeline(ref, text_encoder=args.text_encoder,
                                    vae_checkpoint=args.vae_checkpoint, step=args.step,
                                    ema=not args.no_ema)
  if args.steps is None:
    args.steps = ref.steps
  if args.guidance is None:
    args.guidance = ref.guidance
  os.makedirs(args.out, exist_ok=True)
  grids: list[str] = []
  if args.suite == "shapes":
    size = args.size or ref.image_size or 64
    scores, grids = run_shapes(pipe, args, size)
  elif args.suite == "geneval":
    size = args.size or ref.image_size or 1024
    def generate(prompts, seed):
      return pipe.generate(list(prompts), seed=seed, steps=args.steps, guidance=args.guidance,
                           size=size, output="np")
    scores = geneval_export.export(args.metadata, os.path.join(args.out, "geneval"), generate,
                                   n=args.n, seed=args.seed, batch_size=args.batch_size,
                                   progress=True)
  else:
    size = args.size
    def edit(images, instructions, seed):
      return pipe.edit(list(images), list(instructions), seed=seed, steps=args.steps,
                       guidance=args.guidance, image_guidance=args.image_guidance, size=args.size,
                       output="np")
    summary = imgedit_export.export(args.manifest, args.images, os.path.join(args.out, "imgedit"),
                                    edit, seed=args.seed, progress=True)
    scores = {k: summary[k] for k in ("items", "edited", "skipped", "failed")}
    scores["failed_by_reason"] = summary["failed_by_reason"]
  details = {"checkpoint": args.checkpoint, "model": ref.kind, "suite": args.suite,
             "size": size or "the sources' own", "steps": args.steps, "guidance": args.guidance,
             "seed": args.seed}
  paths = report.write_report(args.out, scores, f"{args.suite} evaluation", grids, details)
  print(f"wrote {paths['report']}", flush=True)
  return scores


if __name__ == "__main__":
  main()
