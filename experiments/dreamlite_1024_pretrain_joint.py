"""Stage 3 at paper scale: joint T2I + editing from pretrain_edit (`experiments/dreamlite_1024.py`).

Every batch mixes T2I and edit examples at `data.t2i_weight : data.edit_weight`
(1 : 1), so one network keeps both skills.

  python -m dreamlite_jax.main --config experiments/dreamlite_1024_pretrain_joint.py \
      --workdir runs/dreamlite_1024 --config.model.vae_checkpoint=/models/taesd \
      --config.data.t2i_cache=/data/cache/t2i --config.data.edit_cache=/data/cache/edit
"""
from experiments import dreamlite_1024


def get_config():
  return dreamlite_1024.stage_config("pretrain_joint")
