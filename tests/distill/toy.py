"""A 2-D world for distillation tests: an exact-score teacher and small MLP velocity models.

Points in R^2 are stored as latents `[B, 1, 1, 2]`, so they pack into the same
`[target | condition]` canvas `[B, 1, 2, 2]` as images and go through the very
same distillation code as the U-Net. The teacher is the analytic velocity
`E[e - x0 | x_t]` of a Gaussian mixture under `x_t = (1 - t) x0 + t e`; text is
a class label (one-hot) selecting a subset of the mixture, the null text the
whole mixture, so classifier-free guidance has two genuinely different branches.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dreamlite_jax.diffusion import packing

MEANS = np.array([[-1.5, -1.5], [-1.5, 1.5], [1.5, -1.5], [1.5, 1.5]], np.float32)
STD = 0.2
# Class 0 = left modes, class 1 = right modes; the one-hot label is the "text".
CLASS_OF_MODE = np.array([0, 0, 1, 1])
NUM_CLASSES = 2


def mixture_velocity(x: jax.Array, t: jax.Array, label: jax.Array) -> jax.Array:
  """Exact velocity of the (label-restricted) mixture. x [B, 2], t [B], label [B, K] (zeros =
  all modes). Returns [B, 2]."""
  a = (1.0 - t)[:, None, None]
  tt = t[:, None, None]
  mu = jnp.asarray(MEANS)[None]  # [1, M, 2]
  var = a**2 * STD**2 + tt**2  # [B, 1, 1]
  xm = x[:, None, :] - a * mu  # [B, M, 2]
  logw = -0.5 * jnp.sum(xm**2, -1) / var[..., 0] - jnp.log(var[..., 0])  # [B, M]
  member = jnp.asarray(np.eye(NUM_CLASSES, dtype=np.float32)[CLASS_OF_MODE])  # [M, K]
  allowed = jnp.where(jnp.sum(label, -1, keepdims=True) > 0, label @ member.T, 1.0)  # [B, M]
  logw = jnp.where(allowed > 0, logw, -jnp.inf)
  w = jax.nn.softmax(logw, axis=-1)[..., None]
  e_mean = tt / var * xm
  x0_mean = mu + a * STD**2 / var * xm
  return jnp.sum(w * (e_mean - x0_mean), axis=1)


def teacher_predict(params, canvas, timestep, cond):
  """Exact-score teacher in the packed-canvas interface (params unused)."""
  del params
  x = canvas[:, 0, 0, :]
  v = mixture_velocity(x, timestep / 1000.0, cond["text"][:, 0, :])
  return jnp.zeros_like(canvas).at[:, 0, 0, :].set(v)


def sample_mixture(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
  """Exact samples [B, 2] for class labels [B] (-1 = any mode)."""
  modes = np.empty(len(labels), np.int64)
  for i, label in enumerate(labels):
    allowed = np.arange(len(MEANS)) if label < 0 else np.flatnonzero(CLASS_OF_MODE == label)
    modes[i] = rng.choice(allowed)
  return MEANS[modes] + STD * rng.standard_normal((len(labels), 2)).astype(np.float32)


class VelocityMLP(nn.Module):
  """MLP velocity on the canvas `[B, 1, 2, 2]` (reads the target cell, label and timestep).

  `features=True` returns (velocity, last hidden layer [B, H]) for the GAN head.
  """
  hidden: int = 128

  @nn.compact
  def __call__(self, canvas, timestep, text, features: bool = False):
    x = canvas[:, 0, 0, :]
    t = timestep[:, None] / 1000.0
    freqs = jnp.arange(1, 9, dtype=jnp.float32) * jnp.pi
    temb = jnp.concatenate([t, jnp.sin(freqs * t), jnp.cos(freqs * t)], -1)
    h = jnp.concatenate([x, temb, text[:, 0, :]], -1)
    for i in range(3):
      h = nn.silu(nn.Dense(self.hidden, name=f"dense_{i}")(h))
    v = nn.Dense(2, name="out")(h)
    out = jnp.zeros_like(canvas).at[:, 0, 0, :].set(v)
    return (out, h) if features else out


MLP = VelocityMLP()


def mlp_predict(params, canvas, timestep, cond):
  return MLP.apply({"params": params}, canvas, timestep, cond["text"])


def mlp_features(params, canvas, timestep, cond):
  return MLP.apply({"params": params}, canvas, timestep, cond["text"], features=True)


def init_mlp(rng: jax.Array):
  canvas = jnp.zeros((1, 1, 2, 2))
  return MLP.init(rng, canvas, jnp.zeros((1,)), jnp.zeros((1, 1, NUM_CLASSES)))["params"]


def one_hot_text(labels: np.ndarray) -> np.ndarray:
  """Labels [B] (-1 = null) -> text [B, 1, K]."""
  text = np.zeros((len(labels), 1, NUM_CLASSES), np.float32)
  for i, label in enumerate(labels):
    if label >= 0:
      text[i, 0, label] = 1.0
  return text


def make_batch(rng: np.random.Generator, batch_size: int) -> dict:
  """A distillation batch of 2-D points with random class labels."""
  labels = rng.integers(0, NUM_CLASSES, batch_size)
  return {
      "latents": sample_mixture(rng, labels).reshape(batch_size, 1, 1, 2),
      "text": one_hot_text(labels),
      "text_mask": np.ones((batch_size, 1), np.float32),
      "time_ids": np.zeros((batch_size, 2), np.float32),
      "null_text": np.zeros((batch_size, 1, NUM_CLASSES), np.float32),
      "null_text_mask": np.ones((batch_size, 1), np.float32),
  }


def fit_mlp_to_teacher(rng: jax.Array, steps: int = 600, batch_size: int = 256):
  """An MLP regressed onto the exact conditional velocity field: the "teacher checkpoint"
  the student and fake score are initialised from."""
  params = init_mlp(rng)
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, key):
    k_lab, k_x0, k_e, k_t = jax.random.split(key, 4)
    labels = jax.random.randint(k_lab, (batch_size,), -1, NUM_CLASSES)
    text = jax.nn.one_hot(labels, NUM_CLASSES)[:, None, :]  # -1 -> zeros (null)
    x_t = jax.random.normal(k_e, (batch_size, 2)) * 2.0
    t = jax.random.uniform(k_t, (batch_size,))
    target = mixture_velocity(x_t, t, text[:, 0])
    canvas = jnp.zeros((batch_size, 1, 2, 2)).at[:, 0, 0, :].set(x_t)

    def loss_fn(p):
      v = mlp_predict(p, canvas, t * 1000.0, {"text": text})[:, 0, 0, :]
      return jnp.mean((v - target)**2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  for i in range(steps):
    params, opt, loss = step(params, opt, jax.random.fold_in(rng, i))
  return params, float(loss)


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, num_projections: int = 64,
                       seed: int = 0) -> float:
  """Sliced W1 distance between equal-size point sets a, b [N, 2]."""
  if a.shape != b.shape:
    raise ValueError(f"point sets differ in shape: {a.shape} vs {b.shape}")
  rng = np.random.default_rng(seed)
  dirs = rng.standard_normal((num_projections, a.shape[1]))
  dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
  pa = np.sort(a @ dirs.T, axis=0)
  pb = np.sort(b @ dirs.T, axis=0)
  return float(np.mean(np.abs(pa - pb)))


def canvas_points(latents: jax.Array) -> np.ndarray:
  """Latents [B, 1, 1, 2] -> points [B, 2]."""
  packing.check_latents("latents", latents)
  return np.asarray(latents).reshape(latents.shape[0], -1)
