"""Paper-scale DreamLite (1024x1024): the whole job, every stage on real data.

  python -m dreamlite_jax.main --config experiments/dreamlite_1024.py --workdir runs/dreamlite_1024 \
      --config.data.t2i_cache=/data/cache/t2i --config.data.edit_cache=/data/cache/edit \
      --config.model.vae_checkpoint=/models/taesd --config.rl.reward.path=/models/clip-vit-l-14

Each stage also has its own file, `experiments/dreamlite_1024_<stage>.py` (this job
with `stages = "<stage>"`), to run the stages one command at a time into the same
workdir; each starts from its parent's checkpoint there.

The model is the released 0.39B U-Net (`UNetConfig.paper()`), the TAESD-XL VAE
(`model.vae_checkpoint`: a diffusers `AutoencoderTiny` folder) and Qwen3-VL-2B text
features (hidden 2048, 128 tokens). Every stage reads embedding caches
(`python -m data_pipelines.build_cache`: VAE latents + text features, one
sub-cache per image side), so no text encoder runs while training. A U-Net stage
mixes T2I and edit examples at `data.t2i_weight : data.edit_weight` and grows the
image side on `data.resolutions` = ((side_px, first_step), ...). The paper
publishes no schedules; the step counts, batches and learning rates here are ours,
sized for a pod slice of 64+ accelerators (`mesh.fsdp = 8` within a host,
`mesh.data = -1` across).

Stages: pretrain_t2i -> pretrain_edit -> pretrain_joint -> sft -> rl -> distill.

Check that a stage fits before renting the pod:
  python -m benchmarks.scale_check --config experiments/dreamlite_1024_pretrain_joint.py --devices 8
"""
from __future__ import annotations

import dataclasses

import ml_collections

from dreamlite_jax.diffusion.sampling import SamplerConfig
from dreamlite_jax.models.unet import UNetConfig
from dreamlite_jax.models.vae import VAEConfig
from experiments import train_defaults

STAGES = "pretrain_t2i,pretrain_edit,pretrain_joint,sft,rl,distill"

# The mobile pipeline's 4-step shifted schedule at 1024px (mu = 1.15), sigma x 1000.
MOBILE_TIMESTEPS = (1000.0, 904.53, 759.51, 512.84)


def _dataclass_fields(instance) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dataclasses.asdict(instance))


def _sampler(steps: int, guidance: float, image_guidance: float) -> ml_collections.ConfigDict:
  """A `sampler` section (`SamplerConfig`); guidance 0 = no CFG, image_guidance 0 = text
  CFG only."""
  return _dataclass_fields(SamplerConfig(steps, guidance, image_guidance))


def _loss(image_dropout: float) -> ml_collections.ConfigDict:
  """`pretrain_loss.PretrainLossConfig` fields."""
  return ml_collections.ConfigDict(dict(
      timestep_sampling="logit_normal", logit_mean=0.0, logit_std=1.0,
      shift_mu=1.15,       # resolution shift of 1024x1024 (4096 latent tokens)
      text_dropout=0.1,    # trains the unconditional branch for CFG
      image_dropout=image_dropout,  # trains the image-unconditional branch of dual guidance
  ))


def pretrain_section(parent: str, t2i_weight: float, edit_weight: float, *, steps: int,
                     resolutions=((1024, 0),), init_from_ema: bool = False,
                     **train) -> ml_collections.ConfigDict:
  """A pretrain-kind stage: flow matching on the caches at a T2I : edit mix."""
  return ml_collections.ConfigDict(dict(
      kind="pretrain", parent=parent, init_from_ema=init_from_ema,
      train=train_defaults.train_config(**{
          **dict(steps=steps, batch_size=1024, accum_steps=1, lr=1e-4, schedule="cosine",
                 warmup_steps=2_000, end_lr_ratio=0.1, weight_decay=0.01, grad_clip=1.0,
                 ema_decay=0.9999, compute_dtype="bfloat16", log_every=50,
                 checkpoint_every=2_000, keep_checkpoints=3, sample_every=5_000),
          **train}),
      loss=_loss(image_dropout=0.05 if edit_weight > 0 else 0.0),
      data=dict(t2i_weight=t2i_weight, edit_weight=edit_weight, resolutions=resolutions),
  ))


def rl_section() -> ml_collections.ConfigDict:
  """Reward fine-tuning after SFT: Flow-GRPO (or DiffusionNFT / ReFL) with a CLIP reward.

  16 prompts x G = 8 SDE samples per iteration at 1024px, 10 sampling steps with text
  CFG 3.5, clipped ratio and KL 0.04 to the SFT model. Prompts, their text features
  and edit sources come from the caches; the reward model loads from local weights
  (`reward.path`: a CLIP folder in transformers layout).
  """
  return ml_collections.ConfigDict(dict(
      kind="rl", parent="sft", use_ema=True,
      method="flow_grpo",          # "flow_grpo" | "nft" (DiffusionNFT) | "refl"
      iterations=1_000,
      prompts_per_iteration=16,
      edit_fraction=0.5,
      # The rollouts' sampler, set for `method`: Flow-GRPO's 10 SDE steps with text CFG.
      # For DiffusionNFT set steps=28, image_guidance=1.0 (28-step ODE, dual guidance);
      # ReFL's schedule is `refl.num_steps`.
      sampler=_sampler(steps=10, guidance=3.5, image_guidance=0.0),
      num_minibatches=4,          # 16 x 8 x 10 = 1280 transition rows -> 4 updates of 320
      checkpoint_every=25,
      data=dict(size=1024),       # the cache side prompts and edit sources are read at
      grpo=dict(group_size=8, noise_level=0.7, clip_range=1e-4, adv_clip=5.0, kl_beta=0.04),
      nft=dict(group_size=8, beta=1.0, adv_clip=2.0, noise_draws=1),
      refl=dict(t2i_threshold=0.9, edit_threshold=0.85, reward_weight=1e-3,
                pretrain_weight=1.0, num_steps=28, late_steps=10, shift_mu=1.15),
      reward=dict(name="clip", path=""),
      train=train_defaults.train_config(
          steps=2_000, batch_size=1280, lr=3e-6, schedule="constant", warmup_steps=0,
          weight_decay=0.0, grad_clip=1.0, ema_decay=0.99, compute_dtype="bfloat16",
          log_every=1, checkpoint_every=50, keep_checkpoints=3, async_checkpoints=False),
      eval=dict(count=32, sampler=_sampler(steps=28, guidance=3.5, image_guidance=1.0),
                batch_size=16, seed=0),
  ))


def distill_section() -> ml_collections.ConfigDict:
  """DMD2-style distillation to the 4-step CFG-free mobile student.

  The teacher is the RL stage's EMA U-Net (28 Euler steps, CFG 3.5, dual guidance
  1.0 for edits); student and fake score start from it. The student's timesteps are
  the mobile pipeline's, sampled with plain Euler and no guidance. Two time scales:
  5 fake-score updates per student update (DMD2's ratio). `objective` holds
  `training.distill.DistillConfig` fields (timesteps as sigma x 1000).
  """
  return ml_collections.ConfigDict(dict(
      kind="distill",
      parent="rl",                # the teacher stage (rl, or sft when RL is skipped)
      teacher_ema=True,           # teacher = the parent's EMA weights
      objective=dict(
          student_timesteps=MOBILE_TIMESTEPS,
          student_sampler="euler",
          fake_updates=5,
          # The guided teacher: its guidance is the real score's, its steps the regression
          # targets' (28-step Euler ODE).
          teacher=_sampler(steps=28, guidance=3.5, image_guidance=1.0),
          dmd_weight=1.0,
          sigma_min=0.02,
          sigma_max=0.98,
          regression_weight=0.25,  # teacher ODE pairs stabilise the first thousands of steps
          gan_weight=3e-3,         # DMD2's GAN term on mid-block fake-score features
          gan_disc_weight=1e-2,
          gan_hidden=256,
      ),
      fake_lr=2e-6,
      train=train_defaults.train_config(
          steps=20_000, batch_size=256, lr=2e-6, schedule="constant", warmup_steps=200,
          weight_decay=0.01, grad_clip=10.0, b1=0.0, b2=0.999, ema_decay=0.99,
          compute_dtype="bfloat16", log_every=50, checkpoint_every=1_000, sample_every=0),
      # The pool is held in host memory (~2.6 MB of latents + text per row at 1024px).
      data=dict(size=1024, pool_size=2_048, edit_fraction=0.5, seed=0),
      eval=dict(size=1024, per_category=32, per_type=16,
                teacher=_sampler(steps=28, guidance=3.5, image_guidance=1.0),
                use_ema=True, seed=0, batch_size=16),
  ))


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.stages = STAGES
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.unet = _dataclass_fields(UNetConfig.paper())
  config.model.unet.dtype = "bfloat16"  # activations; master params stay float32
  config.model.vae = _dataclass_fields(VAEConfig.taesd())
  config.model.conditioning = "spatial"
  config.model.vae_checkpoint = ""  # a diffusers AutoencoderTiny folder (TAESD-XL) or a run dir
  config.model.text_encoder = ml_collections.ConfigDict(dict(
      spec="",           # no text encoder while training: the caches hold its features
      text_length=128,   # tokens after the system prompt is dropped (the phone U-Net's static length)
  ))

  config.data = ml_collections.ConfigDict(dict(
      source="cache",
      t2i_cache="",        # cache root of image/caption pairs (python -m data_pipelines.build_cache)
      edit_cache="",       # cache root of (source, instruction, target) triplets
      num_threads=16,      # grain read threads per process
      prefetch=64,
  ))
  config.mesh = train_defaults.mesh_config(data=-1, fsdp=8, tensor=1, max_replicated_fraction=0.05)
  # Sample grids every `train.sample_every` steps: fixed cached prompts, the base sampler.
  config.samples = ml_collections.ConfigDict(dict(
      count=8, seed=0, sampler=_sampler(steps=28, guidance=3.5, image_guidance=1.0)))

  config.pretrain_t2i = pretrain_section(
      "", 1.0, 0.0, steps=300_000, resolutions=((512, 0), (768, 120_000), (1024, 200_000)))
  config.pretrain_edit = pretrain_section("pretrain_t2i", 0.0, 1.0, steps=100_000,
                                          warmup_steps=1_000)
  config.pretrain_joint = pretrain_section("pretrain_edit", 0.5, 0.5, steps=150_000,
                                           warmup_steps=1_000)
  # SFT: a small high-quality set (run this stage with --config.data.t2i_cache / edit_cache
  # pointing at its caches), a low constant learning rate and a faster EMA.
  config.sft = pretrain_section(
      "pretrain_joint", 0.5, 0.5, steps=20_000, init_from_ema=True, batch_size=256, lr=1e-5,
      schedule="constant", warmup_steps=500, ema_decay=0.999, checkpoint_every=1_000,
      sample_every=1_000)
  config.rl = rl_section()
  config.distill = distill_section()
  return config


def stage_config(stage: str) -> ml_collections.ConfigDict:
  """This job with only `stage` listed: what each `dreamlite_1024_<stage>.py` returns."""
  config = get_config()
  config.stages = stage
  return config
