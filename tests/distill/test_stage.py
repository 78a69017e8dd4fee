"""The distill stage runner end to end on stand-in models: teacher checkpoint in,
student checkpoint + three scores out, resumable, config errors named."""
from __future__ import annotations

import json
import os
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from data_pipelines import latent_batches
from dreamlite_jax import pipeline as pipeline_lib
from dreamlite_jax.job import stages
from dreamlite_jax.config import ConfigError
from dreamlite_jax.diffusion import flow
from dreamlite_jax.diffusion.sampling import SamplerConfig
from dreamlite_jax.models.qwen3_vl import Qwen3VLConfig
from dreamlite_jax.models.text_conditioning import TextEncoder
from dreamlite_jax.training import checkpoints as ckpt
from dreamlite_jax.training import distill
from dreamlite_jax.job import distill_stage
from dreamlite_jax.training import state as state_lib
from experiments import dreamlite_1024_distill
from experiments import train_defaults
from stand_ins import StandInUNet, StandInVAE

from cache_records import write_cache

SIZE = 32


@pytest.fixture(scope="module")
def parts():
  text = TextEncoder.random(Qwen3VLConfig.tiny(), seed=0, text_length=16)
  unet, vae = StandInUNet(), StandInVAE()
  vae_params = vae.init(jax.random.PRNGKey(2), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
  return text, unet, vae, vae_params


def _teacher_checkpoint(workdir: str, unet, hid: int) -> None:
  init = lambda rng: unet.init(rng, jnp.zeros((1, 4, 8, 4)), jnp.zeros((1,)),
                               jnp.zeros((1, 16, hid)), jnp.ones((1, 16)), jnp.zeros((1, 2)))["params"]
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  state = state_lib.create_state(init, optax.adam(1e-3), mesh, seed=0)
  manager = ckpt.make_manager(ckpt.checkpoint_dir(workdir), async_save=False)
  ckpt.save(manager, state, None, None)
  manager.wait_until_finished()
  manager.close()


def _config(timesteps) -> ml_collections.ConfigDict:
  section = dreamlite_1024_distill.distill_section()
  section.objective.update(student_timesteps=timesteps, fake_updates=2, regression_weight=0.5,
                           gan_weight=0.1, gan_hidden=8)
  section.objective.teacher.steps = 3
  section.train = train_defaults.train_config(steps=2, batch_size=8, lr=1e-4, warmup_steps=0,
                                              log_every=1, checkpoint_every=1,
                                              async_checkpoints=False, progress_bar=False)
  section.data.update(size=SIZE, pool_size=6, edit_fraction=0.5)
  section.eval.update(size=SIZE, per_category=1, per_type=1, batch_size=16)
  section.eval.teacher.steps = 3
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = ml_collections.ConfigDict(dict(source="shapes"))
  config.mesh = train_defaults.mesh_config(data=-1, fsdp=1, tensor=1)
  config.model = ml_collections.ConfigDict()
  config.distill = section
  return config


def _ctx(config, tmp_path, parts):
  text, unet, vae, vae_params = parts
  models = types.SimpleNamespace(pipeline=lambda params: pipeline_lib.Pipeline(
      text, unet, params, vae, vae_params, size_multiple=8))
  return stages.StageContext(config=config, name="distill",
                             workdir=str(tmp_path / "distill"), job_workdir=str(tmp_path),
                             parent_workdir=str(tmp_path / "rl"), parent_results={},
                             models=models)


def test_stage_writes_student_and_four_scores(tmp_path, parts):
  _teacher_checkpoint(str(tmp_path / "rl"), parts[1], parts[0].config.text.hidden_size)
  timesteps = tuple(flow.schedule_for_size(4, SIZE, SIZE)[:-1] * 1000)
  ctx = _ctx(_config(timesteps), tmp_path, parts)
  os.makedirs(ctx.workdir)
  results = distill_stage.run_stage(ctx)
  assert results["steps"] == 2 and np.isfinite(results["final_loss"])
  assert set(results["distill"]) == {"teacher", "teacher_naive_4step", "teacher_naive_4step_cfg",
                                     "student_4step"}
  with open(os.path.join(ctx.workdir, "scores.json")) as f:
    scores = json.load(f)
  assert scores["summary"] == results["distill"] and scores["student_steps"] == 4
  assert "edit" in scores["student_4step"] and "t2i" in scores["teacher"]
  # The student is an ordinary train-state checkpoint, moved away from the teacher.
  student = ckpt.load_params(results["checkpoint"])
  teacher = ckpt.load_params(str(tmp_path / "rl"))
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), student, teacher)
  assert max(jax.tree.leaves(moved)) > 0
  # An interrupted stage resumes from its last checkpoint: asked for 3 steps, it runs 1 more.
  ctx.config.distill.train.steps = 3
  pipe = ctx.models.pipeline(teacher)
  objective = distill_stage.objective_config(ctx.config.distill.objective)
  pool = distill_stage.build_pool(pipe, ctx.config.distill.data, objective)
  # The regression pairs are sampled once, with the teacher's own guided pipeline.
  assert pool["ode_noise"].shape == pool["ode_target"].shape == pool["latents"].shape
  first = {k: v[:1] for k, v in pool.items()}
  _, condition, cond, uncond = distill.batch_inputs(first, objective.teacher_guided)
  teacher_sampler = objective.teacher
  again = pipe.denoise(jnp.asarray(first["ode_noise"]), condition, cond, uncond,
                       teacher_sampler.steps, teacher_sampler.guidance,
                       teacher_sampler.image_guidance)
  np.testing.assert_allclose(pool["ode_target"][:1], np.asarray(again), atol=1e-5)
  assert not np.allclose(pool["ode_target"], pool["ode_noise"])
  result = distill_stage.train_student(ctx, pipe, objective, teacher, pool)
  state = result.state
  assert (result.start_step, result.final_step, int(state.step), int(state.fake.step)) == (2, 3, 3, 3 * 2)


def test_schedule_must_match_the_deployed_sampler(tmp_path, parts):
  config = _config(dreamlite_1024_distill.MOBILE_TIMESTEPS)  # the 1024px schedule at 32px
  objective = distill_stage.objective_config(config.distill.objective)
  with pytest.raises(ConfigError, match="student_timesteps"):
    distill_stage.check_deployed_schedule(objective, SIZE, flow.ShiftConfig())
  # At 1024px the mobile timesteps are exactly the pipeline's 4-step schedule.
  distill_stage.check_deployed_schedule(objective, 1024, flow.ShiftConfig())


def test_regression_needs_the_ode_pairs_in_the_batch(parts):
  """A batch without `ode_noise`/`ode_target` is refused by name, not silently unregressed."""
  objective = distill.DistillConfig(student_sigmas=(1.0, 0.5), regression_weight=1.0,
                                    teacher=SamplerConfig(steps=2))
  models = distill.DistillModels(predict_fn=lambda p, c, t, k: c * p)
  batch = {"latents": jnp.zeros((2, 4, 4, 4)), "text": jnp.zeros((2, 3, 8)),
           "text_mask": jnp.ones((2, 3))}
  with pytest.raises(KeyError, match="ode_noise"):
    distill.student_noise(batch, objective)
  with pytest.raises(KeyError, match="ode_target"):
    distill.student_loss(models, jnp.zeros((2, 4, 4, 4)), 1.0, {"score": 1.0}, batch, objective,
                         jax.random.PRNGKey(0))
  # Without the regression the student draws fresh noise and needs no pairs.
  objective = distill.DistillConfig(student_sigmas=(1.0, 0.5), teacher=SamplerConfig(steps=2))
  assert distill.student_noise(batch, objective) is None


def test_objective_config_errors_name_the_field():
  section = dreamlite_1024_distill.distill_section().objective
  section.fake_updates = 0
  with pytest.raises(ConfigError, match="fake_updates"):
    distill_stage.objective_config(section)
  section = dreamlite_1024_distill.distill_section().objective
  section.student_timesteps = (1000.0, 1000.0)
  with pytest.raises(ConfigError, match="student_sigmas"):
    distill_stage.objective_config(section)
  section = dreamlite_1024_distill.distill_section().objective
  section.bogus = 1
  with pytest.raises(ConfigError, match="bogus"):
    distill_stage.objective_config(section)


def test_stage_on_caches_distils_from_cached_conditions(tmp_path, parts):
  """With the job's data in embedding caches the pool is cached rows (no text encoder),
  and the stage writes a teacher-vs-student grid and their pixel distance."""
  hid = parts[0].config.text.hidden_size
  _teacher_checkpoint(str(tmp_path / "rl"), parts[1], hid)
  for task in ("t2i", "edit"):
    write_cache(str(tmp_path / task), task, SIZE, 10, text_length=16, text_dim=hid)
  timesteps = tuple(flow.schedule_for_size(4, SIZE, SIZE)[:-1] * 1000)
  config = _config(timesteps)
  config.data = ml_collections.ConfigDict(dict(
      source="cache", t2i_cache=str(tmp_path / "t2i"), edit_cache=str(tmp_path / "edit"),
      num_threads=1, prefetch=2))
  ctx = _ctx(config, tmp_path, (None,) + parts[1:])  # no text encoder: cached features only
  os.makedirs(ctx.workdir)
  teacher = ckpt.load_params(str(tmp_path / "rl"))
  objective = distill_stage.objective_config(config.distill.objective)
  pool = distill_stage.build_cached_pool(config, ctx.models.pipeline(teacher),
                                         config.distill.data, objective)
  ids = pool["latents"][:, 0, 0, 0]
  edit = pool["is_edit"] > 0
  assert len(ids) == 6 and edit.any() and (~edit).any()
  assert (ids[edit] >= 1000).all() and (ids[~edit] < 1000).all()  # the caches' own rows
  assert set(pool) == set(latent_batches.LOSS_KEYS) | {"ode_noise", "ode_target"}
  assert pool["ode_target"].shape == pool["latents"].shape
  results = distill_stage.run_stage(ctx)
  assert results["steps"] == 2 and np.isfinite(results["distill"]["student_vs_teacher_l1"])
  assert os.path.getsize(os.path.join(ctx.workdir, "teacher_vs_student.png")) > 0
