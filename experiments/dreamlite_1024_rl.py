"""Stage 5 at paper scale: reward fine-tuning after SFT (Flow-GRPO, DiffusionNFT or ReFL).

`rl.method` selects the algorithm: "flow_grpo" (alias "grpo"), "nft" (DiffusionNFT:
flow matching on the policy's own ODE samples, `rl.nft`) or "refl" (differentiable
reward `rl.reward`, thresholds and regulariser in `rl.refl`).

Overlays the shared base. The online method is Flow-GRPO: 16 prompts x G = 8
SDE samples per iteration at 1024px, 10 sampling steps with text CFG 3.5,
clipped ratio and KL 0.04 to the SFT model; the update goes through the shared
train step on the FSDP mesh like pretraining. Rewards come from local weights
only (`rl.reward.name` / `rl.reward.path`: a CLIP directory for `clip`, the
shipped file for `learned_shapes`); ReFL's per-task thresholds and regulariser
weight live in `rl.refl`.

  python -m dreamlite_jax.main --config experiments/dreamlite_1024_rl.py \
      --workdir runs/dreamlite_1024/rl --config.rl.reward.path=/models/clip-vit-l-14
"""
import ml_collections

from experiments import dreamlite_1024_base as base


def get_config():
  config = base.get_config("rl")
  config.train.update(steps=2_000, batch_size=1280, lr=3e-6, schedule="constant",
                      warmup_steps=0, weight_decay=0.0, grad_clip=1.0, ema_decay=0.99,
                      checkpoint_every=50, sample_every=100)
  config.init_from.workdir = base.stage_workdir("sft")
  config.init_from.ema_as_params = True
  config.rl = ml_collections.ConfigDict(dict(
      method="flow_grpo",
      iterations=1_000,
      prompts_per_iteration=16,
      edit_fraction=0.5,
      sample_steps=10,
      num_minibatches=4,          # 16 x 8 x 10 = 1280 transition rows -> 4 updates of 320
      checkpoint_every=25,
      grpo=ml_collections.ConfigDict(dict(
          group_size=8, noise_level=0.7, clip_range=1e-4, adv_clip=5.0, kl_beta=0.04,
          guidance=3.5, image_guidance=0.0)),
      nft=ml_collections.ConfigDict(dict(
          group_size=8, beta=1.0, adv_clip=2.0, noise_draws=1, sample_steps=28, guidance=3.5,
          image_guidance=1.0)),
      refl=ml_collections.ConfigDict(dict(
          t2i_threshold=0.9, edit_threshold=0.85, reward_weight=1e-3, pretrain_weight=1.0,
          num_steps=28, late_steps=10, shift_mu=1.15)),
      reward=ml_collections.ConfigDict(dict(name="clip", path="")),
  ))
  return config
