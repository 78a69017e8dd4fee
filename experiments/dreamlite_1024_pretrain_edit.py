"""Stage 2 at paper scale: editing pretraining from pretrain_t2i (`experiments/dreamlite_1024.py`).

Canvas `[target | source latent]` at 1024x1024; edit triplets only.

  python -m dreamlite_jax.main --config experiments/dreamlite_1024_pretrain_edit.py \
      --workdir runs/dreamlite_1024 --config.data.edit_cache=/data/cache/edit \
      --config.model.vae_checkpoint=/models/taesd
"""
from experiments import dreamlite_1024


def get_config():
  return dreamlite_1024.stage_config("pretrain_edit")
