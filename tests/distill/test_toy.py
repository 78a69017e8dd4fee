"""The distillation loss on a 2-D Gaussian mixture with an exact-score teacher.

A 2-step MLP student, initialised from an MLP fitted to the teacher's field,
starts far from the target distribution (few-step Euler on a curved flow lands
between the modes) and must end close to it after DMD training with the same
`distill_step` the U-Net stage uses, on an 8-device mesh.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from dreamlite_jax.diffusion import flow
from dreamlite_jax.diffusion import sampling
from dreamlite_jax.diffusion.sampling import SamplerConfig
from dreamlite_jax.training import distill
from dreamlite_jax.training import mesh as mesh_lib

from . import toy

N_EVAL = 1024
STUDENT_SIGMAS = (1.0, 0.6)


@pytest.fixture(scope="module")
def teacher_mlp():
  params, loss = toy.fit_mlp_to_teacher(jax.random.PRNGKey(0), steps=400)
  assert loss < 0.2, f"the MLP did not fit the teacher's field (mse {loss})"
  return params


@pytest.fixture(scope="module")
def eval_set():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, toy.NUM_CLASSES, N_EVAL)
  cond = {"text": jnp.asarray(toy.one_hot_text(labels)), "text_mask": jnp.ones((N_EVAL, 1)),
          "time_ids": jnp.zeros((N_EVAL, 2))}
  noise = jax.random.normal(jax.random.PRNGKey(5), (N_EVAL, 1, 1, 2))
  return toy.sample_mixture(rng, labels), noise, cond


def _sample(fn, params, sigmas, eval_set) -> np.ndarray:
  _, noise, cond = eval_set
  out = sampling.euler_sample(lambda c, t, k: fn(params, c, t, k), noise, jnp.zeros_like(noise),
                              jnp.asarray(sigmas, jnp.float32), cond)
  return toy.canvas_points(out)


def test_exact_teacher_reaches_the_mixture(eval_set):
  target = eval_set[0]
  many = _sample(toy.teacher_predict, None, flow.sampling_sigmas(100, 0.0), eval_set)
  assert toy.sliced_wasserstein(many, target) < 0.12
  # Class-conditional: class 0 lives on the left (x < 0), class 1 on the right.
  labels = np.argmax(np.asarray(eval_set[2]["text"])[:, 0], -1)
  assert np.mean((many[:, 0] > 0) == (labels == 1)) > 0.98


def test_two_step_student_matches_the_mixture(teacher_mlp, eval_set):
  target = eval_set[0]
  schedule = STUDENT_SIGMAS + (0.0,)
  before = toy.sliced_wasserstein(_sample(toy.mlp_predict, teacher_mlp, schedule, eval_set), target)

  config = distill.DistillConfig(student_sigmas=STUDENT_SIGMAS,
                                 teacher=SamplerConfig(steps=28),  # unguided teacher
                                 fake_updates=5)
  models = distill.DistillModels(predict_fn=toy.mlp_predict, teacher_fn=toy.teacher_predict)
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
  assert mesh.size == 8
  tx_student = optax.adam(1.0, b1=0.0, b2=0.99)  # unit rate; lr gives 1e-3
  tx_fake = optax.adam(1.0, b1=0.0, b2=0.99)
  state, shardings = distill.create_distill_state(toy.init_mlp, teacher_mlp, config, tx_student,
                                                  tx_fake, mesh, seed=0)
  teacher_shardings = jax.tree.map(lambda _: mesh_lib.replicated(mesh), teacher_mlp)
  step = distill.make_distill_step(models, config, tx_student, tx_fake, mesh, shardings,
                                   teacher_shardings, fake_lr_scale=1.0, ema_decay=0.9)
  rng = np.random.default_rng(2)
  key, lr = jax.device_put(np.asarray(state.rng), mesh_lib.replicated(mesh)), np.float32(1e-3)
  for _ in range(400):
    batch = mesh_lib.shard_batch(toy.make_batch(rng, 256), mesh)
    state, metrics = mesh_lib.wait_on_cpu_mesh(step(state, batch, key, lr, teacher_mlp), mesh)
  assert int(state.step) == 400 and int(state.fake.step) == 400 * config.fake_updates
  assert int(metrics["skipped"]) == 0
  after = toy.sliced_wasserstein(_sample(toy.mlp_predict, state.student.ema_params, schedule,
                                         eval_set), target)
  print(f"toy 2-step student: SWD before {before:.3f}, after {after:.3f}")
  assert before > 0.3
  assert after < 0.15
  assert after < before / 2.5
