"""The training loop every stage runs: `train(config, workdir, loss_fn, data_iter, init_params)`.

The loop owns everything around the pure step: the mesh, the resume order,
AOT compilation (once per batch shape, so progressive resolutions recompile
once each), metrics (progress bar, `metrics.jsonl`, TensorBoard), periodic
sample grids, checkpoints every `train.checkpoint_every` steps and at the end,
and SIGTERM/SIGINT: the current step finishes, a checkpoint is written, and
`train` returns with `preempted=True`.

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
import time
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


def train(config: ml_collections.ConfigDict, workdir: str, loss_fn: step_lib.LossFn,
          data_iter: Iterator[Any], init_params: Callable[[jax.Array], Any], *,
          sample_fn: SampleFn | None = None,
          devices: list[jax.Device] | None = None) -> TrainResult:
  """Trains `config.train.steps` steps in `workdir` (resuming whatever is there).

  Args:
    config: the stage config (`train`, `mesh`, `init_from`, `seed` fields).
    workdir: the run directory (layout in README "Training and the workdir").
    loss_fn: `(params, batch, rng) -> (scalar loss, {name: scalar})`.
    data_iter: yields host-local batches `{name: [B / process_count, ...]}`.
    init_params: `rng -> params` with logical-axis boxes (`model.init(...)['params']`).
    sample_fn: `(params, step) -> images [N, H, W, 3]` (uint8 or [-1, 1] floats),
      called every `train.sample_every` steps on the (EMA) params; written to
      `workdir/samples/step_XXXXXXXX.png`.
    devices: the mesh's devices (default: all).
  """
  config_schema.validate_trainer(config)
  train_cfg = config.train
  is_main = jax.process_index() == 0
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  tx = state_lib.make_optimizer(train_cfg)
  schedule = state_lib.make_schedule(train_cfg)
  abstract_state, shardings = state_lib.state_shardings(init_params, tx, mesh)
  mesh_lib.assert_params_sufficiently_sharded(abstract_state.params, shardings.params, mesh,
                                              config.mesh.max_replicated_fraction)
  manager = ckpt.make_manager(ckpt.checkpoint_dir(workdir), keep=train_cfg.keep_checkpoints,
                              async_save=train_cfg.async_checkpoints)
  state, data_state, source = ckpt.restore_or_init(
      config, manager, abstract_state,
      lambda: state_lib.create_state(init_params, tx, mesh, config.seed),
      lambda p, e: state_lib.state_from_params(p, e, tx, shardings, config.seed))
  if data_state is not None:
    if not hasattr(data_iter, "set_state"):
      raise TypeError("the checkpoint holds a data iterator state but data_iter has no set_state()")
    data_iter.set_state(data_state)
  elif source.startswith("resumed") and not hasattr(data_iter, "set_state"):
    log.warning("data_iter has no get_state/set_state: the resumed run restarts the data stream")

  step_fn = step_lib.make_train_step(
      loss_fn, tx, mesh, shardings, accum_steps=train_cfg.accum_steps,
      compute_dtype=state_lib.DTYPES[train_cfg.compute_dtype], ema_decay=train_cfg.ema_decay)
  rng = jax.make_array_from_process_local_data(mesh_lib.replicated(mesh), mesh_lib.host_value(state.rng))
  start_step = int(mesh_lib.host_value(state.step))
  total = train_cfg.steps
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
  bar = tqdm(total=total, initial=start_step, desc=os.path.basename(os.path.abspath(workdir)),
             disable=not (is_main and train_cfg.progress_bar), dynamic_ncols=True)
  if is_main:
    bar.write(f"[train] {source}; {state_lib.param_count(abstract_state.params):,} params; "
              f"mesh {dict(mesh.shape)}")
  compiled: dict[tuple, Any] = {}
  compile_seconds = 0.0
  history: list[dict[str, float]] = []
  pending: list[tuple[int, dict[str, jax.Array]]] = []
  stop = _StopFlag()
  stop.install()
  preempted = False
  step = start_step

  def flush_metrics():
    for at, values in pending:
      scalars = {k: float(mesh_lib.host_value(v)) for k, v in values.items()}
      history.append({"step": at, **scalars})
      writer.write(at, scalars)
    if pending and is_main:
      bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", skipped=int(history[-1]["skipped"]))
    pending.clear()
    writer.flush()

  try:
    while step < total:
      try:
        host_batch = next(data_iter)
      except StopIteration:
        raise RuntimeError(f"data_iter ran out at step {step} of config.train.steps = {total}")
      batch = mesh_lib.shard_batch(host_batch, mesh)
      signature = _signature(host_batch)
      lr = step_lib.learning_rate(schedule, step)
      if signature not in compiled:
        compiled[signature], seconds = step_lib.compile_step(step_fn, state, batch, rng, lr)
        compile_seconds += seconds
        writer.write(step, {"compile_seconds": seconds})
        if is_main:
          bar.write(f"[train] compiled the step for batch {[s[1] for s in signature]} "
                    f"in {seconds:.1f}s")
      state, step_metrics = mesh_lib.wait_on_cpu_mesh(
          compiled[signature](state, batch, rng, lr), mesh)
      step += 1
      pending.append((step, step_metrics))
      if step % train_cfg.log_every == 0 or step == total:
        flush_metrics()
      bar.update(1)
      if sample_fn is not None and train_cfg.sample_every and step % train_cfg.sample_every == 0:
        params = state.ema_params if train_cfg.sample_with_ema else state.params
        images = np.asarray(sample_fn(params, step))
        if is_main:
          metrics_lib.write_grid(os.path.join(workdir, "samples", f"step_{step:08d}.png"), images)
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
