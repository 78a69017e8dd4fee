"""The `distill` stage of a job: the RL/SFT teacher -> a 4-step CFG-free student.

`run_stage(ctx)` (the `dreamlite_jax.job.stages` contract) loads the parent stage's
U-Net as the frozen teacher, builds a fixed pool of shapes-world conditions
(T2I captions and edit triplets encoded once with the job's text encoder and
VAE; with the regression on, each row also gets the teacher's guided ODE
endpoint from a fixed noise, sampled once with the teacher's pipeline), runs
`distill.make_distill_step` through the trainer's loop (`trainer.run`: checkpoints of
the whole `DistillState`, resume, preemption, metrics; batches are a function of the
step, so the data stream resumes too), then writes the student
as an ordinary train state under `<stage>/student/` (what pipelines, converters
and child stages load) and scores four samplers on the same evaluation set:
the teacher at full steps with guidance, the teacher naively at the student's
step count the way the phone would run it without distillation (no guidance, so the
same number of U-Net evaluations as the student; `teacher_naive_4step`), the same
with guidance (`teacher_naive_4step_cfg`, twice the evaluations), and the student
without guidance. They go to `<stage>/scores.json`
and to the results' `distill` entry.

On embedding caches (the job's `data.source = "cache"`) the pool is `pool_size` cached
conditions at `data.size` (the loss-batch rows themselves: no text encoder runs), the
shapes scores do not apply, and the stage instead samples a fixed set of pool rows with
the teacher (full steps, guidance) and the student (its steps, no guidance) into one
grid (`teacher_vs_student.png`: teacher row above student row) and reports their mean
absolute pixel difference (`student_vs_teacher_l1`, 0-255 scale).

Config section `config.distill` (see `experiments/dreamlite_1024.py`):
  kind, parent, teacher_ema, objective (DistillConfig fields, timesteps x 1000; its
  `teacher` sampler's guidance is the real score's, its steps the regression targets'),
  fake_lr (the fake score's rate at the student's peak; it follows train's schedule),
  train (trainer fields), data (size, pool_size, edit_fraction, seed),
  eval (size, per_category, per_type, teacher (the teacher's `SamplerConfig` as scored),
  use_ema, seed, batch_size).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data_pipelines import shapes
from dreamlite_jax.job import stage_data
from dreamlite_jax.config import ConfigError
from dreamlite_jax.diffusion import flow
from dreamlite_jax.diffusion.sampling import SamplerConfig
from dreamlite_jax.job.preemption import raise_if_preempted
from dreamlite_jax.eval import shapes_eval
from dreamlite_jax.eval import shapes_scoring
from dreamlite_jax.training import checkpoints as ckpt
from dreamlite_jax.training import distill
from dreamlite_jax.training import mesh as mesh_lib
from dreamlite_jax.training import metrics as metrics_lib
from dreamlite_jax.training import pretrain_loss
from dreamlite_jax.training import state as state_lib
from dreamlite_jax.training import trainer

log = logging.getLogger(__name__)

STUDENT_DIR = "student"
SCORES_FILE = "scores.json"


def objective_config(section: ml_collections.ConfigDict) -> distill.DistillConfig:
  """`config.distill.objective` -> DistillConfig (timesteps are sigma x 1000)."""
  fields = dict(section.to_dict())
  timesteps = fields.pop("student_timesteps", None)
  if not timesteps:
    raise ConfigError("config.distill.objective.student_timesteps must list the student's "
                      "timesteps (sigma x 1000), e.g. [1000, 904.53, 759.51, 512.84]")
  fields["student_sigmas"] = tuple(float(t) / flow.NUM_TRAIN_TIMESTEPS for t in timesteps)
  if "teacher" in fields:
    fields["teacher"] = SamplerConfig.from_config(fields["teacher"],
                                                  "config.distill.objective.teacher")
  known = set(distill.DistillConfig.__dataclass_fields__)
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ConfigError(f"config.distill.objective has unknown fields {unknown}; known: "
                      f"{sorted(known - {'student_sigmas'}) + ['student_timesteps']}")
  try:
    return distill.DistillConfig(**fields)
  except ValueError as e:
    raise ConfigError(f"config.distill.objective: {e}") from e


def check_deployed_schedule(config: distill.DistillConfig, size: int,
                            shift: flow.ShiftConfig, vae_scale: int = flow.VAE_SCALE) -> None:
  """The student is trained on the schedule the CFG-free pipeline will run at `size`."""
  if config.student_sampler != "euler":
    raise ConfigError("config.distill.objective.student_sampler must be 'euler': the mobile "
                      "pipeline samples distilled checkpoints with plain Euler steps")
  deployed = flow.schedule_for_size(len(config.student_sigmas), size, size, shift,
                                    vae_scale)[:-1]
  if not np.allclose(deployed, config.student_sigmas, atol=1e-3):
    raise ConfigError(
        f"config.distill.objective.student_timesteps = "
        f"{[round(s * 1000, 2) for s in config.student_sigmas]} differ from the "
        f"{len(deployed)}-step schedule the pipeline runs at {size}px: "
        f"{[round(float(s) * 1000, 2) for s in deployed]}")


# ----------------------------------------------------------------------------
# Conditions.


def _pixels(images: np.ndarray) -> jnp.ndarray:
  return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def _pad(x: np.ndarray, length: int) -> np.ndarray:
  pad = [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
  return np.pad(x, pad)


def build_pool(pipe: Any, data: ml_collections.ConfigDict, objective: distill.DistillConfig,
               chunk: int = 32) -> dict[str, np.ndarray]:
  """Encodes `data.pool_size` shapes conditions once: {name: [P, ...]} numpy arrays.

  Rows are T2I examples then edit examples (`data.edit_fraction` of them);
  text of both kinds is right-padded (mask 0) to one length. With the
  regression on, rows also hold their teacher ODE pair (`add_teacher_ode_pairs`).
  """
  n_edit = int(round(data.pool_size * data.edit_fraction))
  n_t2i = data.pool_size - n_edit
  encode = jax.jit(lambda p, x: pipe.vae.apply({"params": p}, x, method="encode"))
  vision = getattr(pipe.text_encoder.config, "vision", None) is not None
  parts: list[dict[str, np.ndarray]] = []
  t2i = shapes.ShapesT2ISource("train", data.size, num_examples=max(n_t2i, 1), seed=data.seed)
  for start in range(0, n_t2i, chunk):
    rows = [t2i[i] for i in range(start, min(start + chunk, n_t2i))]
    images = np.stack([r["image"] for r in rows])
    text, mask = pipe.text_encoder.encode_generate([r["caption"] for r in rows])
    null, null_mask = pipe.text_encoder.encode_generate_unconditional(len(rows))
    latents = np.asarray(encode(pipe.vae_params, _pixels(images)))
    parts.append(dict(latents=latents, source_latents=np.zeros_like(latents),
                      time_ids=flow.size_ids(len(rows), data.size, data.size),
                      is_edit=np.zeros(len(rows), np.float32), text=np.asarray(text),
                      text_mask=np.asarray(mask), null_text=np.asarray(null),
                      null_text_mask=np.asarray(null_mask)))
  edits = shapes.ShapesEditSource("train", data.size, num_examples=max(n_edit, 1), seed=data.seed)
  for start in range(0, n_edit, chunk):
    rows = [edits[i] for i in range(start, min(start + chunk, n_edit))]
    sources = _pixels(np.stack([r["source"] for r in rows]))
    images = sources if vision else None
    text, mask = pipe.text_encoder.encode_edit([r["instruction"] for r in rows], images)
    null, null_mask = pipe.text_encoder.encode_edit_unconditional(len(rows), images)
    parts.append(dict(latents=np.asarray(encode(pipe.vae_params,
                                                _pixels(np.stack([r["target"] for r in rows])))),
                      source_latents=np.asarray(encode(pipe.vae_params, sources)),
                      time_ids=flow.size_ids(len(rows), data.size, data.size),
                      is_edit=np.ones(len(rows), np.float32), text=np.asarray(text),
                      text_mask=np.asarray(mask), null_text=np.asarray(null),
                      null_text_mask=np.asarray(null_mask)))
  if not parts:
    raise ConfigError("config.distill.data.pool_size must be >= 1")
  length = max(p["text"].shape[1] for p in parts)
  for p in parts:
    for key in ("text", "text_mask", "null_text", "null_text_mask"):
      p[key] = _pad(p[key], length)
  pool = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  if objective.regression_weight > 0:
    add_teacher_ode_pairs(pool, pipe, objective, data.seed)
  return pool


def build_cached_pool(config: ml_collections.ConfigDict, pipe: Any,
                      data: ml_collections.ConfigDict,
                      objective: distill.DistillConfig) -> dict[str, np.ndarray]:
  """`data.pool_size` cached conditions at `data.size` (T2I and edit at
  `data.edit_fraction`), the same on every process, plus the teacher ODE pairs."""
  pool = next(stage_data.fixed_cache_batches(config, data.size, int(data.pool_size),
                                             int(data.seed), data.edit_fraction))
  if objective.regression_weight > 0:
    add_teacher_ode_pairs(pool, pipe, objective, data.seed)
  return pool


def teacher_vs_student(pipe: Any, student_params: Any, pool: dict[str, np.ndarray],
                       teacher: SamplerConfig, student_steps: int, seed: int,
                       workdir: str, count: int = 8) -> float:
  """Samples `count` pool rows with the teacher (`teacher`) and the student (its steps,
  no guidance) from `seed`; writes their grid and returns the mean absolute pixel
  difference (0-255)."""
  rows = {k: v[:count] for k, v in pool.items()}
  teacher_images = pipe.sample_cached(rows, steps=teacher.steps, guidance=teacher.guidance,
                                      image_guidance=teacher.image_guidance, seed=seed)
  student = pipe.with_unet_params(student_params).sample_cached(
      rows, steps=student_steps, guidance=0.0, seed=seed)
  if jax.process_index() == 0:
    metrics_lib.write_grid(os.path.join(workdir, "teacher_vs_student.png"),
                           np.concatenate([teacher_images, student]))
  return float(np.abs(teacher_images.astype(np.float32) - student.astype(np.float32)).mean())


def add_teacher_ode_pairs(pool: dict[str, np.ndarray], pipe: Any,
                          objective: distill.DistillConfig, seed: int, chunk: int = 64) -> None:
  """Adds the regression pairs to every pool row: `ode_noise` and `ode_target`, the
  teacher pipeline's guided Euler endpoint from that noise (`objective.teacher`).

  Sampled once here rather than inside every training step (DMD's precomputed
  noise-image pairs): the teacher rollout would cost more than the rest of the step.
  """
  n = len(pool["latents"])
  noise = np.random.default_rng([seed, n]).standard_normal(pool["latents"].shape, np.float32)
  guided = objective.teacher_guided
  teacher = objective.teacher
  # Unguided (guidance 0, or 1 without image guidance): the conditional field, one branch.
  guidance, image_guidance = (teacher.guidance, teacher.image_guidance) if guided else (0.0, 0.0)
  chunk = min(chunk, n)
  targets = []
  for start in range(0, n, chunk):
    rows = np.arange(start, start + chunk).clip(max=n - 1)  # one static shape: repeat the last row
    batch = {k: v[rows] for k, v in pool.items()}
    _, condition, cond, uncond = distill.batch_inputs(batch, guided)
    x0 = pipe.denoise(jnp.asarray(noise[rows]), condition, cond, uncond, teacher.steps,
                      guidance, image_guidance)
    targets.append(np.asarray(x0)[:min(chunk, n - start)])
  pool["ode_noise"] = noise
  pool["ode_target"] = np.concatenate(targets)


def pool_batch(pool: dict[str, np.ndarray], step: int, batch_size: int, seed: int) -> dict:
  """This host's rows of the global batch of `step` (a pure function of (seed, step))."""
  n = len(pool["latents"])
  rows = np.random.default_rng([seed, step]).integers(0, n, batch_size)
  rows = rows[mesh_lib.host_rows(batch_size)]
  return {k: v[rows] for k, v in pool.items()}


class PoolBatches:
  """The trainer's data: `pool_batch` of step 0, 1, 2, ...; its state is the step, so a
  resumed run draws the very next batch."""

  def __init__(self, pool: dict[str, np.ndarray], batch_size: int, seed: int):
    self.pool, self.batch_size, self.seed, self.step = pool, batch_size, seed, 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = pool_batch(self.pool, self.step, self.batch_size, self.seed)
    self.step += 1
    return batch

  def get_state(self) -> dict:
    return {"step": self.step}

  def set_state(self, state: dict) -> None:
    self.step = int(state["step"])


# ----------------------------------------------------------------------------
# Evaluation.


def shapes_score(pipe: Any, eval_cfg: ml_collections.ConfigDict, sampler: SamplerConfig,
                 with_edit: bool) -> dict[str, Any]:
  """Shapes-world scores of one sampler: {"t2i": {...}, "edit": {...}, "overall": float}.

  Sampled by the eval stage's `sample_t2i` / `sample_edit` (fixed batch shape, so the
  four samplers share compiled programs); "overall" is the mean of the T2I and (when
  `with_edit`) edit "overall" accuracies.
  """
  size = eval_cfg.size
  batch_size, seed = int(eval_cfg.batch_size), int(eval_cfg.seed)
  prompts = shapes.t2i_eval_prompts("train", eval_cfg.per_category, size)
  images = shapes_scoring.sample_t2i(pipe, prompts, sampler, batch_size, seed)
  out: dict[str, Any] = {"t2i": shapes_eval.score_t2i(images, [p["metadata"] for p in prompts])}
  overall = [out["t2i"]["overall"]]
  if with_edit:
    edits = shapes.edit_eval_set("train", eval_cfg.per_type, size)
    out["edit"] = shapes_eval.score_edit([e["source"] for e in edits],
                                         shapes_scoring.sample_edit(pipe, edits, sampler,
                                                                    batch_size, seed),
                                         [e["metadata"] for e in edits])
    overall.append(out["edit"]["overall"])
  out["overall"] = float(np.mean(overall))
  return out


# ----------------------------------------------------------------------------
# The stage.


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def distill_program(section: ml_collections.ConfigDict, mesh_config: ml_collections.ConfigDict,
                    seed: int, unet: Any, objective: distill.DistillConfig, teacher: Any,
                    example: dict[str, np.ndarray]) -> trainer.Program:
  """The trainer's program of DMD2: the student and fake-score states, both started from
  the teacher, and `distill.make_distill_step` with the frozen teacher as its extra
  argument. The fake score steps at `fake_lr / train.lr` times the student's rate."""
  train_cfg = section.train
  if train_cfg.lr <= 0:
    raise ConfigError(f"config.distill.train.lr = {train_cfg.lr}: must be > 0 (the fake "
                      f"score's rate is fake_lr / train.lr times the student's)")
  models = distill.DistillModels(
      predict_fn=pretrain_loss.unet_predict_fn(unet),
      features_fn=distill.unet_features_fn(unet) if objective.uses_gan else None)
  example = {k: jnp.asarray(v[:1]) for k, v in example.items()}
  canvas = jnp.concatenate([example["latents"]] * 2, axis=2)
  time_ids = example["time_ids"]
  unet_args = (canvas, jnp.zeros((1,)), example["text"], example["text_mask"], time_ids)
  init_params = lambda rng: unet.init(rng, *unet_args)["params"]
  feature_dim = None
  if objective.uses_gan:
    cond = {"text": unet_args[2], "text_mask": unet_args[3], "time_ids": time_ids}
    feature_dim = jax.eval_shape(models.features_fn, teacher, canvas, unet_args[1], cond)[1].shape[-1]

  mesh = mesh_lib.make_mesh(mesh_config)
  tx = state_lib.make_optimizer(train_cfg)
  state, shardings = distill.create_distill_state(init_params, teacher, objective, tx, tx, mesh,
                                                  seed, feature_dim)
  step_fn = distill.make_distill_step(
      models, objective, tx, tx, mesh, shardings, shardings.student.params,
      fake_lr_scale=float(section.fake_lr) / float(train_cfg.lr),
      compute_dtype=state_lib.DTYPES[train_cfg.compute_dtype], ema_decay=train_cfg.ema_decay)
  return trainer.Program(
      step=step_fn, abstract_state=_abstract(state), create=lambda: state, start_from=None,
      mesh=mesh, extra_args=(jax.tree.map(mesh_lib.put_global, teacher, shardings.student.params),),
      param_count=state_lib.param_count(state.student.params))


def train_student(ctx: Any, pipe: Any, objective: distill.DistillConfig, teacher: Any,
                  pool: dict[str, np.ndarray]) -> trainer.TrainResult:
  """Runs (or resumes) the distillation in `ctx.workdir` through the trainer."""
  section = ctx.section
  config = ctx.stage_config()
  config.init_from.workdir = ""   # the teacher is the parent, loaded by the stage
  program = distill_program(section, ctx.config.mesh, ctx.config.seed, pipe.unet, objective,
                            teacher, pool)
  return trainer.run(config, ctx.workdir, program,
                     PoolBatches(pool, section.train.batch_size, section.data.seed))


def save_student(workdir: str, student: state_lib.TrainState, config: Any) -> str:
  """Writes the student as an ordinary train state under `workdir/student`; returns that dir."""
  directory = os.path.join(workdir, STUDENT_DIR)
  manager = ckpt.make_manager(ckpt.checkpoint_dir(directory), keep=1, async_save=False)
  if manager.latest_step() != int(jax.device_get(student.step)):
    ckpt.save(manager, student, None, config)
  manager.wait_until_finished()
  manager.close()
  return directory


def run_stage(ctx: Any) -> dict:
  """Distils the parent stage's U-Net; returns the DONE.json results (see module docstring)."""
  section = ctx.section
  if not ctx.parent_workdir:
    raise ConfigError(f"config.{ctx.name}.parent must name the teacher stage (rl or sft)")
  objective = objective_config(section.objective)
  if section.train.accum_steps != 1:
    raise ConfigError(f"config.{ctx.name}.train.accum_steps must be 1 for distillation")
  teacher = ckpt.load_params(ctx.parent_workdir, ema=bool(section.teacher_ema))
  pipe = ctx.models.pipeline(teacher)
  check_deployed_schedule(objective, section.data.size, pipe.shift, pipe.vae_scale)
  cached = stage_data.source(ctx.config) == "cache"
  if cached:
    pool = build_cached_pool(ctx.config, pipe, section.data, objective)
  else:
    pool = build_pool(pipe, section.data, objective)
  result = train_student(ctx, pipe, objective, teacher, pool)
  raise_if_preempted(result, ctx.name)
  state, step = result.state, result.final_step
  metrics = result.history[-1] if result.history else {}
  checkpoint = save_student(ctx.workdir, state.student, ctx.config)

  eval_cfg = section.eval
  teacher_sampler = SamplerConfig.from_config(eval_cfg.teacher, f"config.{ctx.name}.eval.teacher")
  with_edit = section.data.edit_fraction > 0
  k = len(objective.student_sigmas)
  student_params = state.student.ema_params if eval_cfg.use_ema else state.student.params
  if cached:
    l1 = teacher_vs_student(pipe, ckpt.as_numpy(student_params), pool, teacher_sampler, k,
                            int(eval_cfg.seed), ctx.workdir)
    summary = {"student_vs_teacher_l1": l1}
    if jax.process_index() == 0:
      with open(os.path.join(ctx.workdir, SCORES_FILE), "w") as f:
        json.dump({"summary": summary, "student_steps": k}, f, indent=2, sort_keys=True)
    return {"steps": step, "final_loss": metrics.get("loss"), "checkpoint": checkpoint,
            "distill": summary, "sample_grids": ["teacher_vs_student.png"]}
  student_sampler = SamplerConfig(steps=k)  # no guidance
  scores = {
      "teacher": shapes_score(pipe, eval_cfg, teacher_sampler, with_edit),
      "teacher_naive_4step": shapes_score(pipe, eval_cfg, student_sampler, with_edit),
      "teacher_naive_4step_cfg": shapes_score(
          pipe, eval_cfg, dataclasses.replace(teacher_sampler, steps=k), with_edit),
      "student_4step": shapes_score(pipe.with_unet_params(student_params), eval_cfg,
                                    student_sampler, with_edit),
  }
  summary = {name: s["overall"] for name, s in scores.items()}
  if jax.process_index() == 0:
    with open(os.path.join(ctx.workdir, SCORES_FILE), "w") as f:
      json.dump({"summary": summary, "student_steps": k, **scores}, f, indent=2, sort_keys=True)
  return {"steps": step, "final_loss": metrics.get("loss"), "checkpoint": checkpoint,
          "distill": summary, "scores": shapes_scoring.nest_scores(
              scores["student_4step"]["t2i"], scores["student_4step"].get("edit", {}))}
