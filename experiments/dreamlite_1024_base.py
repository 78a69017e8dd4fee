"""Paper-scale DreamLite (1024x1024): the base every stage config overlays.

The model is the released 0.39B U-Net (`UNetConfig.paper()`), the TAESD-XL VAE
and Qwen3-VL-2B text features (hidden 2048, 128 tokens). Training reads
precomputed embedding caches (`data_pipelines.cache`: VAE latents + text
states), mixes T2I and edit sources at `data.t2i_weight : data.edit_weight`,
and grows the resolution on the schedule `data.resolutions` =
((side_px, first_step), ...). The paper publishes no schedules; the step
counts, batch and learning rates here are our choices, sized for a pod slice
of 64+ accelerators (`mesh.fsdp = 8` within a host, `mesh.data = -1` across).

Stages (run in this order, each starts from the previous one's checkpoint):
  experiments/dreamlite_1024_pretrain_t2i.py    T2I only, progressive 512 -> 1024
  experiments/dreamlite_1024_pretrain_edit.py   edit only, from pretrain_t2i
  experiments/dreamlite_1024_pretrain_joint.py  T2I + edit mixed, from pretrain_edit
  experiments/dreamlite_1024_sft.py             high-quality T2I + edit, from pretrain_joint

Check that a stage fits before renting the pod:
  python -m benchmarks.scale_check --config experiments/dreamlite_1024_pretrain_joint.py --devices 8
"""
from __future__ import annotations

import dataclasses

import ml_collections

from experiments import train_defaults

RUNS = "runs/dreamlite_1024"  # stage workdirs live side by side: runs/dreamlite_1024/<stage>


def stage_workdir(stage: str) -> str:
  return f"{RUNS}/{stage}"


def _dataclass_fields(instance) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dataclasses.asdict(instance))


def get_config(stage: str = "pretrain_t2i") -> ml_collections.ConfigDict:
  """The shared base; `stage` only sets `config.stage`."""
  from dreamlite_jax.models.unet import UNetConfig  # the model's own frozen dataclass
  from dreamlite_jax.models.vae import VAEConfig

  config = ml_collections.ConfigDict()
  config.stage = stage
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.unet = _dataclass_fields(UNetConfig.paper())
  config.model.unet.dtype = "bfloat16"  # activations; master params stay float32
  config.model.vae = _dataclass_fields(VAEConfig.taesd())
  config.model.vae_checkpoint = ""  # a run dir whose params are the VAE (converted TAESD-XL)
  config.model.text_encoder = ml_collections.ConfigDict(dict(
      spec="",           # local Qwen3-VL-2B-Instruct directory (for sampling; training reads caches)
      text_length=128,   # tokens after the system prompt is dropped (the phone U-Net's static length)
  ))

  # pretrain_loss.PretrainLossConfig fields.
  config.loss = ml_collections.ConfigDict(dict(
      timestep_sampling="logit_normal", logit_mean=0.0, logit_std=1.0,
      shift_mu=1.15,       # resolution shift of 1024x1024 (4096 latent tokens)
      text_dropout=0.1,    # trains the unconditional branch for CFG
      image_dropout=0.0,
  ))

  config.data = ml_collections.ConfigDict(dict(
      t2i_cache="",        # embedding cache dir of image/caption pairs (data_pipelines.cache)
      edit_cache="",       # embedding cache dir of (source, instruction, target) triplets
      t2i_weight=1.0,      # mixing proportions of the two sources
      edit_weight=0.0,
      resolutions=((1024, 0),),
      crop="random",
      bucketed=True,       # aspect-ratio buckets around each resolution
      num_threads=16,
      prefetch=64,
  ))

  config.train = train_defaults.train_config(
      steps=100_000, batch_size=1024, accum_steps=1, lr=1e-4, schedule="cosine",
      warmup_steps=2_000, end_lr_ratio=0.1, weight_decay=0.01, grad_clip=1.0,
      ema_decay=0.9999, compute_dtype="bfloat16", log_every=50, checkpoint_every=2_000,
      keep_checkpoints=3, sample_every=5_000)
  config.mesh = train_defaults.mesh_config(data=-1, fsdp=8, tensor=1, max_replicated_fraction=0.05)
  config.init_from = train_defaults.init_from_config()
  return config
