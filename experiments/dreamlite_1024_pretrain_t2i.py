"""Stage 1 at paper scale: text-to-image pretraining with progressive resolution.

Canvas `[target | zeros]`; resolution 512 -> 768 -> 1024 on `data.resolutions`.
Starts from scratch.

  python -m dreamlite_jax.main --config experiments/dreamlite_1024_pretrain_t2i.py \
      --workdir runs/dreamlite_1024/pretrain_t2i --config.data.t2i_cache=/data/cache/t2i
"""
from experiments import dreamlite_1024_base as base


def get_config():
  config = base.get_config("pretrain_t2i")
  config.data.t2i_weight, config.data.edit_weight = 1.0, 0.0
  config.data.resolutions = ((512, 0), (768, 120_000), (1024, 200_000))
  config.train.steps = 300_000
  return config
