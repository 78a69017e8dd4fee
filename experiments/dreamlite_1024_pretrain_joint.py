"""Stage 3 at paper scale: joint T2I + editing, initialised from stage 2.

Every batch mixes T2I and edit examples at `data.t2i_weight : data.edit_weight`
(here 1 : 1), so one network keeps both skills.

  python -m dreamlite_jax.main --config experiments/dreamlite_1024_pretrain_joint.py \
      --workdir runs/dreamlite_1024/pretrain_joint \
      --config.data.t2i_cache=/data/cache/t2i --config.data.edit_cache=/data/cache/edit
"""
from experiments import dreamlite_1024_base as base


def get_config():
  config = base.get_config("pretrain_joint")
  config.data.t2i_weight, config.data.edit_weight = 0.5, 0.5
  config.loss.image_dropout = 0.05
  config.train.steps = 150_000
  config.train.warmup_steps = 1_000
  config.init_from.workdir = base.stage_workdir("pretrain_edit")
  return config
