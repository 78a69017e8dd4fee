"""DMD2-style step distillation: a CFG teacher (many steps) -> a few-step CFG-free student.

Three denoisers of the same kind (any `predict_fn(params, canvas, timestep,
cond) -> velocity` on the packed `[target | condition]` canvas):
- the *real score*: the frozen teacher, queried with classifier-free (or, for
  edits, dual) guidance;
- the *fake score*: trainable, initialised from the teacher, fitted by flow
  matching to the student's current outputs, so it tracks their distribution;
- the *student*: initialised from the teacher, run on a fixed short schedule
  (`student_sigmas`, e.g. the mobile [1000, 904.53, 759.51, 512.84] / 1000).

The student's x0 prediction at a random one of its steps (reached by running
its own earlier steps, "backward simulation") is pushed along
`x0_fake(x_t) - x0_real(x_t)` at a random noise level `t` (the gradient of the
reverse KL, normalised per example as in DMD). Two-time-scale updates: each
step does `fake_updates` fake-score updates, the last on the same student samples
the student update then uses, then one student update. Optional
extras: a regression loss onto teacher ODE pairs (DMD's noise -> teacher image
pairs, computed once per data row before training: the student, started from
`ode_noise`, should predict the teacher's guided endpoint `ode_target` at
whichever of its steps it is trained on), and a GAN head on pooled fake-score
features (real latents vs student outputs).

Only the target half is ever noised or generated; the condition half (zeros
for T2I, the clean source latent for edits) is passed through untouched.
The same `distill_step` drives the 2-D toy test (MLP velocity models and an
analytic teacher) and the U-Net stage.

Batch (dict, leading axis B): `latents` [B, H, W, C] (shape; also the "real"
images of the GAN), `text` [B, L, D], `text_mask` [B, L], optional
`source_latents` + `is_edit` [B], optional `time_ids` [B, 2], and
`null_text` [B|1, L, D] + `null_text_mask` [B|1, L] whenever the teacher uses
guidance, and `ode_noise` + `ode_target` [B, H, W, C] when the regression is on.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh

from dreamlite_jax.diffusion import flow
from dreamlite_jax.diffusion import packing
from dreamlite_jax.diffusion import sampling
from dreamlite_jax.training import mesh as mesh_lib
from dreamlite_jax.training import state as state_lib
from dreamlite_jax.training import step as step_lib

# (params, canvas [B, H, 2W, C], timestep [B], cond) -> velocity [B, H, 2W, C]
PredictFn = Callable[[Any, jax.Array, jax.Array, dict], jax.Array]
# (params, canvas, timestep, cond) -> (velocity [B, H, 2W, C], features [B, ...])
FeaturesFn = Callable[[Any, jax.Array, jax.Array, dict], tuple[jax.Array, jax.Array]]

STUDENT_SAMPLERS = ("euler", "renoise")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """The distillation objective (the `config.distill` section of a stage)."""
  student_sigmas: tuple[float, ...]  # student schedule, decreasing, without the final 0
  student_sampler: str = "euler"  # how the student moves between its steps (see few_step_sample)
  fake_updates: int = 5  # fake-score updates per student update (two time scales)
  # The guided teacher: its guidance and image_guidance (0 = off; dual guidance for edits,
  # which T2I rows reduce to text CFG) are the real score's, its steps the Euler steps of
  # the regression targets.
  teacher: sampling.SamplerConfig = sampling.SamplerConfig(steps=28, guidance=3.5)
  dmd_weight: float = 1.0
  sigma_min: float = 0.02  # range of the DMD noise level t
  sigma_max: float = 0.98
  regression_weight: float = 0.0  # 0 = off
  gan_weight: float = 0.0  # student's non-saturating GAN loss weight; 0 = no GAN head
  gan_disc_weight: float = 1.0  # classifier loss weight inside the fake-score update
  gan_hidden: int = 64

  def __post_init__(self):
    s = self.student_sigmas
    if len(s) < 1 or any(not 0.0 < x <= 1.0 for x in s) or any(a <= b for a, b in zip(s, s[1:])):
      raise ValueError(f"distill.student_sigmas must be decreasing values in (0, 1], got {s}")
    if self.student_sampler not in STUDENT_SAMPLERS:
      raise ValueError(f"distill.student_sampler={self.student_sampler!r}; expected one of "
                       f"{STUDENT_SAMPLERS}")
    if self.fake_updates < 1:
      raise ValueError(f"distill.fake_updates must be >= 1, got {self.fake_updates}")
    if not 0.0 <= self.sigma_min < self.sigma_max <= 1.0:
      raise ValueError(f"distill.sigma_min/sigma_max must satisfy 0 <= min < max <= 1, got "
                       f"{self.sigma_min}, {self.sigma_max}")
    for name in ("dmd_weight", "regression_weight", "gan_weight", "gan_disc_weight"):
      if getattr(self, name) < 0:
        raise ValueError(f"distill.{name} must be >= 0, got {getattr(self, name)}")

  @property
  def uses_gan(self) -> bool:
    return self.gan_weight > 0

  @property
  def teacher_guided(self) -> bool:
    """Whether the real score needs the unconditional branch (and batches `null_text`):
    not without guidance, nor at text guidance 1 without image guidance."""
    g, g_img = self.teacher.scales
    return g is not None and (g != 1.0 or g_img is not None)

  @property
  def schedule(self) -> jax.Array:
    """Student sigmas with the terminal 0: [K + 1]."""
    return jnp.asarray(tuple(self.student_sigmas) + (0.0,), jnp.float32)


@dataclasses.dataclass(frozen=True)
class DistillModels:
  """The functions distillation calls. `teacher_fn` defaults to `predict_fn`
  (same architecture); `features_fn` is required when the GAN head is on."""
  predict_fn: PredictFn
  teacher_fn: PredictFn | None = None
  features_fn: FeaturesFn | None = None

  @property
  def teacher(self) -> PredictFn:
    return self.teacher_fn or self.predict_fn


class GANHead(nn.Module):
  """Real/fake logit from fake-score features: [B, ..., F] -> mean-pooled [B, F] -> [B]."""
  hidden: int = 64

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    x = features.astype(jnp.float32)
    x = x.reshape(x.shape[0], -1, x.shape[-1]).mean(axis=1)
    x = nn.silu(nn.Dense(self.hidden, name="hidden")(x))
    return nn.Dense(1, name="logit")(x)[:, 0]


@struct.dataclass
class DistillState:
  """Student and fake-score train states (the GAN head lives in `fake.params['head']`)."""
  student: state_lib.TrainState
  fake: state_lib.TrainState

  @property
  def step(self) -> jax.Array:
    """Student updates so far (the stage's step counter; checkpoints are named by it)."""
    return self.student.step

  @property
  def rng(self) -> jax.Array:
    return self.student.rng

  @property
  def params(self) -> Any:
    """The student's (what the trainer samples with)."""
    return self.student.params

  @property
  def ema_params(self) -> Any:
    return self.student.ema_params


# ----------------------------------------------------------------------------
# Batch -> (x0 shape, condition, cond, uncond).


def _require(batch: dict, key: str) -> jax.Array:
  if key not in batch:
    raise KeyError(f"distillation batch is missing {key!r}; it has {sorted(batch)}")
  return batch[key]


def batch_inputs(batch: dict, need_uncond: bool) -> tuple[jax.Array, jax.Array, dict, dict | None]:
  """(real latents [B, H, W, C], condition [B, H, W, C], cond, uncond or None)."""
  latents = _require(batch, "latents").astype(jnp.float32)
  packing.check_latents("batch['latents']", latents)
  b, h, w, _ = latents.shape
  source, is_edit = batch.get("source_latents"), batch.get("is_edit")
  if source is not None and is_edit is None:
    raise KeyError("distillation batch has 'source_latents' but no 'is_edit' [B] flag")
  condition = packing.condition_latents(source, is_edit, latents)
  time_ids = batch.get("time_ids")
  if time_ids is None:
    time_ids = jnp.asarray(flow.size_ids(b, h * flow.VAE_SCALE, w * flow.VAE_SCALE))
  text, text_mask = _require(batch, "text"), _require(batch, "text_mask")
  cond = {"text": text, "text_mask": text_mask, "time_ids": time_ids}
  if not need_uncond:
    return latents, condition, cond, None
  null_text, null_mask = _require(batch, "null_text"), _require(batch, "null_text_mask")
  if null_text.shape[1:] != text.shape[1:] or null_mask.shape[1:] != text_mask.shape[1:]:
    raise ValueError(f"null_text {null_text.shape}/null_text_mask {null_mask.shape} must match "
                     f"text {text.shape}/text_mask {text_mask.shape} except in the batch axis")
  uncond = {"text": jnp.broadcast_to(null_text, text.shape).astype(text.dtype),
            "text_mask": jnp.broadcast_to(null_mask, text_mask.shape).astype(text_mask.dtype),
            "time_ids": time_ids}
  return latents, condition, cond, uncond


def _col(sigma: jax.Array) -> jax.Array:
  return sigma.reshape(-1, 1, 1, 1)


def guided_teacher_velocity(fn: PredictFn, params: Any, x: jax.Array, sigma: jax.Array,
                            condition: jax.Array, cond: dict, uncond: dict | None,
                            guidance_scale: float | None,
                            image_guidance_scale: float | None) -> jax.Array:
  """`sampling.guided_velocity` of the canvas model `fn` at `params`, each row at its own
  `sigma` [B]; returns float32 [B, H, W, C].

  Scales as `sampling.guidance_scales` returns them (None = off). No guidance, and
  guidance 1 without image guidance, are the plain conditional field: one branch.
  """
  if uncond is None or guidance_scale is None or (guidance_scale == 1.0
                                                  and image_guidance_scale is None):
    uncond, guidance_scale, image_guidance_scale = None, None, None
  velocity_fn = lambda canvas, timestep, c: fn(params, canvas, timestep, c)
  return sampling.guided_velocity(velocity_fn, x, condition, sigma, cond, uncond,
                                  guidance_scale, image_guidance_scale)


# ----------------------------------------------------------------------------
# The student.


def student_inputs(fn: PredictFn, params: Any, noise: jax.Array, condition: jax.Array,
                   cond: dict, config: DistillConfig, index: jax.Array,
                   rng: jax.Array) -> jax.Array:
  """Backward simulation: the student's input at its step `index` [B] (no gradient).

  Runs the student's own first steps from `noise` [B, H, W, C] with its
  sampler, so training sees exactly the inputs inference will produce.
  Returns x at sigma_{index} [B, H, W, C].
  """
  sigmas = config.schedule
  b = noise.shape[0]

  # A scan, not a Python loop: the student is compiled once for all its steps.
  def step(x, j):
    s, s_next = sigmas[j], sigmas[j + 1]
    v = packing.target_velocity(fn, params, x, jnp.full((b,), s), condition, cond)
    if config.student_sampler == "euler":
      x = x + (s_next - s) * v
    else:
      e = jax.random.normal(jax.random.fold_in(rng, j), x.shape, jnp.float32)
      x = (1.0 - s_next) * (x - s * v) + s_next * e
    return x, x

  _, later = jax.lax.scan(step, noise, jnp.arange(len(config.student_sigmas) - 1))
  xs = jnp.concatenate([noise[None], later])
  return jax.lax.stop_gradient(xs[index, jnp.arange(b)])


def student_start(fn: PredictFn, params: Any, latent_shape: tuple[int, ...], condition: jax.Array,
                  cond: dict, config: DistillConfig, rng: jax.Array,
                  noise: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Where the student is trained: a random one of its steps per example, reached
  from `noise` [B, H, W, C] (default: fresh Gaussian noise) by its own earlier
  steps under `params` (no gradient). Returns (x [B, H, W, C], sigma [B], index [B])."""
  k_index, k_noise, k_sim = jax.random.split(rng, 3)
  b = latent_shape[0]
  index = jax.random.randint(k_index, (b,), 0, len(config.student_sigmas))
  if noise is None:
    noise = jax.random.normal(k_noise, latent_shape, jnp.float32)
  x = student_inputs(fn, params, noise, condition, cond, config, index, k_sim)
  return x, config.schedule[index], index


def student_x0(fn: PredictFn, params: Any, x: jax.Array, sigma: jax.Array, condition: jax.Array,
               cond: dict) -> jax.Array:
  """The student's one-step x0 prediction from x [B, H, W, C] at sigma [B]."""
  return x - _col(sigma) * packing.target_velocity(fn, params, x, sigma, condition, cond)


# ----------------------------------------------------------------------------
# Losses.


def _mean_per_example(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def dmd_loss(models: DistillModels, teacher_params: Any, fake_params: Any, x0: jax.Array,
             condition: jax.Array, cond: dict, uncond: dict | None, config: DistillConfig,
             rng: jax.Array) -> tuple[jax.Array, dict]:
  """Distribution-matching loss whose gradient in `x0` [B, H, W, C] is
  `(x0_fake - x0_real) / mean|x0 - x0_real|` at x_t = noise(x0, t)."""
  k_t, k_e = jax.random.split(rng)
  b = x0.shape[0]
  t = jax.random.uniform(k_t, (b,), jnp.float32, config.sigma_min, config.sigma_max)
  x0_sg = jax.lax.stop_gradient(x0)
  x_t = flow.add_noise(x0_sg, jax.random.normal(k_e, x0.shape, jnp.float32), t)
  v_real = guided_teacher_velocity(models.teacher, teacher_params, x_t, t, condition, cond, uncond,
                                   *config.teacher.scales)
  v_fake = packing.target_velocity(models.predict_fn, fake_params, x_t, t, condition, cond)
  pred_real = x_t - _col(t) * v_real
  pred_fake = x_t - _col(t) * v_fake
  weight = jnp.mean(jnp.abs(x0_sg - pred_real), axis=tuple(range(1, x0.ndim)), keepdims=True)
  grad = jnp.nan_to_num((pred_fake - pred_real) / jnp.maximum(weight, 1e-6))
  grad = jax.lax.stop_gradient(grad)
  loss = 0.5 * jnp.mean((x0 - (x0_sg - grad))**2)
  return loss, {"dmd_grad_norm": jnp.sqrt(jnp.mean(grad**2)), "dmd_t_mean": jnp.mean(t)}


def _gan_logits(models: DistillModels, fake_params: Any, head: GANHead, x_t: jax.Array,
                sigma: jax.Array, condition: jax.Array, cond: dict) -> tuple[jax.Array, jax.Array]:
  """(target-half velocity, logits [B]) of the fake score + GAN head at x_t."""
  if models.features_fn is None:
    raise ValueError("distill.gan_weight > 0 needs DistillModels.features_fn")
  out, features = models.features_fn(fake_params["score"], packing.pack(x_t, condition),
                                     sigma * flow.NUM_TRAIN_TIMESTEPS, cond)
  logits = head.apply({"params": fake_params["head"]}, features)
  return packing.unpack_target(out).astype(jnp.float32), logits


def fake_score_loss(models: DistillModels, fake_params: Any, x0_student: jax.Array,
                    real_latents: jax.Array, condition: jax.Array, cond: dict,
                    config: DistillConfig, rng: jax.Array) -> tuple[jax.Array, dict]:
  """Flow matching of the fake score on the student's samples `x0_student` [B, H, W, C]
  (no gradient to the student), plus the GAN classifier loss when enabled."""
  k_t, k_e, k_er = jax.random.split(rng, 3)
  b = x0_student.shape[0]
  t = jax.random.uniform(k_t, (b,), jnp.float32)
  noise = jax.random.normal(k_e, x0_student.shape, jnp.float32)
  x0 = jax.lax.stop_gradient(x0_student)
  x_t = flow.add_noise(x0, noise, t)
  target = flow.velocity_target(x0, noise)
  if not config.uses_gan:
    v = packing.target_velocity(models.predict_fn, fake_params["score"], x_t, t, condition, cond)
    loss = jnp.mean((v - target)**2)
    return loss, {"fake_loss": loss}
  head = GANHead(config.gan_hidden)
  t_gan = jax.random.uniform(k_t, (b,), jnp.float32, config.sigma_min, config.sigma_max)
  real_t = flow.add_noise(real_latents, jax.random.normal(k_er, real_latents.shape), t_gan)
  fake_t = flow.add_noise(x0, noise, t_gan)
  # One forward over [fm inputs | real | fake]: the fm velocity and both logits.
  v, logits = _gan_logits(models, fake_params, head, jnp.concatenate([x_t, real_t, fake_t]),
                          jnp.concatenate([t, t_gan, t_gan]), jnp.concatenate([condition] * 3),
                          jax.tree.map(lambda c: jnp.concatenate([c] * 3), cond))
  fm = jnp.mean((v[:b] - target)**2)
  d_loss = jnp.mean(jax.nn.softplus(-logits[b:2 * b])) + jnp.mean(jax.nn.softplus(logits[2 * b:]))
  loss = fm + config.gan_disc_weight * d_loss
  return loss, {"fake_loss": fm, "gan_d_loss": d_loss,
                "gan_d_real_acc": jnp.mean(logits[b:2 * b] > 0),
                "gan_d_fake_acc": jnp.mean(logits[2 * b:] < 0)}


def student_noise(batch: dict, config: DistillConfig) -> jax.Array | None:
  """The noise the student's samples start from: the ODE pairs' `ode_noise` when the
  regression is on (so one x0 serves DMD and regression), else None (fresh noise)."""
  if config.regression_weight <= 0:
    return None
  return _require(batch, "ode_noise").astype(jnp.float32)


def student_loss(models: DistillModels, x0: jax.Array, teacher_params: Any, fake_params: Any,
                 batch: dict, config: DistillConfig, rng: jax.Array) -> tuple[jax.Array, dict]:
  """DMD + optional regression + optional GAN generator loss of the student's samples
  `x0` [B, H, W, C] (`student_x0`, differentiable in the student's params)."""
  _, condition, cond, uncond = batch_inputs(batch, config.teacher_guided)
  k_dmd, k_gan = jax.random.split(rng)
  fake_params = jax.lax.stop_gradient(fake_params)
  loss, metrics = dmd_loss(models, teacher_params, fake_params["score"], x0, condition, cond,
                           uncond, config, k_dmd)
  metrics["dmd_loss"] = loss
  loss = config.dmd_weight * loss
  if config.regression_weight > 0:
    reg = jnp.mean((x0 - _require(batch, "ode_target").astype(jnp.float32))**2)
    metrics["regression_loss"] = reg
    loss = loss + config.regression_weight * reg
  if config.uses_gan:
    k_t, k_e = jax.random.split(k_gan)
    t = jax.random.uniform(k_t, (x0.shape[0],), jnp.float32, config.sigma_min, config.sigma_max)
    x_t = flow.add_noise(x0, jax.random.normal(k_e, x0.shape), t)
    _, logits = _gan_logits(models, fake_params, GANHead(config.gan_hidden), x_t, t, condition,
                            cond)
    g = jnp.mean(jax.nn.softplus(-logits))
    metrics["gan_g_loss"] = g
    loss = loss + config.gan_weight * g
  metrics["student_loss"] = loss
  return loss, metrics


# ----------------------------------------------------------------------------
# State and step.


def fake_params_from(score_params: Any, config: DistillConfig, feature_dim: int | None,
                     rng: jax.Array) -> dict:
  """The fake-score params tree `{'score': ..., ['head': ...]}` (head only with the GAN)."""
  params = {"score": score_params}
  if config.uses_gan:
    if feature_dim is None:
      raise ValueError("distill.gan_weight > 0 needs the fake score's feature dimension")
    params["head"] = GANHead(config.gan_hidden).init(rng, jnp.zeros((1, feature_dim)))["params"]
  return params


def create_distill_state(init_params: Callable[[jax.Array], Any], teacher_params: Any,
                         config: DistillConfig, tx_student: optax.GradientTransformation,
                         tx_fake: optax.GradientTransformation, mesh: Mesh, seed: int,
                         feature_dim: int | None = None) -> tuple[DistillState, DistillState]:
  """A DistillState born sharded, student and fake score both copies of the teacher.

  `init_params(rng)` gives the (boxed) student params for shapes and logical
  axes; `teacher_params` (same structure, unboxed) are copied in.
  Returns (state, its NamedSharding tree).
  """
  def fake_init(rng):
    return fake_params_from(init_params(rng), config, feature_dim, jax.random.fold_in(rng, 1))

  s_abstract, s_shard = state_lib.state_shardings(init_params, tx_student, mesh)
  _, f_shard = state_lib.state_shardings(fake_init, tx_fake, mesh)
  if jax.tree.structure(teacher_params) != jax.tree.structure(s_abstract.params):
    raise ValueError("teacher params do not have the student model's structure")

  def copy_into(value, like):
    if value.shape != like.shape:
      raise ValueError(f"teacher param of shape {value.shape} does not fit {like.shape}")
    # A fresh buffer per leaf: the step donates the state but never the teacher.
    return mesh_lib.put_global(np.asarray(value, dtype=like.dtype), like.sharding)

  teacher_copy = lambda like: jax.tree.map(copy_into, teacher_params, like)
  student = state_lib.state_from_params(teacher_copy(s_abstract.params),
                                        teacher_copy(s_abstract.ema_params), tx_student, s_shard,
                                        seed)
  head_rng = jax.random.fold_in(jax.random.PRNGKey(seed + 1), 1)
  fake_params = nn.unbox(fake_params_from(teacher_copy(s_abstract.params), config, feature_dim,
                                          head_rng))
  # state_from_params places both states on their shardings (jit out_shardings).
  fake = state_lib.state_from_params(fake_params, jax.tree.map(jnp.copy, fake_params), tx_fake,
                                     f_shard, seed + 1)
  return DistillState(student=student, fake=fake), DistillState(student=s_shard, fake=f_shard)


def distill_step(models: DistillModels, config: DistillConfig,
                 tx_student: optax.GradientTransformation, tx_fake: optax.GradientTransformation,
                 state: DistillState, batch: dict, rng: jax.Array, lr: jax.Array,
                 teacher_params: Any, *, fake_lr_scale: float,
                 compute_dtype: jnp.dtype = jnp.float32, ema_decay: float = 0.999
                 ) -> tuple[DistillState, dict]:
  """`config.fake_updates` fake-score updates, then one student update (not jitted).

  `tx_student` / `tx_fake` are unit-rate transformations (`state.make_optimizer`);
  the student steps at `lr` and the fake score at `lr * fake_lr_scale` (one schedule,
  the trainer's). Keys come from `fold_in(rng, state.step)`, so a resumed run replays
  the same noise. Returns (new state, scalar metrics).
  """
  key = jax.random.fold_in(rng, state.step)
  k_x0, k_fresh, k_fake, k_student = jax.random.split(key, 4)
  cast = lambda p: state_lib.cast_params(p, compute_dtype)
  teacher = cast(teacher_params)
  latents, condition, cond, _ = batch_inputs(batch, config.teacher_guided)
  sim_params = jax.lax.stop_gradient(cast(state.student.params))

  def fake_update(fake, x0_student, i):
    k_loss = jax.random.fold_in(k_fake, i)

    def loss_fn(p):
      return fake_score_loss(models, cast(p), x0_student, latents, condition, cond, config,
                             k_loss)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(fake.params)
    fake, grad_norm, finite = step_lib.apply_gradients(fake, loss, grads, tx_fake,
                                                       lr * fake_lr_scale, ema_decay)
    return fake, dict(metrics, fake_grad_norm=grad_norm, fake_finite=finite.astype(jnp.float32))

  def fresh_x0(rng):
    """x0 (without gradient) of a fresh student sample at the current params."""
    x, sigma, _ = student_start(models.predict_fn, sim_params, latents.shape, condition, cond,
                                config, rng)
    return jax.lax.stop_gradient(student_x0(models.predict_fn, sim_params, x, sigma, condition,
                                            cond))

  # Every fake update but the last fits fresh student samples; the last fits the very
  # samples the student update then pushes on (DMD2's fake score trains on the
  # generator turn's outputs). Those samples' x0 is computed once, with its VJP, and
  # serves both updates: one student forward per step fewer to compile and run.
  fake, fake_metrics = state.fake, []
  if config.fake_updates > 1:
    fake, scanned = jax.lax.scan(
        lambda f, i: fake_update(f, fresh_x0(jax.random.fold_in(k_fresh, i)), i), fake,
        jnp.arange(config.fake_updates - 1))
    fake_metrics.append(scanned)
  x, sigma, index = student_start(models.predict_fn, sim_params, latents.shape, condition, cond,
                                  config, k_x0, noise=student_noise(batch, config))
  x0, x0_vjp = jax.vjp(
      lambda p: student_x0(models.predict_fn, cast(p), x, sigma, condition, cond),
      state.student.params)
  fake, last = fake_update(fake, jax.lax.stop_gradient(x0), config.fake_updates - 1)
  fake_metrics = jax.tree.map(lambda *v: jnp.concatenate(v),
                              *fake_metrics, jax.tree.map(lambda v: v[None], last))

  (loss, metrics), x0_grad = jax.value_and_grad(
      lambda x0: student_loss(models, x0, teacher, fake.params, batch, config, k_student),
      has_aux=True)(x0)
  (grads,) = x0_vjp(x0_grad)
  metrics["student_index_mean"] = jnp.mean(index.astype(jnp.float32))
  student, grad_norm, finite = step_lib.apply_gradients(
      state.student, loss, grads, tx_student, lr, ema_decay)
  out = {k: jnp.mean(v.astype(jnp.float32)) for k, v in metrics.items()}
  out.update({k: jnp.mean(v.astype(jnp.float32)) for k, v in fake_metrics.items()})
  out.update(loss=loss.astype(jnp.float32), grad_norm=grad_norm,
             finite=finite.astype(jnp.int32), skipped=student.skipped + fake.skipped,
             lr=jnp.asarray(lr, jnp.float32))
  return DistillState(student=student, fake=fake), out


def make_distill_step(models: DistillModels, config: DistillConfig,
                      tx_student: optax.GradientTransformation,
                      tx_fake: optax.GradientTransformation, mesh: Mesh,
                      state_shardings: DistillState, teacher_shardings: Any, *,
                      fake_lr_scale: float, compute_dtype: jnp.dtype = jnp.float32,
                      ema_decay: float = 0.999) -> Callable:
  """The jitted `(state, batch, rng, lr, teacher_params) -> (state, metrics)`: the
  trainer's step signature with the frozen teacher as the extra argument.

  State sharded as `state_shardings` (donated), the teacher as `teacher_shardings`
  (usually the student's param shardings), batch leaves split over ('data', 'fsdp'),
  rng, lr and metrics replicated.
  """
  def step(state, batch, rng, lr, teacher_params):
    with nn.logical_axis_rules(mesh_lib.LOGICAL_AXIS_RULES):
      return distill_step(models, config, tx_student, tx_fake, state, batch, rng, lr,
                          teacher_params, fake_lr_scale=fake_lr_scale,
                          compute_dtype=compute_dtype, ema_decay=ema_decay)

  replicated = mesh_lib.replicated(mesh)
  return jax.jit(step,
                 in_shardings=(state_shardings, mesh_lib.batch_sharding(mesh), replicated,
                               replicated, teacher_shardings),
                 out_shardings=(state_shardings, replicated),
                 donate_argnums=(0,))


def unet_features_fn(model: nn.Module, feature_module: str = "mid_block") -> FeaturesFn:
  """`DreamLiteUNet` -> (velocity, features of submodule `feature_module`) in one forward."""

  def features(params, canvas, timestep, cond):
    out, state = model.apply({"params": params}, canvas, timestep, cond["text"],
                             cond["text_mask"], cond["time_ids"],
                             capture_intermediates=lambda m, _: m.name == feature_module,
                             mutable=["intermediates"])
    captured = state["intermediates"].get(feature_module)
    if captured is None:
      raise ValueError(f"the U-Net has no submodule named {feature_module!r} to take GAN "
                       f"features from")
    return out, captured["__call__"][0]

  return features
