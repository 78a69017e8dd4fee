"""Stage 6 at paper scale: DMD2-style distillation to the 4-step CFG-free mobile student.

The teacher is the RL stage's EMA U-Net (28 Euler steps, CFG 3.5, dual guidance
1.0 for edits); student and fake score start from it. The student's timesteps
are the mobile pipeline's [1000, 904.53, 759.51, 512.84] (the 4-step shifted
schedule at 1024px, mu = 1.15), sampled with plain Euler and no guidance.
Two time scales: 5 fake-score updates per student update (DMD2's ratio).

  python -m dreamlite_jax.main --config experiments/dreamlite_1024_distill.py \
      --workdir runs/dreamlite_1024 --stages distill

`objective` holds `dreamlite_jax.training.distill.DistillConfig` fields
(timesteps as sigma x 1000); `run_stage` in `dreamlite_jax.training.distill_stage`
reads this section.
"""
import ml_collections

from experiments import dreamlite_1024_base as base
from experiments import train_defaults

MOBILE_TIMESTEPS = (1000.0, 904.53, 759.51, 512.84)


def distill_section() -> ml_collections.ConfigDict:
  """`config.distill` at 1024px."""
  return ml_collections.ConfigDict(dict(
      parent="rl",                # the teacher stage (rl, or sft when RL is skipped)
      teacher_ema=True,           # teacher = the parent's EMA weights
      objective=dict(
          student_timesteps=MOBILE_TIMESTEPS,
          student_sampler="euler",
          fake_updates=5,
          guidance_scale=3.5,
          image_guidance_scale=1.0,
          dmd_weight=1.0,
          sigma_min=0.02,
          sigma_max=0.98,
          regression_weight=0.25,  # teacher ODE pairs stabilise the first thousands of steps
          regression_steps=28,
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
      eval=dict(size=1024, per_category=32, per_type=16, teacher_steps=28, guidance=3.5,
                image_guidance=1.0, use_ema=True, seed=0, batch_size=16),
  ))


def get_config():
  config = base.get_config("distill")
  config.distill = distill_section()
  config.init_from.workdir = base.stage_workdir("rl")
  config.init_from.ema_as_params = True
  return config
