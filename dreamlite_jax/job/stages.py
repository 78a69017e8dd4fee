"""The job runner: the stages a config lists, in order, each from its parent's checkpoint.

A *job* is one workdir with one sub-directory per stage (`<workdir>/<stage>/`).
`config.stages` lists stage names (comma-separated; `--stages a,b` selects some);
each name has its config section `config.<name>`, whose `kind` picks the runner
(`STAGE_RUNNERS`, keyed by kind), so a config may list any number of stages of a
kind. `load_job_config` loads and validates the whole job before anything runs
(`validate_job_config`: every listed section by its kind, data source, caches,
weight folders, mesh vs devices, batches vs data shards; each error names the
field's full path). `run_job(config, workdir)` skips every stage whose `DONE.json`
exists (a finished stage), runs the others, writes their `DONE.json` last, and
finally renders `report.md` + `scores.json`. Re-running a job resumes it: finished
stages are skipped, an interrupted one resumes from its own orbax checkpoints (the
trainer's resume order).

A finished stage is reused only if it still belongs to this run: its `DONE.json`
records the config it ran with (`stage_inputs`: its own section, `model`, `data`,
`seed`) and the `run_id`s of the records it was built on (its parent and the job's
VAE: `upstream_stages`). A changed field, or an upstream stage that was re-run (or is
about to be), makes the job stop before running anything and name the stage
directories to delete; it never mixes checkpoints of two configs silently. The same
holds for an interrupted stage: its `STARTED.json`, written before it runs, records
the same two things, and its checkpoints are resumed only if they still match.

Several processes (a pod: `python -m dreamlite_jax.main --distributed`) run the same
job on one shared workdir. Every process runs every stage; the job's own files
(`STARTED.json`, `DONE.json`, `config.json`, `report.md`, `scores.json`) are written
by process 0 only (`is_job_writer`), and the others wait for it (`sync`) after the
workdir's records are read, after each `STARTED.json` and `DONE.json`, and after the
report. The workdir may be a URL (`gs://bucket/run`): it is kept as given, and the
job's files go through `etils.epath`.

## The stage-runner contract (RL, distillation and every other stage follow it)

    def run_stage(ctx: StageContext) -> dict

* `ctx.config`        the full job ConfigDict (read your section as `ctx.section`,
                      i.e. `ctx.config[ctx.name]`; shared parts are `ctx.config.model`,
                      `.mesh`, `.seed`, `.data`, `.eval`).
* `ctx.name`          the stage name (also its config section and sub-directory).
* `ctx.workdir`       this stage's directory (create checkpoints, metrics, PNGs here).
* `ctx.parent_workdir` the parent stage's directory (`config.<stage>.parent`), whose
                      `checkpoints/` hold the U-Net to start from, or the model a `parent`
                      path names (a run, a stage directory of another job, or a diffusers
                      DreamLite folder such as the release), or None.
* `ctx.parent_results` the parent's `DONE.json` results (dict), or {}.
* `ctx.models`        `SharedModels`, built lazily once per job:
    `.unet_config` (UNetConfig), `.unet` (DreamLiteUNet module),
    `.vae` (TinyAutoencoder module), `.vae_params` (from the `vae` stage),
    `.text_encoder` (frozen TextEncoder: tiny Qwen3, fixed seed, real tokenizer),
    `.pipeline(unet_params)` -> `dreamlite_jax.pipeline.Pipeline`.
* `ctx.eval_sets()`   the fixed shapes evaluation sets (`dreamlite_jax.eval.shapes_scoring`):
                      T2I prompts and edit triplets, held-in and held-out.
* `ctx.stage_config(section)` a trainer-ready ConfigDict: `seed`, `mesh`, `model`
                      and the section's `train`/`loss`/`data`, with
                      `init_from.workdir` set to the parent's directory.

The runner returns a JSON-able dict that becomes `DONE.json["results"]`. Keys the
report reads when present: `steps` (int), `final_loss` (float), `checkpoint`
(a workdir whose checkpoints hold the stage's U-Net; default `ctx.workdir`),
`scores` (a `shapes_scoring.evaluate` dict: `{"t2i": {...}, "edit": {...}}`),
`rl` (`{"before": float, "after": float, ...}`), `distill` (`{"teacher",
"teacher_naive_4step", "teacher_naive_4step_cfg", "student_4step"}`), `convert`
(`{"gpu_check_findings", "max_abs_err_fp32", "files": [...]}`), `sample_grids` (PNG
paths relative to the stage dir). The runner writes only under `ctx.workdir` and must resume when
re-run after an interruption (the shared trainer does this); when the trainer
returns `preempted=True` the runner calls `dreamlite_jax.job.preemption.raise_if_preempted(
result, ctx.name)` so the stage is not marked finished. Runners write files that
every process computes (metrics, sample grids) from process 0 only, as the trainer does.

Register a runner by adding its kind to `STAGE_RUNNERS` below (unknown kinds fail loudly).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from typing import Any, Callable

import jax
import ml_collections
from etils import epath
from flax import traverse_util

from dreamlite_jax import config as config_lib
from dreamlite_jax import config_schema
from dreamlite_jax.job import report
from dreamlite_jax.job import shared_models
from dreamlite_jax.config import ConfigError
from dreamlite_jax.eval import shapes_scoring
from dreamlite_jax.training import mesh as mesh_lib
from dreamlite_jax.job.preemption import StagePreempted
from dreamlite_jax.job.records import STARTED_FILE, done_path, read_done, read_started, write_json
from experiments import train_defaults



@dataclasses.dataclass
class StageContext:
  """What a stage runner gets (see the module docstring)."""
  config: ml_collections.ConfigDict
  name: str
  workdir: str
  job_workdir: str
  parent_workdir: str | None
  parent_results: dict
  models: "Any"  # dreamlite_jax.job.shared_models.SharedModels

  @property
  def section(self) -> ml_collections.ConfigDict:
    return self.config[self.name]

  def eval_sets(self) -> dict:
    return shapes_scoring.eval_sets(self.config)

  def stage_config(self, section: ml_collections.ConfigDict | None = None
                   ) -> ml_collections.ConfigDict:
    """A trainer-ready config: seed, mesh, model, the section's fields, init_from = parent."""
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


def _vae(ctx):
  from dreamlite_jax.job import vae_stage
  return vae_stage.run_stage(ctx)


def _pretrain(ctx):
  from dreamlite_jax.job import pretrain_stage
  return pretrain_stage.run_stage(ctx)


def _rl(ctx):
  from dreamlite_jax.job import rl_stage
  return rl_stage.run_stage(ctx)


def _distill(ctx):
  from dreamlite_jax.job import distill_stage
  return distill_stage.run_stage(ctx)


def _eval(ctx):
  from dreamlite_jax.job import eval_stage
  return eval_stage.run_stage(ctx)


def _convert(ctx):
  from dreamlite_jax.job import convert_stage
  return convert_stage.run_stage(ctx)


# The one table of stage kinds (`config.<stage>.kind`). Imports are lazy so a job that
# runs one stage does not import every other stage's dependencies.
STAGE_RUNNERS: dict[str, Runner] = {
    "vae": _vae,
    "pretrain": _pretrain,
    "rl": _rl,
    "distill": _distill,
    "eval": _eval,
    "convert": _convert,
}


def _split(text: str) -> list[str]:
  return [s.strip() for s in text.split(",") if s.strip()]


def parse_stages(config: ml_collections.ConfigDict, selection: str | None = None) -> list[str]:
  """The stages to run: `selection` ('a,b') or `config.stages`, in order.

  Every name needs a section `config.<name>` whose `kind` is a key of `STAGE_RUNNERS`;
  otherwise ConfigError names the stage and the known kinds.
  """
  text = config.stages if selection is None else selection
  where = "config.stages" if selection is None else "--stages"
  names = _split(text)
  if not names:
    raise ConfigError(f"{where} = {text!r}: names no stage")
  if len(set(names)) != len(names):
    raise ConfigError(f"{where} = {text!r}: names a stage twice")
  kinds = sorted(STAGE_RUNNERS)
  for name in names:
    section = config.get(name)
    if not isinstance(section, ml_collections.ConfigDict):
      raise ConfigError(f"unknown stage {name!r} in {where}: the config has no section "
                        f"config.{name} (stages of this config: "
                        f"{config_schema.stage_names(config)}; known kinds: {kinds})")
    if "kind" not in section:
      raise ConfigError(f"config.{name}.kind is missing: stage {name!r} needs one of the "
                        f"known kinds {kinds}")
    if section.kind not in STAGE_RUNNERS:
      raise ConfigError(f"config.{name}.kind = {section.kind!r}: stage {name!r} has an unknown "
                        f"kind; known kinds: {kinds}")
  return names


def validate_job_config(config: ml_collections.ConfigDict, names: list[str]) -> None:
  """Everything running `names` needs, checked before the first stage starts: the
  fields of the job and of each stage's section by its kind
  (`config_schema.validate_job`), then the caches, weight folders, mesh and batch
  sizes against this machine (`config_schema.check_job_environment`)."""
  config_schema.validate_job(config, names)
  config_schema.check_job_environment(config, names, device_count=jax.device_count(),
                                      process_count=jax.process_count())


def is_job_writer() -> bool:
  """Whether this process writes the job's own files (process 0 of a multi-process job)."""
  return jax.process_index() == 0


def sync(tag: str) -> None:
  """Waits until every process of a multi-process job reaches `tag` (no-op on one)."""
  mesh_lib.barrier(tag)


def absolute(path: str) -> str:
  """A local path made absolute; a URL (`gs://bucket/run`) as given."""
  return path if "://" in path else os.path.abspath(path)


def finished_records(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict]:
  """{stage: DONE record} of the stages of `config.stages` finished in `workdir`, in order."""
  records = {name: read_done(workdir, name) for name in _split(config.stages)}
  return {name: record for name, record in records.items() if record is not None}


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
  old = traverse_util.flatten_dict(recorded, sep=".")
  new = traverse_util.flatten_dict(current, sep=".")
  missing = "(absent)"
  changed = [f"{k}: {old.get(k, missing)!r} -> {new.get(k, missing)!r}"
             for k in sorted(set(old) | set(new)) if old.get(k, missing) != new.get(k, missing)]
  more = f", and {len(changed) - limit} more" if len(changed) > limit else ""
  return ", ".join(changed[:limit]) + more


def upstream_stages(config: ml_collections.ConfigDict, stage: str) -> list[str]:
  """The stages whose outputs `stage` is built on: its `parent`, and the job's own `vae`
  stage (every diffusion stage trains on, samples through or exports the VAE's
  latents) unless `config.model.vae_checkpoint` names an external one."""
  section = config.get(stage) or {}
  parent = section.get("parent")
  upstream = [parent] if parent and not config_schema.is_model_path(parent) else []
  if (section.get("kind") != "vae" and "vae" not in upstream
      and not config.model.get("vae_checkpoint")):
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
  root = epath.Path(stage_dir)
  return any(f != STARTED_FILE or directory != root
             for directory, _, files in root.walk() for f in files)


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
  parent = config[stage].get("parent", "")
  if not parent:
    return None, {}
  if config_schema.is_model_path(parent):
    # A model from outside the job (a run, another job's stage directory, a diffusers
    # DreamLite folder such as the release): checkpoints.load_params / restore_or_init read it.
    return absolute(parent), {}
  record = read_done(workdir, parent)
  if record is None:
    raise ConfigError(f"config.{stage}.parent = {parent!r}: that stage has not finished in "
                      f"{workdir} (no {done_path(workdir, parent)}); run it first")
  results = record["results"]
  return absolute(results.get("checkpoint") or os.path.join(workdir, parent)), results


def run_job(config: ml_collections.ConfigDict, workdir: str, stages: str | None = None,
            log: Callable[[str], None] | None = None) -> dict:
  """Runs the job's stages in order, skipping finished ones; returns {stage: DONE record}.

  `stages` (comma-separated) selects a subset; default `config.stages`. The job is
  validated first (`validate_job_config`). After the stages the report (`report.md`,
  `scores.json`, PNGs) is rewritten from every finished stage in the workdir. `log`
  (default: print on process 0) gets one line per event. Every process of a
  multi-process job calls this; process 0 writes the job's files (module docstring).
  """
  writer = is_job_writer()
  if log is None:
    log = print if writer else (lambda message: None)
  names = parse_stages(config, stages)
  validate_job_config(config, names)
  workdir = absolute(workdir)
  check_finished_stages(config, workdir, names)
  sync("dreamlite_job:checked")  # every process has read the records before any is written
  if writer:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    epath.Path(workdir, "config.json").write_text(config.to_json_best_effort(indent=2))
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
    inputs = _run_inputs(config, workdir, name)
    if writer:
      epath.Path(stage_dir).mkdir(parents=True, exist_ok=True)
      write_json(os.path.join(stage_dir, STARTED_FILE), inputs)
    sync(f"dreamlite_job:{name}:started")
    ctx = StageContext(config=config, name=name, workdir=stage_dir, job_workdir=workdir,
                       parent_workdir=parent_workdir, parent_results=parent_results,
                       models=models)
    log(f"[job] {name}: starting" + (f" from {parent_workdir}" if parent_workdir else ""))
    start = time.time()
    try:
      results = STAGE_RUNNERS[config[name].kind](ctx)
    except StagePreempted as e:
      log(f"[job] {e}")
      return records
    record = {"stage": name, "results": results, "wall_time_s": time.time() - start,
              "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), "run_id": uuid.uuid4().hex,
              **inputs}
    if writer:
      write_json(done_path(workdir, name), record)
    sync(f"dreamlite_job:{name}:done")  # the next stage reads this record as its parent
    log(f"[job] {name}: done in {record['wall_time_s']:.0f}s")
    records[name] = record
  if writer:
    report.write_report(config, workdir, finished_records(config, workdir), log=log)
  sync("dreamlite_job:report")
  return records


def load_job_config(path: str, overrides: list[str] | tuple[str, ...] = (),
                    stages: str | None = None) -> ml_collections.ConfigDict:
  """Loads and validates a job config: the file's `get_config(preset)` (`--config.preset=NAME`
  among the overrides picks it), then the user's overrides, so an override of a field the
  preset also sets wins; then `validate_job_config` for the stages to run (`stages`, as
  `--stages` selects them, else `config.stages`).
  """
  config = config_lib.load_config(path, overrides)
  validate_job_config(config, parse_stages(config, stages))
  return config
