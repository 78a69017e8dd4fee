"""The paper-scale job configs: they load and validate as jobs, chain, and bad fields are named
by their full path (on 8 simulated devices, with stand-in caches and VAE folder)."""
import dataclasses
import glob
import os

import pytest

from dreamlite_jax import config_schema
from dreamlite_jax.job import stages
from dreamlite_jax.config import ConfigError
from dreamlite_jax.models.unet import UNetConfig
from dreamlite_jax.models.vae import VAEConfig

JOB = "experiments/dreamlite_1024.py"
STAGES = ("pretrain_t2i", "pretrain_edit", "pretrain_joint", "sft", "rl", "distill")
PRETRAIN = STAGES[:4]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  """Overrides pointing the job at stand-ins: caches with every side, a VAE run dir, a CLIP
  folder for the RL reward."""
  root = tmp_path_factory.mktemp("paper")
  for task in ("t2i", "edit"):
    for side in (512, 768, 1024):
      os.makedirs(root / task / str(side))
      (root / task / str(side) / config_schema.CACHE_INFO).write_text("{}")
  os.makedirs(root / "vae" / "checkpoints")
  os.makedirs(root / "clip")
  return [f"--config.data.t2i_cache={root / 't2i'}", f"--config.data.edit_cache={root / 'edit'}",
          f"--config.model.vae_checkpoint={root / 'vae'}",
          f"--config.rl.reward.path={root / 'clip'}"]


def _load(paths, path=JOB, *overrides):
  return stages.load_job_config(path, [*paths, *overrides])


def test_every_stage_file_is_the_job_with_one_stage(paths):
  job = _load(paths)
  assert stages.parse_stages(job) == list(STAGES)
  files = sorted(glob.glob("experiments/dreamlite_1024_*.py"))
  assert files == sorted(f"experiments/dreamlite_1024_{s}.py" for s in STAGES)
  for stage in STAGES:
    config = _load(paths, f"experiments/dreamlite_1024_{stage}.py")
    assert config.stages == stage
    config.stages = job.stages
    assert config.to_dict() == job.to_dict(), stage


def test_the_rl_reward_folder_is_required_before_any_stage(paths):
  with pytest.raises(ConfigError, match=r"config\.rl\.reward\.path = '': the clip reward needs"):
    _load(paths[:-1])
  _load(paths[:-1], "experiments/dreamlite_1024_sft.py")  # a job without rl does not need it


def test_model_and_chain(paths):
  job = _load(paths)
  assert UNetConfig.from_dict(job.model.unet.to_dict()) == dataclasses.replace(
      UNetConfig.paper(), dtype="bfloat16")
  assert VAEConfig(**job.model.vae.to_dict()) == VAEConfig.taesd()
  assert job.model.text_encoder.text_length == 128
  assert job.data.source == "cache"
  assert {s: job[s].parent for s in STAGES} == {
      "pretrain_t2i": "", "pretrain_edit": "pretrain_t2i", "pretrain_joint": "pretrain_edit",
      "sft": "pretrain_joint", "rl": "sft", "distill": "rl"}
  assert {job[s].kind for s in PRETRAIN} == {"pretrain"}
  assert (job.rl.kind, job.distill.kind) == ("rl", "distill")


def test_each_pretrain_stage_config_is_trainer_ready(paths):
  job = _load(paths)
  for stage in PRETRAIN:
    ctx = stages.StageContext(config=job, name=stage, workdir="w", job_workdir="j",
                              parent_workdir=None, parent_results={}, models=None)
    config = ctx.stage_config()
    config_schema.validate_trainer(config)
    assert config.data.resolutions[-1][0] == 1024


def test_task_mix_and_progressive_resolution_are_fields(paths):
  job = _load(paths)
  t2i, edit, joint = (job[s].data for s in PRETRAIN[:3])
  assert (t2i.t2i_weight, t2i.edit_weight) == (1.0, 0.0)
  assert (edit.t2i_weight, edit.edit_weight) == (0.0, 1.0)
  assert joint.t2i_weight > 0 and joint.edit_weight > 0
  sides = [side for side, _ in t2i.resolutions]
  assert sides == sorted(sides) and len(sides) > 1
  mixed = _load(paths, JOB, "--config.pretrain_joint.data.t2i_weight=0.7",
                "--config.pretrain_joint.data.edit_weight=0.3")
  assert (mixed.pretrain_joint.data.t2i_weight, mixed.pretrain_joint.data.edit_weight) == (0.7, 0.3)


@pytest.mark.parametrize("override, field", [
    ("--config.pretrain_joint.train.schedule=linear", "config.pretrain_joint.train.schedule"),
    ("--config.pretrain_joint.train.accum_steps=3", "config.pretrain_joint.train.accum_steps"),
    ("--config.mesh.fsdp=0", "config.mesh.fsdp"),
    ("--config.mesh.fsdp=16", "config.mesh"),  # 8 devices
    ("--config.pretrain_joint.data.resolutions=((1000, 0),)",
     "config.pretrain_joint.data.resolutions"),
    ("--config.pretrain_joint.data.t2i_weight=-1.0", "config.pretrain_joint.data.t2i_weight"),
    ("--config.pretrain_joint.loss.text_dropout=1.5", "config.pretrain_joint.loss"),
    ("--config.pretrain_joint.train.compute_dtype=fp8",
     "config.pretrain_joint.train.compute_dtype"),
    ("--config.pretrain_joint.train.compute_dtype=float32", "config.model.unet.dtype"),
    ("--config.pretrain_joint.train.batch_size=12", "config.pretrain_joint.train.batch_size"),
    ("--config.distill.train.schedule=linear", "config.distill.train.schedule"),
    ("--config.pretrain_joint.train.batch_sise=8", "config.pretrain_joint.train.batch_sise"),
    ("--config.data.t2i_cache=/no/such/dir", "config.data.t2i_cache"),
    ("--config.model.vae_checkpoint=/no/such/vae", "config.model.vae_checkpoint"),
    ("--config.rl.sampler.steps=0", "config.rl.sampler.steps = 0: must be an int >= 1"),
    ("--config.samples.sampler.guidance=-1.0", "config.samples.sampler.guidance = -1.0"),
    ("--config.distill.objective.teacher.image_guidance=-1.0",
     "config.distill.objective.teacher.image_guidance = -1.0"),
    ("--config.rl.sample_steps=10", "unknown config field: config.rl.sample_steps"),
])
def test_bad_field_fails_at_load_with_its_full_path(paths, override, field):
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    _load(paths, JOB, override)


def test_unknown_model_field_is_named(paths):
  config = _load(paths)
  config.model.unet.unlock()
  config.model.unet.not_a_field = 3
  with pytest.raises(ConfigError, match=r"config\.model\.unet\.not_a_field"):
    config_schema.validate_job(config, list(STAGES))
  assert "not_a_field" not in {f.name for f in dataclasses.fields(UNetConfig)}
