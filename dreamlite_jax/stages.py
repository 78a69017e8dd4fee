"""The job runner: the stages a config lists, in order, each from its parent's checkpoint.

A *job* is one workdir with one sub-directory per stage (`<workdir>/<stage>/`).
`run_job(config, workdir)` walks `config.stages` (a comma-separated string, or
the `--stages a,b` selection), skips every stage whose `DONE.json` exists (a
finished stage), runs the others through the registry below, writes their
`DONE.json` last, and finally renders `report.md` + `scores.json`. Re-running
a job resumes it: finished stages are skipped, an interrupted one resumes from
its own orbax checkpoints (the trainer's resume order).

A finished stage is reused only if it still belongs to this run: its `DONE.json`
records the config it ran with (`stage_inputs`: its own section, `model`, `data`,
`seed`) and the `run_id`s of the records it was built on (its parent and the job's
VAE: `upstream_stages`). A changed field, or an upstream stage that was re-run (or is
about to be), makes the job stop before running anything and name the stage
directories to delete; it never mixes checkpoints of two configs silently. The same
holds for an interrupted stage: its `STARTED.json`, written before it runs, records
the same two things, and its checkpoints are resumed only if they still match.

## The stage-runner contract (RL, distillation and every other stage follow it)

    def run_stage(ctx: StageContext) -> dict

* `ctx.config`        the full job ConfigDict (read your section as `ctx.section`,
                      i.e. `ctx.config[ctx.name]`; shared parts are `ctx.config.model`,
                      `.mesh`, `.seed`, `.data`, `.eval`).
* `ctx.name`          the stage name (also its config section and sub-directory).
* `ctx.workdir`       this stage's directory (create checkpoints, metrics, PNGs here).
* `ctx.parent_workdir` the parent stage's directory (`config.<stage>.parent`), whose
                      `checkpoints/` hold the U-Net to start from, or None.
* `ctx.parent_results` the parent's `DONE.json` results (dict), or {}.
* `ctx.models`        `SharedModels`, built lazily once per job:
    `.unet_config` (UNetConfig), `.unet` (DreamLiteUNet module),
    `.vae` (TinyAutoencoder module), `.vae_params` (from the `vae` stage),
    `.text_encoder` (frozen TextEncoder: tiny Qwen3, fixed seed, real tokenizer),
    `.pipeline(unet_params)` -> `dreamlite_jax.pipeline.Pipeline`.
* `ctx.eval_sets()`   the fixed shapes evaluation sets (`dreamlite_jax.eval.shapes_stage`):
                      T2I prompts and edit triplets, held-in and held-out.
* `ctx.stage_config(section)` a trainer-ready ConfigDict: `seed`, `mesh`, `model`
                      and the section's `train`/`loss`/`data`, with
                      `init_from.workdir` set to the parent's directory.

The runner returns a JSON-able dict that becomes `DONE.json["results"]`. Keys the
report reads when present: `steps` (int), `final_loss` (float), `checkpoint`
(a workdir whose checkpoints hold the stage's U-Net; default `ctx.workdir`),
`scores` (a `shapes_stage.evaluate` dict: `{"t2i": {...}, "edit": {...}}`),
`rl` (`{"before": float, "after": float, ...}`), `distill` (`{"teacher",
"teacher_naive_4step", "teacher_naive_4step_cfg", "student_4step"}`), `convert`
(`{"gpu_check_findings", "max_abs_err_fp32", "files": [...]}`), `sample_grids` (PNG
paths relative to the stage dir). The runner writes only under `ctx.workdir` and must resume when
re-run after an interruption (the shared trainer does this); when the trainer
returns `preempted=True` the runner calls `raise_if_preempted(result, ctx.name)`
so the stage is not marked finished.

Register a runner by adding it to `STAGE_RUNNERS` below (names fail loudly).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
import uuid
from typing import Any, Callable

import ml_collections

from dreamlite_jax.config import ConfigError

DONE_FILE = "DONE.json"
STARTED_FILE = "STARTED.json"


@dataclasses.dataclass
class StageContext:
  """What a stage runner gets (see the module docstring)."""
  config: ml_collections.ConfigDict
  name: str
  workdir: str
  job_workdir: str
  parent_workdir: str | None
  parent_results: dict
  models: "Any"  # dreamlite_jax.shared_models.SharedModels

  @property
  def section(self) -> ml_collections.ConfigDict:
    return self.config[self.name]

  def eval_sets(self) -> dict:
    from dreamlite_jax.eval import shapes_stage
    return shapes_stage.eval_sets(self.config)

  def stage_config(self, section: ml_collections.ConfigDict | None = None
                   ) -> ml_collections.ConfigDict:
    """A trainer-ready config: seed, mesh, model, the section's fields, init_from = parent."""
    from experiments import train_defaults
    section = self.section if section is None else section
    config = ml_collections.ConfigDict()
    config.stage = self.name
    config.seed = self.config.seed
    config.mesh = self.config.mesh
    config.model = self.config.model
    for key, value in section.items():
      if key != "parent":
        config[key] = value
    config.init_from = train_defaults.init_from_config(
        workdir=self.parent_workdir or "", ema_as_params=bool(section.get("init_from_ema", False)))
    return config


Runner = Callable[[StageContext], dict]


class StagePreempted(RuntimeError):
  """A runner stopped early on SIGTERM/SIGINT (checkpoint written): no DONE.json, re-run resumes."""


def raise_if_preempted(result, stage: str) -> None:
  """Call after `trainer.train`: a preempted stage must not be marked finished."""
  if result.preempted:
    raise StagePreempted(f"stage {stage!r} stopped at step {result.final_step} on a signal; "
                         f"its checkpoint is saved and re-running the job resumes it")


def _vae(ctx):
  from dreamlite_jax.training import vae_stage
  return vae_stage.run_stage(ctx)


def _pretrain(ctx):
  from dreamlite_jax.training import pretrain_stage
  return pretrain_stage.run_stage(ctx)


def _rl(ctx):
  from dreamlite_jax.training import rl_stage
  return rl_stage.run_stage(ctx)


def _distill(ctx):
  from dreamlite_jax.training import distill_stage
  return distill_stage.run_stage(ctx)


def _eval(ctx):
  from dreamlite_jax.eval import shapes_stage
  return shapes_stage.run_stage(ctx)


def _convert(ctx):
  from dreamlite_jax import convert_stage
  return convert_stage.run_stage(ctx)


# The one table of stage names. Imports are lazy so a job that runs one stage
# does not import every other stage's dependencies.
STAGE_RUNNERS: dict[str, Runner] = {
    "vae": _vae,
    "pretrain_t2i": _pretrain,
    "pretrain_edit": _pretrain,
    "pretrain_joint": _pretrain,
    "sft": _pretrain,
    "rl": _rl,
    "distill": _distill,
    "eval": _eval,
    "convert": _convert,
}


def parse_stages(text: str) -> list[str]:
  """'a,b' -> ['a', 'b']; unknown names raise ConfigError listing the known ones."""
  names = [s.strip() for s in text.split(",") if s.strip()]
  if not names:
    raise ConfigError(f"stage list {text!r} is empty")
  unknown = [n for n in names if n not in STAGE_RUNNERS]
  if unknown:
    raise ConfigError(f"unknown stage(s) {unknown}; known stages: {sorted(STAGE_RUNNERS)}")
  if len(set(names)) != len(names):
    raise ConfigError(f"stage list {text!r} names a stage twice")
  return names


def done_path(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, DONE_FILE)


def _read_json(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, record: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=2, sort_keys=True)
  os.replace(tmp, path)  # atomic: the file appears complete or not at all


def read_done(workdir: str, stage: str) -> dict | None:
  """The stage's DONE.json record ({"stage", "results", "wall_time_s", ...}) or None."""
  return _read_json(done_path(workdir, stage))


def read_started(workdir: str, stage: str) -> dict | None:
  """The STARTED.json of a stage's latest run ({"config", "upstream_run_ids"}) or None."""
  return _read_json(os.path.join(workdir, stage, STARTED_FILE))


def stage_inputs(config: ml_collections.ConfigDict, stage: str) -> dict:
  """The config a stage's results are a function of, as plain JSON values: its own
  section plus the job-wide `model`, `data` and `seed` (not `mesh`: sharding does
  not change what is trained)."""
  def plain(value):
    if isinstance(value, ml_collections.ConfigDict):
      value = value.to_dict()
    return json.loads(json.dumps(value, sort_keys=True, default=str))
  return {key: plain(config.get(key)) for key in (stage, "model", "data", "seed")}


def _config_diff(recorded: dict, current: dict, limit: int = 4) -> str:
  """'a.b: 1 -> 2, ...' for the fields that differ ('' when none)."""
  from flax import traverse_util
  old = traverse_util.flatten_dict(recorded, sep=".")
  new = traverse_util.flatten_dict(current, sep=".")
  missing = "(absent)"
  changed = [f"{k}: {old.get(k, missing)!r} -> {new.get(k, missing)!r}"
             for k in sorted(set(old) | set(new)) if old.get(k, missing) != new.get(k, missing)]
  more = f", and {len(changed) - limit} more" if len(changed) > limit else ""
  return ", ".join(changed[:limit]) + more


def upstream_stages(config: ml_collections.ConfigDict, stage: str) -> list[str]:
  """The stages whose outputs `stage` is built on: its `parent`, and the job's own `vae`
  (every diffusion stage trains on, samples through or exports the VAE's latents)
  unless `config.model.vae_checkpoint` names an external one."""
  section = config.get(stage) or {}
  upstream = [section["parent"]] if section.get("parent") else []
  if stage != "vae" and "vae" not in upstream and not config.model.get("vae_checkpoint"):
    upstream.append("vae")
  return upstream


def _run_inputs(config: ml_collections.ConfigDict, workdir: str, stage: str) -> dict:
  """What a run of `stage` is a function of: its config and its upstream stages' runs."""
  return {"config": stage_inputs(config, stage),
          "upstream_run_ids": {u: (read_done(workdir, u) or {}).get("run_id")
                               for u in upstream_stages(config, stage)}}


def _staleness(record: dict, config: ml_collections.ConfigDict, workdir: str, stage: str,
               will_run: set[str]) -> tuple[str, str]:
  """(the config fields that changed since `record` was written, why the upstream runs
  it was built on are not the current ones); '' where nothing changed."""
  diff = _config_diff(record["config"], stage_inputs(config, stage)) if "config" in record else ""
  for upstream, run_id in (record.get("upstream_run_ids") or {}).items():
    upstream_record = read_done(workdir, upstream)
    if upstream in will_run:
      return diff, f"built on a run of {upstream!r} that this job is about to replace"
    if upstream_record is None:
      return diff, f"built on {upstream!r}, which has no finished run in this workdir any more"
    if upstream_record.get("run_id") != run_id:
      return diff, f"built on an earlier run of {upstream!r}"
  return diff, ""


def _holds_work(stage_dir: str) -> bool:
  """Whether a stage directory holds anything a re-run would resume from (any file but
  STARTED.json): a stage that failed before writing anything may re-run with a fix."""
  return any(f != STARTED_FILE or root != stage_dir
             for root, _, files in os.walk(stage_dir) for f in files)


def check_finished_stages(config: ml_collections.ConfigDict, workdir: str,
                          names: list[str]) -> None:
  """Raises ConfigError if a stage among `names` holds work that is not of this run.

  Stale means: finished (DONE.json) or interrupted (STARTED.json and files the stage
  would resume from) with a different `stage_inputs`; or built on a run of an
  upstream stage (`upstream_stages`) other than its current one, or on one that is
  gone or will run again now (not finished, or stale itself). Records written
  before these fields existed are trusted. All stale stages are named at once,
  with the directories to delete.
  """
  will_run: set[str] = set()
  problems: list[tuple[str, str]] = []
  for name in names:
    why = ""
    done = read_done(workdir, name)
    started = read_started(workdir, name) if done is None else None
    if done is not None:
      diff, upstream = _staleness(done, config, workdir, name, will_run)
      why = f"finished with a different config ({diff})" if diff else upstream
    elif started is not None and _holds_work(os.path.join(workdir, name)):
      diff, upstream = _staleness(started, config, workdir, name, will_run)
      if diff or upstream:
        why = ("interrupted run (its checkpoints would be resumed) "
               + (f"with a different config ({diff})" if diff else upstream))
    if done is None or why:
      will_run.add(name)
    if why:
      problems.append((name, why))
  if problems:
    lines = "\n".join(f"  {name}: {why}" for name, why in problems)
    dirs = " ".join(os.path.join(workdir, name) for name, _ in problems)
    raise ConfigError(
        f"stages in {workdir} hold work that does not belong to this run:\n{lines}\n"
        f"Delete them to re-run them with this config (rm -r {dirs}), or use a new --workdir.")


def _parent(config: ml_collections.ConfigDict, stage: str, workdir: str) -> tuple[str | None, dict]:
  section = config.get(stage)
  if section is None:
    raise ConfigError(f"config has no section for stage {stage!r} (config.{stage})")
  parent = section.get("parent", "")
  if not parent:
    return None, {}
  record = read_done(workdir, parent)
  if record is None:
    raise ConfigError(f"config.{stage}.parent = {parent!r}: that stage has not finished in "
                      f"{workdir} (no {done_path(workdir, parent)}); run it first")
  results = record["results"]
  return os.path.abspath(results.get("checkpoint") or os.path.join(workdir, parent)), results


def run_job(config: ml_collections.ConfigDict, workdir: str, stages: str | None = None,
            log: Callable[[str], None] = print) -> dict:
  """Runs the job's stages in order, skipping finished ones; returns {stage: DONE record}.

  `stages` (comma-separated) selects a subset; default `config.stages`. After the
  stages the report (`report.md`, `scores.json`, PNGs) is rewritten from every
  finished stage in the workdir.
  """
  from dreamlite_jax import report
  from dreamlite_jax import shared_models

  names = parse_stages(stages if stages is not None else config.stages)
  workdir = os.path.abspath(workdir)
  check_finished_stages(config, workdir, names)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  models = shared_models.SharedModels(config, workdir)
  records = {}
  for name in names:
    record = read_done(workdir, name)
    if record is not None:
      log(f"[job] {name}: finished earlier ({record['wall_time_s']:.0f}s), skipping")
      records[name] = record
      continue
    parent_workdir, parent_results = _parent(config, name, workdir)
    stage_dir = os.path.join(workdir, name)
    os.makedirs(stage_dir, exist_ok=True)
    inputs = _run_inputs(config, workdir, name)
    _write_json(os.path.join(stage_dir, STARTED_FILE), inputs)
    ctx = StageContext(config=config, name=name, workdir=stage_dir, job_workdir=workdir,
                       parent_workdir=parent_workdir, parent_results=parent_results,
                       models=models)
    log(f"[job] {name}: starting" + (f" from {parent_workdir}" if parent_workdir else ""))
    start = time.time()
    try:
      results = STAGE_RUNNERS[name](ctx)
    except StagePreempted as e:
      log(f"[job] {e}")
      return records
    record = {"stage": name, "results": results, "wall_time_s": time.time() - start,
              "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), "run_id": uuid.uuid4().hex,
              **inputs}
    _write_json(done_path(workdir, name), record)
    log(f"[job] {name}: done in {record['wall_time_s']:.0f}s")
    records[name] = record
  report.write_report(config, workdir, log=log)
  return records


def load_job_config(path: str, overrides: list[str] | tuple[str, ...] = ()
                    ) -> ml_collections.ConfigDict:
  """Loads a job config: defaults, then `config.presets[preset]`, then the user's overrides.

  The preset is read from the overrides (`--config.preset=smoke`) so a user
  override of a field the preset also sets still wins.
  """
  from dreamlite_jax import config as config_lib
  from dreamlite_jax import config_schema

  config = config_lib.load_config(path, overrides)
  preset = config.get("preset", "default")
  if preset != "default":
    presets = config.get("presets") or {}
    if preset not in presets:
      raise ConfigError(f"config.preset = {preset!r}: unknown; known presets: "
                        f"{['default'] + sorted(presets)}")
    config = config_lib.load_config_file(path)
    config_lib.apply_overrides(config, presets[preset])
    config_lib.apply_overrides(config, overrides)
    config_schema.validate(config)
  parse_stages(config.stages)
  return config
