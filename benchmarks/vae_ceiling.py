"""Which shapes world a tiny VAE round-trips well enough: the ceilings of one world variant.

Runs the job's `vae` stage (experiments/shapes_tiny.py, any `--config.*` overrides) on
the shapes world with some of its layout constants replaced, then prints the stage's
ceilings (`vae_stage.ceilings`: the shapes evaluator's scores of VAE round-trips of
ground truth), how often each edit check fails, and how well round-trips of lone objects
of each size keep their shape.

  python -m benchmarks.vae_ceiling --workdir runs/ceiling_base
  python -m benchmarks.vae_ceiling --workdir runs/ceiling_big --world SIZE_RANGE=[0.4,0.55] \
      --world MAX_EDIT_OBJECTS=2 -- --config.vae.train.steps=600
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
from typing import Sequence

import numpy as np

from data_pipelines import shapes
from dreamlite_jax import main as main_lib
from dreamlite_jax.eval import shapes_eval
from dreamlite_jax.job import vae_stage


def _set_world(assignments: Sequence[str]) -> None:
  """NAME=JSON assignments to data_pipelines.shapes constants (lists become tuples)."""
  for a in assignments:
    name, value = a.split("=", 1)
    if not hasattr(shapes, name):
      raise SystemExit(f"data_pipelines.shapes has no constant {name}")
    value = json.loads(value)
    if isinstance(value, dict):
      value = {k: tuple(v) for k, v in value.items()}
    setattr(shapes, name, tuple(value) if isinstance(value, list) else value)
  importlib.reload(shapes_eval)  # its palette is built from shapes.BACKGROUNDS at import


def _check_failures(reconstruct, size: int, per_type: int = 32) -> dict[str, float]:
  """Fraction of round-tripped edit targets failing each edit check (held-in)."""
  edits = shapes.edit_eval_set("train", per_type, size)
  recon = reconstruct(np.stack([e["target"] for e in edits]))
  checks = [shapes_eval.edit_checks(e["source"], r, e["metadata"]) for e, r in zip(edits, recon)]
  return {k: float(np.mean([not c[k] for c in checks])) for k in checks[0]}


def _shape_by_size(reconstruct, size: int, n: int = 48) -> dict[int, float]:
  """Fraction of lone objects whose round-trip is detected as exactly that object, per
  bbox side in pixels (random shape, colour, background and position)."""
  rng = np.random.default_rng(0)
  out = {}
  for side in range(6, size // 2 + 3, 2):
    scenes = []
    for _ in range(n):
      r = side / 2
      obj = {"shape": str(rng.choice(shapes.SHAPES)), "color": str(rng.choice(list(shapes.COLORS))),
             "center": [float(rng.uniform(r + 1, size - r - 1)), float(rng.uniform(r + 1, size - r - 1))],
             "size": float(side)}
      scenes.append({"height": size, "width": size,
                     "background": str(rng.choice(list(shapes.BACKGROUNDS))), "objects": [obj]})
    recon = reconstruct(np.stack([shapes.render(s) for s in scenes]))
    ok = [[(d.shape, d.color) for d in shapes_eval.detect(im)[1]] ==
          [(s["objects"][0]["shape"], s["objects"][0]["color"])] for s, im in zip(scenes, recon)]
    out[side] = float(np.mean(ok))
  return out


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--world", action="append", default=[],
                      help="NAME=JSON: a data_pipelines.shapes constant")
  parser.add_argument("overrides", nargs="*", help="--config.* overrides (after --)")
  args = parser.parse_args(argv)
  _set_world(args.world)
  extra = {}
  ceilings = vae_stage.ceilings

  def with_diagnostics(reconstruct, size, *a, **kw):
    extra["edit_check_failures"] = _check_failures(reconstruct, size)
    extra["shape_ok_by_side_px"] = _shape_by_size(reconstruct, size)
    return ceilings(reconstruct, size, *a, **kw)

  vae_stage.ceilings = with_diagnostics
  main_lib.main(["--config", "experiments/shapes_tiny.py", "--workdir", args.workdir,
                 "--stages", "vae", *args.overrides])
  with open(os.path.join(args.workdir, "vae", "DONE.json")) as f:
    record = json.load(f)
  res = record["results"]
  print(json.dumps({"world": shapes.world(), "overrides": args.overrides,
                    "steps": res["steps"], "wall_time_s": round(record["wall_time_s"]),
                    **{k: round(v, 3) for k, v in res.items() if k.startswith("ceiling_")
                       and isinstance(v, float)},
                    "per_type": {k: round(v, 2) for k, v in res["ceiling_scores"]["edit"].items()},
                    "per_category": {k: round(v, 2) for k, v in res["ceiling_scores"]["t2i"].items()},
                    **extra}, indent=1))


if __name__ == "__main__":
  main()
