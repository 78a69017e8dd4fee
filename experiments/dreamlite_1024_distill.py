"""Stage 6 at paper scale: DMD2 distillation of the RL teacher into the 4-step student
(`experiments/dreamlite_1024.py`).

  python -m dreamlite_jax.main --config experiments/dreamlite_1024_distill.py \
      --workdir runs/dreamlite_1024 --config.model.vae_checkpoint=/models/taesd \
      --config.data.t2i_cache=/data/cache/t2i --config.data.edit_cache=/data/cache/edit
"""
from experiments import dreamlite_1024
from experiments.dreamlite_1024 import MOBILE_TIMESTEPS, distill_section  # noqa: F401


def get_config():
  return dreamlite_1024.stage_config("distill")
