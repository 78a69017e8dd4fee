"""The embedded default: every DreamLite stage, end to end, on a laptop CPU, on the shapes world.

  python -m dreamlite_jax.main --config experiments/shapes_tiny.py --workdir runs/demo
  python -m dreamlite_jax.main --config experiments/shapes_tiny.py --workdir runs/smoke \
      --config.preset=smoke          # every stage in about a minute (CI)
  python -m dreamlite_jax.main --config experiments/shapes_tiny.py --workdir runs/long \
      --config.preset=long           # every stage several times longer

Same code paths as the paper configs, at CPU scale: the DreamLite U-Net class
(tiny widths, MQA, qk-norm, separable ResBlocks), the Qwen3 text-encoder class
at a tiny size (random init with a fixed seed, frozen) behind the real Qwen
tokenizer and DreamLite's chat templates, a tiny VAE trained first (TAESD's
layout one level short: 4x), the shared trainer and flow-matching loss, and the
converters. Images are 32x32, latents 8x8x4, the packed canvas 8x16. (An 8x VAE on
64x64 images gives the U-Net the same 8x8 latents, but the shapes evaluator scores
its reconstructions of ground-truth images only 0.55 for T2I and 0.16 for edits:
it bounded every score; README, "The main job".)

Stages (each starts from its `parent`'s checkpoint; `--stages a,b` selects):
  vae -> pretrain_t2i -> pretrain_edit -> pretrain_joint -> sft -> rl -> distill -> eval -> convert
`eval` and `convert` take the distilled 4-step student (no CFG).
"""
from __future__ import annotations

import dataclasses

import ml_collections

from dreamlite_jax.config import ConfigError
from dreamlite_jax.diffusion import flow
from dreamlite_jax.diffusion.sampling import SamplerConfig
from dreamlite_jax.models.unet import UNetConfig
from dreamlite_jax.models.vae import VAEConfig
from experiments import train_defaults

STAGES = "vae,pretrain_t2i,pretrain_edit,pretrain_joint,sft,rl,distill,eval,convert"

# `--config.preset=NAME` (big_vision's config argument; user overrides still win):
#   default  the README's job: about 20 minutes on 2 idle cores;
#   smoke    every stage in about a minute (CI): a 2-level U-Net, a few steps each;
#   long     the U-Net stages 3-10x longer (12,600 steps), RL 3x, distillation 4x: about an
#            hour on 2 cores by the default's step times; a stage check every 500 U-Net
#            steps for the learning curve.
PRESETS = ("default", "smoke", "long")


def _picker(preset: str):
  """`pick(default, smoke=, long=)`: the value of this preset (long defaults to default)."""
  if preset not in PRESETS:
    raise ConfigError(f"config.preset = {preset!r}: unknown; known presets: {list(PRESETS)}")

  def pick(default, smoke, long=None):
    return {"default": default, "smoke": smoke, "long": default if long is None else long}[preset]

  return pick


def _fields(instance) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dataclasses.asdict(instance))


def _sampler(steps: int, guidance: float, image_guidance: float) -> ml_collections.ConfigDict:
  """A `sampler` section (`SamplerConfig`); guidance 0 = no CFG (distilled students),
  image_guidance 0 = text CFG only."""
  return _fields(SamplerConfig(steps, guidance, image_guidance))


def _unet_stage(parent: str, steps: int, lr: float, edit_weight: float, *, batch_size: int,
                warmup: int, schedule: str = "cosine", init_from_ema: bool = False
                ) -> ml_collections.ConfigDict:
  """One U-Net stage. Everything but the data mix and the learning-rate schedule is the
  same in all four, so they compile to one train-step program (the learning rate is a
  step input) and the persistent compilation cache compiles it once per job.

  Batch 16: measured on `pretrain_t2i`, 1400 steps at batch 16 (337 s) reached a T2I
  stage check of 0.35 against 0.19 for 700 steps at batch 32 (267 s): at this scale
  the number of updates matters more than the examples per update."""
  section = ml_collections.ConfigDict()
  section.kind = "pretrain"
  section.parent = parent
  section.init_from_ema = init_from_ema
  section.train = train_defaults.train_config(
      steps=steps, batch_size=batch_size, lr=lr, schedule=schedule, warmup_steps=warmup,
      end_lr_ratio=0.1, weight_decay=0.0, grad_clip=1.0, ema_decay=0.995, log_every=25,
      checkpoint_every=500, keep_checkpoints=1, async_checkpoints=True)
  # Edit rows train at higher noise (edit_logit_mean 1.5): from the T2I checkpoint, 600
  # edit steps reach an edit stage check of 0.18 against 0.05 at the T2I rows' 0.0
  # (0.14 at 1.0, 0.12 at 2.5; docs/results.md, "Editing").
  section.loss = ml_collections.ConfigDict(dict(
      timestep_sampling="logit_normal", logit_mean=0.0, logit_std=1.0, edit_logit_mean=1.5,
      shift_mu=None, text_dropout=0.1, image_dropout=0.05))
  # Mixing proportions of T2I and edit examples in every batch.
  section.data = ml_collections.ConfigDict(dict(t2i_weight=1.0 - edit_weight,
                                                edit_weight=edit_weight))
  return section


def _student_timesteps(size: int, vae_scale: int) -> tuple[float, ...]:
  sigmas = flow.schedule_for_size(4, size, size, vae_scale=vae_scale)
  return tuple(round(float(t), 2) for t in flow.timesteps_from_sigmas(sigmas))


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
  pick = _picker(preset)
  config = ml_collections.ConfigDict()
  config.preset = preset
  config.stages = STAGES
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  unet = UNetConfig.tiny(encoder_hid_dim=64)
  # smoke: a smaller U-Net of the same class (2 levels, 1 layer each) compiles much faster.
  config.model.unet = _fields(pick(unet, smoke=dataclasses.replace(
      unet, block_out_channels=(32, 32), heads=(1, 1), down_kinds=("cross", "full"),
      up_kinds=("full", "none"), transformer_depth=(1, 1), layers_per_block=1)))
  vae = VAEConfig.tiny(downsample_factor=4)
  config.model.vae = _fields(vae)
  # How the edit source enters the U-Net: "spatial" = DreamLite's [target | source]
  # along width; "channel" = stacked on channels (ablation; not exportable).
  config.model.conditioning = "spatial"
  config.model.vae_checkpoint = ""  # '' = the job's own `vae` stage
  config.model.text_encoder = ml_collections.ConfigDict(dict(
      spec="tiny:0",      # the tiny Qwen3 (hidden 64), random init with seed 0, frozen
      text_length=48,     # features after the template prefix: the longest edit prompt is 43
  ))

  # The job's data source: the shapes world, rendered once per job (`training/shapes_data.py`).
  config.data = ml_collections.ConfigDict(dict(
      source="shapes", image_size=32, num_t2i=pick(6000, smoke=96),
      num_edit=pick(6000, smoke=96), seed=0))
  config.mesh = train_defaults.mesh_config(data=-1, fsdp=1, tensor=1, max_replicated_fraction=1.0)

  config.vae = ml_collections.ConfigDict()
  config.vae.kind = "vae"
  config.vae.parent = ""
  config.vae.train = train_defaults.train_config(
      steps=pick(1200, smoke=6), batch_size=pick(32, smoke=8), lr=3e-3, schedule="cosine",
      warmup_steps=pick(50, smoke=2), end_lr_ratio=0.05,
      weight_decay=0.0, grad_clip=1.0, ema_decay=0.9, log_every=25, checkpoint_every=500,
      keep_checkpoints=1, async_checkpoints=True)
  # Whole images (crop_size 0): the objects are 11.5-14 px of the 32, and 16x16 crops
  # (half the cost) cut most of them. Measured with a lighter gray background, the edit
  # ceiling was 0.92 with whole images against 0.81-0.84 with crops (docs/results.md,
  # "The VAE and the edit ceiling").
  config.vae.data = ml_collections.ConfigDict(dict(crop_size=pick(0, smoke=16)))
  # Objects weigh 1 + 4 against the plain background (vae_stage.py explains why).
  config.vae.loss = ml_collections.ConfigDict(dict(l1_weight=1.0, mse_weight=1.0,
                                                   moment_weight=0.1, foreground_weight=4.0))

  # Image dropout only touches edit rows, so it is a no-op in pretrain_t2i.
  unet_batch = pick(16, smoke=8)
  warmup = lambda steps: pick(steps, smoke=1)
  config.pretrain_t2i = _unet_stage("vae", steps=pick(1200, smoke=4, long=6000), lr=2e-3,
                                    edit_weight=0.0, batch_size=unet_batch, warmup=warmup(200))
  config.pretrain_t2i.parent = ""  # the U-Net starts from scratch; the VAE is shared
  # Editing needs many more steps than the 20 minutes hold: copying the source across
  # the canvas is learned slowly (docs/results.md, "Editing"); RL iterations raise the T2I
  # score the most per second.
  config.pretrain_edit = _unet_stage("pretrain_t2i", steps=pick(600, smoke=4, long=4000),
                                     lr=1e-3, edit_weight=1.0, batch_size=unet_batch,
                                     warmup=warmup(60))
  config.pretrain_joint = _unet_stage("pretrain_edit", steps=pick(400, smoke=4, long=2000),
                                      lr=1e-3, edit_weight=0.5, batch_size=unet_batch,
                                      warmup=warmup(50))
  config.sft = _unet_stage("pretrain_joint", steps=pick(200, smoke=4, long=600), lr=3e-4,
                           edit_weight=0.5, batch_size=unet_batch, warmup=warmup(20),
                           schedule="constant", init_from_ema=True)

  size = config.data.image_size
  config.distill = ml_collections.ConfigDict(dict(
      kind="distill", parent="rl", teacher_ema=True,
      objective=dict(
          # The 4-step schedule the CFG-free pipeline runs at 32px (mu from 16 latent tokens).
          student_timesteps=_student_timesteps(size, vae.downsample_factor),
          student_sampler="euler", fake_updates=1,
          # The guided teacher: its guidance is the real score's, its steps the regression
          # targets'. DMD plus the regression onto teacher ODE pairs (16 guided teacher steps
          # per pool row, sampled once before training): DMD alone scores about half of
          # DMD + regression, and 16 steps x 256 pairs matches 20 x 512 (docs/results.md).
          teacher=_sampler(steps=pick(16, smoke=2), guidance=3.5, image_guidance=1.0),
          dmd_weight=1.0, sigma_min=0.02, sigma_max=0.98, regression_weight=1.0,
          gan_weight=0.0, gan_disc_weight=1.0, gan_hidden=64),
      fake_lr=1e-4,
      # Student lr: the best of 5e-5, 2e-4, 4e-4 and 8e-4 on 192 T2I prompts (docs/results.md).
      train=train_defaults.train_config(
          steps=pick(80, smoke=2, long=300), batch_size=pick(16, smoke=8), lr=4e-4,
          schedule="constant", warmup_steps=pick(10, smoke=1),
          weight_decay=0.0, grad_clip=10.0, b1=0.0, b2=0.999, ema_decay=0.95, log_every=10,
          checkpoint_every=50, keep_checkpoints=1, async_checkpoints=True),
      data=dict(size=size, pool_size=pick(256, smoke=8, long=512), edit_fraction=0.5, seed=0),
      eval=dict(size=size, per_category=pick(16, smoke=1), per_type=pick(4, smoke=1),
                teacher=_sampler(steps=pick(20, smoke=2), guidance=3.5, image_guidance=1.0),
                use_ema=True, seed=0, batch_size=pick(48, smoke=8))))

  config.eval = ml_collections.ConfigDict()
  config.eval.kind = "eval"
  config.eval.parent = "distill"
  config.eval.use_ema = True
  config.eval.per_category = pick(16, smoke=1)
  config.eval.per_type = pick(8, smoke=1)
  # The deployed sampler: the distilled student, 4 Euler steps, no guidance; `batch_size`
  # prompts per sampling call, each call from `seed`.
  config.eval.sampler = _sampler(steps=4, guidance=0.0, image_guidance=0.0)
  config.eval.batch_size = pick(48, smoke=8)
  config.eval.seed = 0
  # The small evaluation of every pretrain-kind stage: at its end, and every `every` U-Net
  # steps inside it (0 = only at the end) for the report's learning curve.
  config.eval.stage_check = ml_collections.ConfigDict(dict(
      enabled=True, every=pick(0, smoke=0, long=500), per_category=pick(4, smoke=1),
      per_type=pick(2, smoke=1, long=4),
      sampler=_sampler(steps=pick(20, smoke=2), guidance=3.5, image_guidance=1.0),
      batch_size=pick(48, smoke=8), seed=0))

  # RL after SFT (dreamlite_jax/job/rl_stage.py): DiffusionNFT with the exact shapes
  # reward. Per iteration 16 prompts x 4 samples of a 10-step ODE sampler with CFG, each
  # noised twice (one noise per prompt's group) = 128 flow-matching rows in 4 updates.
  # The teacher sampler's T2I score rises with the iteration count (docs/results.md); the
  # job runs 32 (a few seconds each). Flow-GRPO (`method="grpo"`) raises its own SDE
  # sampler's score but lowers this one, which distillation starts from.
  config.rl = ml_collections.ConfigDict(dict(
      kind="rl",
      # method: "nft" (DiffusionNFT), "grpo" (Flow-GRPO), both with the exact programmatic
      # reward, or "refl" (ReFL through the learned differentiable shapes reward `reward`,
      # thresholds/regulariser in `refl`).
      method="nft", reward=dict(name="learned_shapes", path=""),
      refl=dict(t2i_threshold=0.9, edit_threshold=0.9, reward_weight=1.0, pretrain_weight=1.0,
                num_steps=8, late_steps=3, shift_mu=0.0),
      parent="sft", use_ema=True, iterations=pick(32, smoke=1, long=96),
      prompts_per_iteration=pick(16, smoke=2), edit_fraction=0.5,
      num_minibatches=pick(4, smoke=1), checkpoint_every=20,
      # The rollouts' sampler (Flow-GRPO: its SDE; DiffusionNFT: the pipeline's ODE), set for
      # `method`: NFT's 10 steps with CFG and dual guidance. Flow-GRPO was measured with
      # `sampler.steps=8` and `sampler.image_guidance=0.0` (text CFG only).
      sampler=_sampler(steps=pick(10, smoke=2), guidance=3.5, image_guidance=1.0),
      grpo=ml_collections.ConfigDict(dict(group_size=pick(4, smoke=2), noise_level=0.7,
                                          clip_range=0.05,
                                          adv_clip=5.0, kl_beta=0.01)),
      # DiffusionNFT (`method="nft"`): G samples per prompt, `noise_draws` forward-process
      # rows per sample.
      nft=ml_collections.ConfigDict(dict(group_size=pick(4, smoke=2), beta=1.0, adv_clip=2.0,
                                         noise_draws=2)),
      # lr 1e-4: from the job's SFT model, lr 3e-4 took the teacher's edit accuracy from 0.23
      # to 0.07 (T2I 0.385 -> 0.417); 1e-4 keeps 0.18 and reaches T2I 0.448 (docs/results.md,
      # "Reward fine-tuning").
      train=train_defaults.train_config(
          steps=60, batch_size=128, lr=1e-4, schedule="constant", warmup_steps=0,
          weight_decay=0.0, grad_clip=1.0, ema_decay=0.9, log_every=1, checkpoint_every=20,
          keep_checkpoints=1, async_checkpoints=False),
      # Scored with the teacher's sampler: RL tunes the model distillation starts from.
      # 16 prompts per category (96 held-in, 96 held-out T2I, the same noise before and
      # after): at 8, one prompt moved a category by 0.125.
      eval=ml_collections.ConfigDict(dict(per_category=pick(16, smoke=1),
                                          per_type=pick(4, smoke=1),
                                          sampler=_sampler(steps=pick(20, smoke=2),
                                                           guidance=3.5, image_guidance=1.0),
                                          batch_size=pick(48, smoke=8), seed=0)),
  ))

  config.convert = ml_collections.ConfigDict(dict(kind="convert", parent="distill", use_ema=True,
                                                     precision="fp32"))
  return config
