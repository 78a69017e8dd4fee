"""The paper-scale stage configs: they load, validate, chain, and bad fields are named."""
import dataclasses

import pytest

from dreamlite_jax import config_schema
from dreamlite_jax.config import ConfigError, load_config
from dreamlite_jax.models.unet import UNetConfig
from dreamlite_jax.models.vae import VAEConfig

STAGES = ("pretrain_t2i", "pretrain_edit", "pretrain_joint", "sft")


def _path(stage):
  return f"experiments/dreamlite_1024_{stage}.py"


@pytest.mark.parametrize("stage", STAGES)
def test_stage_config_loads_and_validates(stage):
  config = load_config(_path(stage))
  config_schema.validate_trainer(config)
  assert config.stage == stage
  unet = UNetConfig.from_dict(config.model.unet.to_dict())
  assert unet == dataclasses.replace(UNetConfig.paper(), dtype="bfloat16")
  assert VAEConfig(**config.model.vae.to_dict()) == VAEConfig.taesd()
  assert config.model.text_encoder.text_length == 128
  assert config.data.resolutions[-1][0] == 1024


def test_stages_chain_through_init_from():
  parents = {stage: load_config(_path(stage)).init_from.workdir for stage in STAGES}
  assert parents == {"pretrain_t2i": "", "pretrain_edit": "runs/dreamlite_1024/pretrain_t2i",
                     "pretrain_joint": "runs/dreamlite_1024/pretrain_edit",
                     "sft": "runs/dreamlite_1024/pretrain_joint"}


def test_task_mix_and_progressive_resolution_are_fields():
  t2i, edit, joint = (load_config(_path(s)) for s in STAGES[:3])
  assert (t2i.data.t2i_weight, t2i.data.edit_weight) == (1.0, 0.0)
  assert (edit.data.t2i_weight, edit.data.edit_weight) == (0.0, 1.0)
  assert joint.data.t2i_weight > 0 and joint.data.edit_weight > 0
  sides = [side for side, _ in t2i.data.resolutions]
  assert sides == sorted(sides) and len(sides) > 1
  mixed = load_config(_path("pretrain_joint"), ["--config.data.t2i_weight=0.7",
                                                "--config.data.edit_weight=0.3"])
  assert (mixed.data.t2i_weight, mixed.data.edit_weight) == (0.7, 0.3)


@pytest.mark.parametrize("override, field", [
    ("--config.train.schedule=linear", "config.train.schedule"),
    ("--config.train.accum_steps=3", "config.train.accum_steps"),
    ("--config.mesh.fsdp=0", "config.mesh.fsdp"),
    ("--config.data.resolutions=((1000, 0),)", "config.data.resolutions"),
    ("--config.data.t2i_weight=-1.0", "config.data.t2i_weight"),
    ("--config.loss.text_dropout=1.5", "config.loss"),
    ("--config.init_from.step=-2", "config.init_from.step"),
    ("--config.train.compute_dtype=fp8", "config.train.compute_dtype"),
    ("--config.train.compute_dtype=float32", "config.model.unet.dtype"),
    ("--config.train.batch_sise=8", "config.train.batch_sise"),
])
def test_bad_field_fails_at_load_with_its_name(override, field):
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    load_config(_path("pretrain_joint"), [override])


def test_unknown_model_field_is_named():
  config = load_config(_path("pretrain_t2i"))
  config.model.unet.unlock()
  config.model.unet.not_a_field = 3
  with pytest.raises(ConfigError, match=r"config\.model\.unet\.not_a_field"):
    config_schema.validate(config)
  assert "not_a_field" not in {f.name for f in dataclasses.fields(UNetConfig)}
