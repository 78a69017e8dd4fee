"""The `eval` stage of a job: the full shapes evaluation of the parent stage's U-Net.

Section fields: kind, parent, use_ema, sampler (`SamplerConfig` fields), batch_size and
seed (of the sampling calls), per_category, per_type (the sets of
`eval.shapes_scoring.eval_sets`). Scores and the T2I / edit grids go to the stage dir.
"""
from __future__ import annotations

from dreamlite_jax.config import ConfigError
from dreamlite_jax.diffusion.sampling import SamplerConfig
from dreamlite_jax.eval import shapes_scoring
from dreamlite_jax.training import checkpoints


def run_stage(ctx) -> dict:
  """The job's `eval` stage: full evaluation of the parent's U-Net (its EMA params)."""
  if not ctx.parent_workdir:
    raise ConfigError(f"config.{ctx.name}.parent must name the stage whose U-Net is evaluated")
  section = ctx.section
  params = checkpoints.load_params(ctx.parent_workdir, ema=bool(section.use_ema))
  pipe = ctx.models.pipeline(params)
  sets = shapes_scoring.eval_sets(ctx.config)
  sampler = SamplerConfig.from_config(section.sampler, f"config.{ctx.name}.sampler")
  scores = shapes_scoring.evaluate(pipe, sets, sampler, int(section.batch_size),
                                   int(section.seed), grid_dir=ctx.workdir)
  return {"scores": scores, "evaluated": ctx.parent_workdir,
          "sampler": section.sampler.to_dict(), "sample_grids": ["t2i.png", "edit.png"]}
