"""The train state (params, optimiser, EMA, step, RNG) and how it is born sharded.

`create_state` never materialises a full copy of the model on one device:
`jax.eval_shape` gives the abstract state with its logical annotations, those
become `NamedSharding`s, and the real init runs under `jax.jit(out_shardings=...)`.
Master params stay float32; `config.train.compute_dtype` is what the step casts
them to before the forward pass (bf16 mixed precision).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct
from jax.sharding import Mesh

from dreamlite_jax.models.layers import DTYPES  # noqa: F401  (the trainer's compute dtypes)
from dreamlite_jax.training import mesh as mesh_lib


@struct.dataclass
class TrainState:
  """Everything a step changes and a checkpoint must hold.

  `rng` is the run's base key (raw uint32 `[2]`): the step derives its key as
  `fold_in(rng, step)`, so resuming reproduces the same noise exactly.
  `skipped` counts steps whose update was dropped by the NaN/inf guard.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array
  skipped: jax.Array


def make_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to `train.lr`, then `cosine` decay to `lr * end_lr_ratio` or `constant`."""
  warmup = max(int(train.warmup_steps), 0)
  if train.schedule == "constant":
    decay = optax.constant_schedule(train.lr)
  elif train.schedule == "cosine":
    decay = optax.cosine_decay_schedule(train.lr, max(train.steps - warmup, 1),
                                        alpha=train.end_lr_ratio)
  else:
    raise ValueError(f"config.train.schedule = {train.schedule!r}: expected 'cosine' or 'constant'")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, train.lr, warmup), decay], [warmup])


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Global-norm clipping (`train.grad_clip`, 0 = off) followed by unit-rate AdamW.

  The learning rate is not inside: `step.apply_gradients` multiplies the update
  by the step's `lr` (from `make_schedule`), which equals `optax.adamw(schedule)`
  exactly (its last stage is the same scaling) and keeps the schedule out of the
  compiled program.
  """
  adamw = optax.adamw(1.0, b1=train.b1, b2=train.b2, eps=train.eps,
                      weight_decay=train.weight_decay)
  if train.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(train.grad_clip), adamw)
  return adamw


def _init_and_train_keys(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(key for the model initialisers, the run's base training key) from one key."""
  init_rng, train_rng = jax.random.split(rng)
  return init_rng, train_rng


def _boxed_state(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                 rng: jax.Array) -> TrainState:
  """A fresh state whose leaves are still `LogicallyPartitioned` boxes.

  The optimiser moments and EMA are built by tree-maps over the boxed params,
  so they inherit the params' logical axes.
  """
  init_rng, train_rng = _init_and_train_keys(rng)
  params = init_params(init_rng)
  params = jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating)
                        else x, params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=jax.tree.map(jnp.copy, params), rng=train_rng,
                    skipped=jnp.zeros((), jnp.int32))


def state_shardings(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                    mesh: Mesh) -> tuple[TrainState, TrainState]:
  """(abstract unboxed state, NamedSharding tree) without allocating anything."""
  abstract_boxed = jax.eval_shape(lambda r: _boxed_state(init_params, tx, r), jax.random.PRNGKey(0))
  shardings = mesh_lib.logical_shardings(abstract_boxed, mesh)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.unbox(abstract_boxed), shardings)
  return abstract, shardings


def create_state(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                 mesh: Mesh, seed: int) -> TrainState:
  """A new TrainState, born sharded over `mesh`.

  `init_params(rng)` returns the params tree (flax `model.init(...)['params']`,
  boxes and all). Every float param is stored float32.
  """
  _, shardings = state_shardings(init_params, tx, mesh)
  init = jax.jit(lambda r: nn.unbox(_boxed_state(init_params, tx, r)), out_shardings=shardings)
  return init(jax.random.PRNGKey(seed))


def state_from_params(params: Any, ema_params: Any, tx: optax.GradientTransformation,
                      shardings: TrainState, seed: int) -> TrainState:
  """A fresh state (step 0, new optimiser) around given params, e.g. a previous stage's.

  Equal to `create_state` with its params replaced, without compiling and
  running the model's initialisers (half a minute for the tiny U-Net on CPU).
  `params` and `ema_params` must be distinct buffers (the step donates both).
  """
  def build(params, ema_params):
    _, train_rng = _init_and_train_keys(jax.random.PRNGKey(seed))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=ema_params, rng=train_rng, skipped=jnp.zeros((), jnp.int32))
  return jax.jit(build, out_shardings=shardings)(params, ema_params)


def update_ema(ema: Any, params: Any, decay: float) -> Any:
  """`ema <- decay * ema + (1 - decay) * params` (decay 0 tracks params exactly)."""
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params)


def cast_params(params: Any, dtype: jnp.dtype) -> Any:
  """Float leaves -> `dtype` (the compute copy for mixed precision); others untouched."""
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                      params)


def param_count(params: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
