"""The jitted train step shared by every stage: `(state, batch, rng, lr) -> (state, metrics)`.

A stage supplies only `loss_fn(params, batch, rng) -> (loss, metrics)`. This
module adds gradient accumulation, mixed precision, global-norm reporting, the
NaN/inf guard (a non-finite loss or gradient drops the update and increments
`state.skipped`), the EMA update, explicit shardings and state donation.

The learning rate is a step input (the caller evaluates the schedule), not a
constant folded into the program: stages that differ only in their schedule
then share one compiled step through the persistent compilation cache.
"""
from __future__ import annotations

import hashlib
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dreamlite_jax.training import mesh as mesh_lib
from dreamlite_jax.training.state import TrainState, cast_params, update_ema

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def _microbatches(batch: Any, accum_steps: int, mesh: Mesh) -> Any:
  """`[B, ...]` -> `[A, B/A, ...]` taking every A-th row, so each device's rows stay local."""
  def split(x):
    if x.shape[0] % accum_steps:
      raise ValueError(f"batch leaf of shape {x.shape}: batch size not divisible by "
                       f"config.train.accum_steps = {accum_steps}")
    x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
    spec = P(None, mesh_lib.BATCH_AXES, *([None] * (x.ndim - 2)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
  return jax.tree.map(split, batch)


def apply_gradients(state: TrainState, loss: jax.Array, grads: Any,
                    tx: optax.GradientTransformation, lr: jax.Array, ema_decay: float
                    ) -> tuple[TrainState, jax.Array, jax.Array]:
  """One optimiser update (`lr` times `tx`'s unit-rate direction) + EMA, dropped whole
  if the loss or gradients are not finite.

  Every trainer (this step, the distillation step) updates through here, so the
  NaN/inf guard and the `skipped` count mean the same thing everywhere. `tx` is
  `state.make_optimizer`'s unit-learning-rate transformation.
  Returns (new state, global grad norm, finite flag).
  """
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def update(state: TrainState) -> TrainState:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: (lr * u).astype(u.dtype), updates)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params=update_ema(state.ema_params, params, ema_decay))

  def skip(state: TrainState) -> TrainState:
    return state.replace(step=state.step + 1, skipped=state.skipped + 1)

  # A branch, not a `where` per leaf: on XLA:CPU each of the params', moments' and
  # EMA's ~550 leaves would be one more kernel to compile (7 s of the tiny U-Net step's 35).
  new_state = jax.lax.cond(finite, update, skip, state)
  return new_state, grad_norm, finite


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, mesh: Mesh,
                    state_shardings: TrainState, *, accum_steps: int = 1,
                    compute_dtype: jnp.dtype = jnp.float32, ema_decay: float = 0.999
                    ) -> Callable:
  """Returns the jitted step `(state, batch, rng, lr) -> (state, metrics)`.

  `batch` leaves are global arrays `[B, ...]` split over ('data', 'fsdp');
  `rng` is the run's base key (raw `[2]` uint32, replicated): the step's key is
  `fold_in(rng, state.step)` and microbatch `i` uses `fold_in(key, i)`.
  `lr` is this step's learning rate (a float32 scalar, e.g.
  `state.make_schedule(train)(step)`). `state` is donated. Metrics: `loss`,
  `grad_norm`, `finite` (1/0), `skipped` (the running count), `lr`, plus
  `loss_fn`'s own metrics, all averaged over microbatches.
  """
  def grads_of(params, batch, key):
    def compute_loss(p):
      return loss_fn(cast_params(p, compute_dtype), batch, key)
    (loss, metrics), grads = jax.value_and_grad(compute_loss, has_aux=True)(params)
    return loss, metrics, grads

  def step(state: TrainState, batch: Any, rng: jax.Array, lr: jax.Array):
    key = jax.random.fold_in(rng, state.step)
    with nn.logical_axis_rules(mesh_lib.LOGICAL_AXIS_RULES):
      if accum_steps == 1:
        loss, metrics, grads = grads_of(state.params, batch, key)
      else:
        micro = _microbatches(batch, accum_steps, mesh)

        def body(carry, xs):
          index, mb = xs
          loss, metrics, grads = grads_of(state.params, mb, jax.random.fold_in(key, index))
          return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

        zero = jax.eval_shape(grads_of, state.params, jax.tree.map(lambda x: x[0], micro), key)
        zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)
        total, _ = jax.lax.scan(body, zero, (jnp.arange(accum_steps), micro))
        loss, metrics, grads = jax.tree.map(lambda x: x / accum_steps, total)

    new_state, grad_norm, finite = apply_gradients(state, loss, grads, tx, lr, ema_decay)
    out = {k: jnp.mean(v.astype(jnp.float32)) for k, v in metrics.items()}
    out.update(loss=loss.astype(jnp.float32), grad_norm=grad_norm,
               finite=finite.astype(jnp.int32), skipped=new_state.skipped,
               lr=jnp.asarray(lr, jnp.float32))
    return new_state, out

  return jax.jit(step,
                 in_shardings=(state_shardings, mesh_lib.batch_sharding(mesh),
                               mesh_lib.replicated(mesh), mesh_lib.replicated(mesh)),
                 out_shardings=(state_shardings, mesh_lib.replicated(mesh)),
                 donate_argnums=(0,))


def abstract_batch(batch: Any, mesh: Mesh) -> Any:
  """ShapeDtypeStructs with the batch sharding, for AOT lowering."""
  sharding = mesh_lib.batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), batch)


def learning_rate(schedule: optax.Schedule, step: int) -> np.ndarray:
  """The step's `lr` input: the schedule evaluated on the host, float32 scalar."""
  return np.asarray(schedule(step), np.float32)


# Executables compiled in this process, by their lowered program. A job runs its
# stages in one process and each stage builds its own `jax.jit`, so jax's own
# in-memory cache never sees the same function twice; loading from the persistent
# cache still costs ~25 s per U-Net step on CPU, a lookup here nothing.
_EXECUTABLES: dict[str, Any] = {}


def compile_step(step_fn: Callable, *args: Any) -> tuple[Any, float]:
  """AOT `lower(*args).compile()`; arguments may be arrays or ShapeDtypeStructs.

  An identical program compiled earlier in this process is reused.
  Returns (compiled executable, seconds spent lowering + compiling).
  """
  start = time.perf_counter()
  lowered = step_fn.lower(*args)
  key = hashlib.sha256(lowered.as_text().encode()).hexdigest()
  if key not in _EXECUTABLES:
    _EXECUTABLES[key] = lowered.compile()
  return _EXECUTABLES[key], time.perf_counter() - start
