"""The training loop every stage runs: `run(config, workdir, program, data_iter)`.

A `Program` is a state on the mesh and its pure jitted step `(state, batch, rng, lr)
-> (state, metrics)`: `loss_program` builds the one of a loss function (pretraining,
SFT, the VAE, RL's losses; `train(config, workdir, loss_fn, data_iter, init_params)`
is `run` of it), and distillation builds its two-model one. RL's rollouts are its
data iterator.

The loop owns everything around the step: the resume order, AOT compilation (once
per batch shape, so progressive resolutions recompile once each), the learning-rate
schedule (a step input), metrics (progress bar, `metrics.jsonl`, TensorBoard),
periodic sample grids, checkpoints every `train.checkpoint_every` steps and at the
end, and SIGTERM/SIGINT: the current step finishes, a checkpoint is written, and
`run` returns with `preempted=True`.

Data iterators yield host-local numpy batches `{name: [B_local, ...]}` and may
expose `get_state()` / `set_state(state)` (grain iterators do); with them a
resumed run continues with the very next batch.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from dreamlite_jax import config_schema
from dreamlite_jax.training import checkpoints as ckpt
from dreamlite_jax.training import mesh as mesh_lib
from dreamlite_jax.training import metrics as metrics_lib
from dreamlite_jax.training import state as state_lib
from dreamlite_jax.training import step as step_lib

log = logging.getLogger(__name__)

SampleFn = Callable[[Any, int], np.ndarray]
# `(params, step) -> {name: float}`: scores of the (EMA) params logged with the step.
EvalFn = Callable[[Any, int], dict[str, float]]


@dataclasses.dataclass
class TrainResult:
  """What `train` hands back. `history` holds this run's per-step metrics."""
  state: state_lib.TrainState
  start_step: int
  final_step: int
  source: str
  preempted: bool
  history: list[dict[str, float]]
  compile_seconds: float
  mesh: jax.sharding.Mesh


class _StopFlag:
  """Set by SIGTERM/SIGINT; a second SIGINT interrupts immediately."""

  def __init__(self):
    self.requested = False
    self._previous: dict[int, Any] = {}

  def _handle(self, signum, frame):
    self.requested = True
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT, signal.default_int_handler))

  def install(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return  # signal handlers can only be set from the main thread
    for signum in (signal.SIGTERM, signal.SIGINT):
      self._previous[signum] = signal.signal(signum, self._handle)

  def uninstall(self) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def any_process(self) -> bool:
    """True when any process was signalled (all processes must save at the same step)."""
    if jax.process_count() == 1:
      return self.requested
    flags = multihost_utils.process_allgather(np.int32(self.requested))
    return bool(np.max(flags))


def _signature(batch: Any) -> tuple:
  return tuple((jax.tree_util.keystr(p), np.shape(x), np.asarray(x).dtype.str)
               for p, x in jax.tree_util.tree_flatten_with_path(batch)[0])


def _data_state(data_iter: Any) -> Any:
  return data_iter.get_state() if hasattr(data_iter, "get_state") else None


@dataclasses.dataclass
class Program:
  """What `run` optimises: a state on the mesh and its pure step.

  The state may be any pytree dataclass exposing `step`, `rng`, `params` and
  `ema_params` (a `TrainState`; distillation's two-model `DistillState` exposes its
  student's).

  Attributes:
    step: jitted `(state, batch, rng, lr, *extra_args) -> (state, metrics)`, state
      donated; metrics hold at least `loss` and `skipped`.
    abstract_state: the state's ShapeDtypeStructs with shardings (the restore target).
    create: `() -> state`, the fresh state of a run with no checkpoint.
    start_from: `(params, ema_params) -> state` for `config.init_from` (None: the
      program starts only fresh or from its own checkpoints).
    mesh: the mesh the state and batches live on.
    extra_args: arrays passed after `lr` on every call (distillation's frozen teacher).
    param_count: parameters of the trained model, for the start line.
  """
  step: Callable
  abstract_state: Any
  create: Callable[[], Any]
  start_from: Callable[[Any, Any], Any] | None
  mesh: jax.sharding.Mesh
  extra_args: tuple = ()
  param_count: int = 0


def loss_program(config: ml_collections.ConfigDict, loss_fn: step_lib.LossFn,
                 init_params: Callable[[jax.Array], Any],
                 devices: list[jax.Device] | None = None) -> Program:
  """The program of a loss function: a `TrainState` (params, AdamW, EMA) born sharded
  by the params' logical axes, and the shared step (`step.make_train_step`)."""
  train_cfg = config.train
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  tx = state_lib.make_optimizer(train_cfg)
  abstract_state, shardings = state_lib.state_shardings(init_params, tx, mesh)
  mesh_lib.assert_params_sufficiently_sharded(abstract_state.params, shardings.params, mesh,
                                              config.mesh.max_replicated_fraction)
  step_fn = step_lib.make_train_step(
      loss_fn, tx, mesh, shardings, accum_steps=train_cfg.accum_steps,
      compute_dtype=state_lib.DTYPES[train_cfg.compute_dtype], ema_decay=train_cfg.ema_decay)
  return Program(
      step=step_fn, abstract_state=abstract_state,
      create=lambda: state_lib.create_state(init_params, tx, mesh, config.seed),
      start_from=lambda p, e: state_lib.state_from_params(p, e, tx, shardings, config.seed),
      mesh=mesh, param_count=state_lib.param_count(abstract_state.params))


def train(config: ml_collections.ConfigDict, workdir: str, loss_fn: step_lib.LossFn,
          data_iter: Iterator[Any], init_params: Callable[[jax.Array], Any], *,
          sample_fn: SampleFn | None = None, eval_fn: EvalFn | None = None,
          eval_every: int = 0, devices: list[jax.Device] | None = None) -> TrainResult:
  """Trains `loss_fn` for `config.train.steps` steps in `workdir` (resuming whatever is
  there): `run` of `loss_program`.

  Args:
    config: the stage config (`train`, `mesh`, `init_from`, `seed` fields).
    workdir: the run directory (layout in README "Training and the workdir").
    loss_fn: `(params, batch, rng) -> (scalar loss, {name: scalar})`.
    data_iter: yields host-local batches `{name: [B / process_count, ...]}`.
    init_params: `rng -> params` with logical-axis boxes (`model.init(...)['params']`).
    sample_fn, eval_fn, eval_every: see `run`.
    devices: the mesh's devices (default: all).
  """
  config_schema.validate_trainer(config)
  return run(config, workdir, loss_program(config, loss_fn, init_params, devices), data_iter,
             sample_fn=sample_fn, eval_fn=eval_fn, eval_every=eval_every)


def _sampled_params(state: Any, train_cfg: ml_collections.ConfigDict) -> Any:
  return state.ema_params if train_cfg.sample_with_ema else state.params


def _data_hook(data_iter: Any, name: str, default: Any) -> Any:
  hook = getattr(data_iter, name, None)
  return hook() if hook is not None else default


def run(config: ml_collections.ConfigDict, workdir: str, program: Program,
        data_iter: Iterator[Any], *, sample_fn: SampleFn | None = None,
        eval_fn: EvalFn | None = None, eval_every: int = 0) -> TrainResult:
  """The training loop: `program` for `config.train.steps` steps in `workdir`.

  Online data (RL rollouts) is sampled from the policy being trained, so the loop
  talks to iterators that define any of:
    `set_policy(state)`: called with the current state before every draw;
    `at_boundary()`: False while the batches of a draw are only partly consumed;
      checkpoints (periodic, final, preemption) wait for a boundary, so a resumed
      run starts a fresh draw;
    `metrics()`: host scalars of the latest draw (e.g. rewards), logged with the step.

  Args:
    config: the stage config (`train`, `init_from`, `seed` fields).
    workdir: the run directory.
    program: the state and step (`loss_program`, distillation's program).
    data_iter: yields host-local batches; may expose `get_state()` / `set_state()`.
    sample_fn: `(params, step) -> images [N, H, W, 3]` (uint8 or [-1, 1] floats),
      called every `train.sample_every` steps on the (EMA) params; written to
      `workdir/samples/step_XXXXXXXX.png`.
    eval_fn: `(params, step) -> {name: float}`, called every `eval_every` steps before
      the last on the (EMA) params; the scores are logged with that step's metrics
      (`metrics.jsonl`, TensorBoard), which is where the report's learning curve reads them.
  """
  config_schema.validate_trainer(config)
  train_cfg = config.train
  is_main = jax.process_index() == 0
  mesh = program.mesh
  schedule = state_lib.make_schedule(train_cfg)
  manager = ckpt.make_manager(ckpt.checkpoint_dir(workdir), keep=train_cfg.keep_checkpoints,
                              async_save=train_cfg.async_checkpoints)
  state, data_state, source = ckpt.restore_or_init(
      config, manager, program.abstract_state, program.create, program.start_from)
  if data_state is not None:
    if not hasattr(data_iter, "set_state"):
      raise TypeError("the checkpoint holds a data iterator state but data_iter has no set_state()")
    data_iter.set_state(data_state)
  elif source.startswith("resumed") and not hasattr(data_iter, "set_state"):
    log.warning("data_iter has no get_state/set_state: the resumed run restarts the data stream")

  rng = jax.make_array_from_process_local_data(mesh_lib.replicated(mesh),
                                               mesh_lib.host_value(state.rng))
  start_step = int(mesh_lib.host_value(state.step))
  total = train_cfg.steps
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
  bar = tqdm(total=total, initial=start_step, desc=os.path.basename(os.path.abspath(workdir)),
             disable=not (is_main and train_cfg.progress_bar), dynamic_ncols=True)
  if is_main:
    bar.write(f"[train] {source}; {program.param_count:,} params; mesh {dict(mesh.shape)}")
  compiled: dict[tuple, Any] = {}
  compile_seconds = 0.0
  history: list[dict[str, float]] = []
  pending: list[tuple[int, dict[str, Any]]] = []
  stop = _StopFlag()
  stop.install()
  preempted = False
  step = start_step

  def flush_metrics():
    for at, values in pending:
      scalars = {k: float(mesh_lib.host_value(v)) if isinstance(v, jax.Array) else float(v)
                 for k, v in values.items()}
      history.append({"step": at, **scalars})
      writer.write(at, scalars)
    if pending and is_main:
      bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", skipped=int(history[-1]["skipped"]))
    pending.clear()
    writer.flush()

  try:
    while step < total:
      if hasattr(data_iter, "set_policy"):
        data_iter.set_policy(state)
      try:
        host_batch = next(data_iter)
      except StopIteration:
        raise RuntimeError(f"data_iter ran out at step {step} of config.train.steps = {total}")
      batch = mesh_lib.shard_batch(host_batch, mesh)
      signature = _signature(host_batch)
      lr = step_lib.learning_rate(schedule, step)
      if signature not in compiled:
        compiled[signature], seconds = step_lib.compile_step(program.step, state, batch, rng, lr,
                                                             *program.extra_args)
        mesh_lib.barrier("step compiled")
        compile_seconds += seconds
        writer.write(step, {"compile_seconds": seconds})
        if is_main:
          bar.write(f"[train] compiled the step for batch {[s[1] for s in signature]} "
                    f"in {seconds:.1f}s")
      state, step_metrics = mesh_lib.wait_on_cpu_mesh(
          compiled[signature](state, batch, rng, lr, *program.extra_args), mesh)
      step += 1
      pending.append((step, {**step_metrics, **_data_hook(data_iter, "metrics", {})}))
      if eval_fn is not None and eval_every and step % eval_every == 0 and step < total:
        pending[-1][1].update(eval_fn(_sampled_params(state, train_cfg), step))
      if step % train_cfg.log_every == 0 or step == total:
        flush_metrics()
      bar.update(1)
      if sample_fn is not None and train_cfg.sample_every and step % train_cfg.sample_every == 0:
        images = np.asarray(sample_fn(_sampled_params(state, train_cfg), step))
        if is_main:
          metrics_lib.write_grid(os.path.join(workdir, "samples", f"step_{step:08d}.png"), images)
      if not _data_hook(data_iter, "at_boundary", True):
        continue
      preempted = stop.any_process()
      if step % train_cfg.checkpoint_every == 0 or step == total or preempted:
        ckpt.save(manager, state, _data_state(data_iter), config)
      if preempted:
        if is_main:
          bar.write(f"[train] stop requested: checkpoint at step {step} written, exiting")
        break
    flush_metrics()
  finally:
    stop.uninstall()
    manager.wait_until_finished()
    manager.close()
    writer.close()
    bar.close()
  return TrainResult(state=state, start_step=start_step, final_step=step, source=source,
                     preempted=preempted, history=history, compile_seconds=compile_seconds,
                     mesh=mesh)
