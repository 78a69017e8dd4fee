"""Orbax checkpoints of a run: the train state, each host's data iterator, the config.

A checkpoint step directory holds three named items:
  `state/`  the TrainState (sharded arrays; every host writes its shards),
  `data/`   one JSON file per process with that host's iterator state,
  `config/` the run's config as JSON (for humans and converters).
Saves are asynchronous and atomic (orbax writes to a temporary directory and
renames it when complete), and only the newest `keep` steps are kept.

`restore_or_init` is the one place that writes the resume order:
the workdir's own latest checkpoint, else the stage's `init_from` (params and
EMA of a previous stage, or of any model `init_from.model` names), else a fresh state.

A model to start from or read params of (`init_from.workdir`, `init_from.model`,
`load_params`) is a training run (a workdir, or its `checkpoints/`; a job's stage
directory is one), or a diffusers-format DreamLite folder (`unet/` with
config.json + safetensors, e.g. the released checkpoint) or its `unet/` folder alone,
whose one set of weights is both the params and the EMA.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from dreamlite_jax.config import ConfigError
from dreamlite_jax.models import weights
from dreamlite_jax.training import mesh as mesh_lib
from dreamlite_jax.training.state import TrainState

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"


class DataStateHandler(ocp.CheckpointHandler):
  """Writes `process_{i}-of-{n}.json` per host: data iterators differ per host."""

  def save(self, directory: epath.Path, args: "DataStateSave"):
    filename = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    value = args.state
    if isinstance(value, bytes):
      record = {"kind": "bytes", "value": base64.b64encode(value).decode("ascii")}
    else:
      record = {"kind": "json", "value": value}
    filename.write_text(json.dumps(record))

  def restore(self, directory: epath.Path, args: "DataStateRestore | None" = None) -> Any:
    filename = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if not filename.exists():
      raise FileNotFoundError(
          f"{filename}: no data iterator state for this process (was the checkpoint written "
          f"with a different number of processes?)")
    record = json.loads(filename.read_text())
    if record["kind"] == "bytes":
      return base64.b64decode(record["value"])
    return record["value"]

  def metadata(self, directory: epath.Path) -> None:
    return None

  def finalize(self, directory: epath.Path) -> None:
    pass

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)


def make_manager(directory: str, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  """A CheckpointManager over `directory` with items state / data / config."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                         create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=("state", "data", "config"))


def save(manager: ocp.CheckpointManager, state: TrainState, data_state: Any,
         config: ml_collections.ConfigDict | None, *, force: bool = True) -> bool:
  """Starts saving `state` at `state.step` (async); `data_state` is captured now."""
  step = int(jax.device_get(state.step))
  items = {"state": ocp.args.StandardSave(state),
           "data": DataStateSave(data_state)}
  config_json = json.loads(config.to_json_best_effort()) if config is not None else {}
  items["config"] = ocp.args.JsonSave(config_json)
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore(manager: ocp.CheckpointManager, abstract_state: TrainState,
            step: int | None = None) -> tuple[TrainState, Any]:
  """Restores (state, data_state) at `step` (default latest) into `abstract_state`'s shardings."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {manager.directory}")
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=DataStateRestore()))
  return restored["state"], restored["data"]


def resolve_checkpoints(path: str) -> str:
  """Accepts a workdir or its `checkpoints/` directory."""
  path = os.path.abspath(path)
  nested = os.path.join(path, CHECKPOINT_SUBDIR)
  return nested if os.path.isdir(nested) else path


class _QuietPartialRestore(logging.Filter):
  """Drops orbax's warnings about what a read-only, partial restore deliberately skips.

  Reading a parent's params warns that the manager is read-only and that the
  `config` and `data` items "could not be restored"; both are expected here,
  and a newcomer's console should not read as if something failed.
  """
  EXPECTED = ("read_only=True", "Given directory is read only",
              "was found in the checkpoint, but could not be restored")

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not any(text in message for text in self.EXPECTED)


def _restore_params_and_ema(directory: str, step: int, abstract: dict[str, Any] | None) -> dict:
  """Reads only `params` and `ema_params` of the state item (partial restore)."""
  quiet = _QuietPartialRestore()
  absl_logger = logging.getLogger("absl")
  absl_logger.addFilter(quiet)
  try:
    return _read_params_and_ema(directory, step, abstract)
  finally:
    absl_logger.removeFilter(quiet)


def _read_params_and_ema(directory: str, step: int, abstract: dict[str, Any] | None) -> dict:
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                             item_handlers={"state": ocp.PyTreeCheckpointHandler()}) as manager:
    if step < 0:
      step = manager.latest_step()
    if step is None or step not in manager.all_steps():
      raise FileNotFoundError(f"{directory}: no checkpoint step {step} "
                              f"(have {sorted(manager.all_steps())})")
    if abstract is None:
      metadata = manager.item_metadata(step)["state"]
      tree = metadata.tree if hasattr(metadata, "tree") else metadata
      abstract = {k: jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                         sharding=jax.sharding.SingleDeviceSharding(
                                             jax.local_devices()[0])), tree[k])
                  for k in ("params", "ema_params") if k in tree}
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=abstract, restore_args=restore_args, partial_restore=True)))
    return restored["state"]


def load_params(checkpoint_dir: str, step: int = -1, ema: bool = False) -> Any:
  """The params pytree (or the EMA params) of a model, as host-local jax arrays.

  `checkpoint_dir` is a workdir or its `checkpoints/` folder (`step` -1 = latest), or a
  diffusers DreamLite / U-Net folder (its weights; they serve as params and EMA).
  For pipelines and converters; no optimiser state is read.
  """
  unet_dir = weights.find_unet_dir(checkpoint_dir)
  if unet_dir is not None:
    return weights.load_unet_dir(unet_dir)[1]
  directory = resolve_checkpoints(checkpoint_dir)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory not found: {checkpoint_dir}")
  tree = _restore_params_and_ema(directory, step, None)
  key = "ema_params" if ema else "params"
  if key not in tree:
    raise KeyError(f"{directory}: checkpoint has no {key!r}")
  return tree[key]


def init_source(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """(field, path) of the model a stage starts from: `init_from.workdir` (the parent stage)
  or `init_from.model` (any model); ('', '') for none. Naming both is an error: a state
  has one origin."""
  init_from = config.init_from
  if init_from.workdir and init_from.model:
    raise ConfigError(f"config.init_from.workdir = {init_from.workdir!r} (the parent stage) and "
                      f"config.init_from.model = {init_from.model!r} both name the model to "
                      f"start from; keep one")
  if init_from.workdir:
    return "config.init_from.workdir", init_from.workdir
  return ("config.init_from.model", init_from.model) if init_from.model else ("", "")


def _start_params(field: str, path: str, step: int, abstract_state: TrainState
                  ) -> tuple[Any, Any, str]:
  """(params, ema_params, description) of the model at `path` shaped like the state's."""
  unet_dir = weights.find_unet_dir(path)
  if unet_dir is not None:
    try:
      _, params = weights.load_unet_dir(unet_dir, log=log.info, abstract_params=abstract_state.params)
    except weights.WeightsMismatchError as e:
      raise ConfigError(f"{field} = {path!r}: its U-Net does not fit this stage's model "
                        f"(config.model.unet):\n{e}") from e
    # The folder holds one set of weights: the EMA starts from them as well.
    return params, jax.tree.map(jnp.copy, params), f"{unet_dir} (diffusers weights as params + EMA)"
  directory = resolve_checkpoints(path)
  if not os.path.isdir(directory):
    raise ConfigError(f"{field} = {path!r}: neither a checkpoint directory nor a diffusers "
                      f"DreamLite folder")
  abstract = {"params": abstract_state.params, "ema_params": abstract_state.ema_params}
  parent = _restore_params_and_ema(directory, step, abstract)
  return parent["params"], parent["ema_params"], f"{directory} (params + EMA)"


def restore_or_init(config: ml_collections.ConfigDict, manager: ocp.CheckpointManager,
                    abstract_state: TrainState, create: Callable[[], TrainState],
                    start_from: Callable[[Any, Any], TrainState] | None,
                    ) -> tuple[TrainState, Any, str]:
  """The resume order, written once. Returns (state, data_state or None, source).

  1. the workdir's latest checkpoint (exact resume: state + data iterator);
  2. `config.init_from.workdir` (a previous stage) or `config.init_from.model` (a
     training run, a job's stage directory, or a diffusers DreamLite folder such as the
     release; `init_source`): its params and EMA go into a fresh state (new optimiser,
     step 0); `init_from.ema_as_params` starts the params from the EMA, and
     `init_from.step` picks a run's step;
  3. a fresh state from `create()`.
  `start_from(params, ema_params)` builds the fresh state of case 2.
  """
  if manager.latest_step() is not None:
    state, data_state = restore(manager, abstract_state)
    return state, data_state, f"resumed from {manager.directory} step {int(state.step)}"
  field, path = init_source(config)
  if path:
    if start_from is None:
      raise ConfigError(f"{field} = {path!r}: this stage starts fresh or from "
                        f"its own checkpoints only")
    init_from = config.init_from
    params, ema_params, what = _start_params(field, path, init_from.step, abstract_state)
    start = ema_params if init_from.ema_as_params else params
    # Distinct buffers: the step donates params and EMA separately.
    state = start_from(jax.tree.map(jnp.copy, start), ema_params)
    return state, None, f"initialised from {what}"
  return create(), None, "fresh init"


def as_numpy(tree: Any) -> Any:
  """Arrays -> numpy, gathered from every process when sharded over several."""
  return mesh_lib.to_host(tree)
