"""Stage 1 at paper scale: text-to-image pretraining, 512 -> 768 -> 1024 (`experiments/dreamlite_1024.py`).

Canvas `[target | zeros]`; starts from scratch.

  python -m dreamlite_jax.main --config experiments/dreamlite_1024_pretrain_t2i.py \
      --workdir runs/dreamlite_1024 --config.data.t2i_cache=/data/cache/t2i \
      --config.model.vae_checkpoint=/models/taesd
"""
from experiments import dreamlite_1024


def get_config():
  return dreamlite_1024.stage_config("pretrain_t2i")
