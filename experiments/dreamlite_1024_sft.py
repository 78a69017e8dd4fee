"""Stage 4 at paper scale: supervised fine-tuning from pretrain_joint's EMA (`experiments/dreamlite_1024.py`).

The same objective and T2I/edit mix as the joint stage on a small high-quality
set, a low constant learning rate and a faster EMA.

  python -m dreamlite_jax.main --config experiments/dreamlite_1024_sft.py \
      --workdir runs/dreamlite_1024 --config.model.vae_checkpoint=/models/taesd \
      --config.data.t2i_cache=/data/cache/hq_t2i --config.data.edit_cache=/data/cache/hq_edit
"""
from experiments import dreamlite_1024


def get_config():
  return dreamlite_1024.stage_config("sft")
