"""Stage 4 at paper scale: supervised fine-tuning on a small high-quality set.

Same objective and T2I/edit mix as the joint stage, a low constant learning
rate and a faster EMA; initialised from stage 3's EMA weights.

  python -m dreamlite_jax.main --config experiments/dreamlite_1024_sft.py \
      --workdir runs/dreamlite_1024/sft \
      --config.data.t2i_cache=/data/cache/hq_t2i --config.data.edit_cache=/data/cache/hq_edit
"""
from experiments import dreamlite_1024_base as base


def get_config():
  config = base.get_config("sft")
  config.data.t2i_weight, config.data.edit_weight = 0.5, 0.5
  config.loss.image_dropout = 0.05
  config.train.update(steps=20_000, batch_size=256, lr=1e-5, schedule="constant",
                      warmup_steps=500, ema_decay=0.999, checkpoint_every=1_000,
                      sample_every=1_000)
  config.init_from.workdir = base.stage_workdir("pretrain_joint")
  config.init_from.ema_as_params = True
  return config
