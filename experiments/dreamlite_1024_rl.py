"""Stage 5 at paper scale: reward fine-tuning from SFT's EMA (`experiments/dreamlite_1024.py`).

`rl.method` selects the algorithm: "flow_grpo" (Flow-GRPO), "nft" (DiffusionNFT) or
"refl" (ReFL). Prompts come from the caches; the reward (`rl.reward.name`, default
"clip") loads from local weights (`rl.reward.path`: a CLIP folder in transformers layout).

  python -m dreamlite_jax.main --config experiments/dreamlite_1024_rl.py \
      --workdir runs/dreamlite_1024 --config.model.vae_checkpoint=/models/taesd \
      --config.data.t2i_cache=/data/cache/hq_t2i --config.data.edit_cache=/data/cache/hq_edit \
      --config.rl.reward.path=/models/clip-vit-l-14
"""
from experiments import dreamlite_1024


def get_config():
  return dreamlite_1024.stage_config("rl")
