"""Stage 2 at paper scale: editing pretraining, initialised from stage 1.

Canvas `[target | source latent]` at 1024x1024; edit triplets only.

  python -m dreamlite_jax.main --config experiments/dreamlite_1024_pretrain_edit.py \
      --workdir runs/dreamlite_1024/pretrain_edit --config.data.edit_cache=/data/cache/edit
"""
from experiments import dreamlite_1024_base as base


def get_config():
  config = base.get_config("pretrain_edit")
  config.data.t2i_weight, config.data.edit_weight = 0.0, 1.0
  config.loss.image_dropout = 0.05  # trains the image-unconditional branch of dual guidance
  config.train.steps = 100_000
  config.train.warmup_steps = 1_000
  config.init_from.workdir = base.stage_workdir("pretrain_t2i")
  return config
