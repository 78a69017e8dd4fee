"""Validation of configs; every error names its field by its full path in the config.

* `validate(config, prefix)`: the fields of one trainer-shaped config (a stage's
  `ctx.stage_config()`, a stage section, a test config), each checked when present.
  `validate_trainer` also requires every field the trainer reads.
* `validate_job(config, names)`: a whole job config (the spec's shape: `stages`,
  `seed`, `mesh`, `model`, `data`, one section per stage with its `kind`) before its
  first stage runs: the job-wide sections, the data source, each named stage's
  section by its kind, and every `sampler` section of the job (`SAMPLERS`: each a
  `SamplerConfig`). Pure: reads nothing but the config.
* `check_job_environment(config, names, device_count, process_count)`: what the job
  needs from the machine it starts on: the embedding caches its stages draw from,
  the weight folders it names, a mesh that fits the devices, batches that split over
  the data shards and the processes.

This module imports `config` (for `ConfigError` and `require`); `config` never
imports it, so loading a config stays pure and the two have no circle.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import ml_collections
from etils import epath

from dreamlite_jax.config import ConfigError, require
from dreamlite_jax.diffusion.sampling import SAMPLER_FIELDS, SamplerConfig
from dreamlite_jax.models import channel_concat
from dreamlite_jax.models.weights import find_unet_dir
from dreamlite_jax.models.unet import UNetConfig
from dreamlite_jax.models.vae import VAEConfig
from dreamlite_jax.training import mesh as mesh_lib
from dreamlite_jax.training.pretrain_loss import PretrainLossConfig

_is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
_is_num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
_positive_int = (lambda v: _is_int(v) and v > 0, "must be a positive int")

# field -> (check, what it must be). Checked when present.
_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (_is_int, "must be an int"),
    "train.steps": _positive_int,
    "train.batch_size": _positive_int,
    "train.lr": (lambda v: _is_num(v) and v >= 0, "must be >= 0"),
    "train.accum_steps": _positive_int,
    "train.schedule": (lambda v: v in ("cosine", "constant"), "must be 'cosine' or 'constant'"),
    "train.warmup_steps": (lambda v: _is_int(v) and v >= 0, "must be an int >= 0"),
    "train.end_lr_ratio": (lambda v: _is_num(v) and 0 <= v <= 1, "must be in [0, 1]"),
    "train.b1": (lambda v: _is_num(v) and 0 <= v < 1, "must be in [0, 1)"),
    "train.b2": (lambda v: _is_num(v) and 0 <= v < 1, "must be in [0, 1)"),
    "train.eps": (lambda v: _is_num(v) and v > 0, "must be > 0"),
    "train.weight_decay": (lambda v: _is_num(v) and v >= 0, "must be >= 0"),
    "train.grad_clip": (lambda v: _is_num(v) and v >= 0, "must be >= 0 (0 = no clipping)"),
    "train.ema_decay": (lambda v: _is_num(v) and 0 <= v <= 1, "must be in [0, 1]"),
    "train.compute_dtype": (lambda v: v in ("float32", "bfloat16", "float16"),
                            "must be 'float32', 'bfloat16' or 'float16'"),
    "train.log_every": _positive_int,
    "train.checkpoint_every": _positive_int,
    "train.keep_checkpoints": _positive_int,
    "train.async_checkpoints": (lambda v: isinstance(v, bool), "must be a bool"),
    "train.sample_every": (lambda v: _is_int(v) and v >= 0, "must be an int >= 0 (0 = off)"),
    "train.sample_with_ema": (lambda v: isinstance(v, bool), "must be a bool"),
    "train.progress_bar": (lambda v: isinstance(v, bool), "must be a bool"),
    "mesh.data": (lambda v: _is_int(v) and (v >= 1 or v == -1), "must be a positive int or -1"),
    "mesh.fsdp": (lambda v: _is_int(v) and (v >= 1 or v == -1), "must be a positive int or -1"),
    "mesh.tensor": (lambda v: _is_int(v) and (v >= 1 or v == -1), "must be a positive int or -1"),
    "mesh.max_replicated_fraction": (lambda v: _is_num(v) and 0 <= v <= 1, "must be in [0, 1]"),
    "init_from.workdir": (lambda v: isinstance(v, str), "must be a path string ('' = scratch)"),
    "init_from.step": (lambda v: _is_int(v) and v >= -1, "must be an int >= -1 (-1 = latest)"),
    "init_from.ema_as_params": (lambda v: isinstance(v, bool), "must be a bool"),
    "init_from.model": (lambda v: isinstance(v, str),
                        "must be a path string: a training run, a job's stage directory or a "
                        "diffusers DreamLite folder ('' = none)"),
    "init_from_ema": (lambda v: isinstance(v, bool), "must be a bool"),
    # Sampling calls of the evaluations: rows per call, the noise seed of each call.
    "batch_size": _positive_int,
    "eval.batch_size": _positive_int,
    "stage_check.batch_size": _positive_int,
    "eval.seed": (_is_int, "must be an int"),
    "stage_check.seed": (_is_int, "must be an int"),
    "stage_check.every": (lambda v: _is_int(v) and v >= 0,
                          "must be an int >= 0 (0 = only at the end of each stage)"),
    "data.t2i_weight": (lambda v: _is_num(v) and v >= 0, "must be >= 0"),
    "data.edit_weight": (lambda v: _is_num(v) and v >= 0, "must be >= 0"),
    "data.t2i_cache": (lambda v: isinstance(v, str), "must be a path string ('' = none)"),
    "data.edit_cache": (lambda v: isinstance(v, str), "must be a path string ('' = none)"),
    "data.num_threads": _positive_int,
    "data.prefetch": _positive_int,
    "data.image_size": _positive_int,
    "data.num_t2i": (lambda v: _is_int(v) and v >= 0, "must be an int >= 0"),
    "data.num_edit": (lambda v: _is_int(v) and v >= 0, "must be an int >= 0"),
    "data.crop": (lambda v: v in ("center", "random"), "must be 'center' or 'random'"),
    "data.resolutions": (lambda v: _valid_resolutions(v),
                         "must be ((side_px, first_step), ...) with positive sides, the first "
                         "starting at step 0 and start steps increasing"),
}

# The `SamplerConfig` sections of each stage kind, relative to its section. Those of every
# section of the job are checked; a stage that runs needs all of its kind's but
# `stage_check.sampler` (read by pretrain-kind stages on the shapes source, when enabled).
SAMPLERS = {
    "eval": ("sampler", "stage_check.sampler"),
    "rl": ("sampler", "eval.sampler"),              # rollouts; the before/after evaluation
    "distill": ("objective.teacher", "eval.teacher"),  # real score + regression; scoring
}
OPTIONAL_SAMPLERS = ("stage_check.sampler",)
# Job-wide sampler sections, checked when present: the cache source's periodic sample grids.
JOB_SAMPLERS = ("samples.sampler",)

# The job's data sources (`config.data.source`).
DATA_SOURCES = ("shapes", "cache")

# The fields `train()` reads; all must exist.
TRAIN_FIELDS = tuple(
    f"train.{k}" for k in ("steps", "batch_size", "accum_steps", "lr", "schedule", "warmup_steps",
                           "end_lr_ratio", "b1", "b2", "eps", "weight_decay", "grad_clip",
                           "ema_decay", "compute_dtype", "log_every", "checkpoint_every",
                           "keep_checkpoints", "async_checkpoints", "sample_every",
                           "sample_with_ema", "progress_bar"))
TRAINER_FIELDS = ("seed",) + TRAIN_FIELDS + (
    "mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.max_replicated_fraction",
    "init_from.workdir", "init_from.step", "init_from.ema_as_params", "init_from.model")

# The file `python -m data_pipelines.build_cache` writes last into each `<root>/<side>/`
# sub-cache: where it exists, that sub-cache is complete.
CACHE_INFO = "cache_info.json"


def _valid_resolutions(value) -> bool:
  try:
    pairs = [(side, start) for side, start in value]
  except (TypeError, ValueError):
    return False
  if not pairs or not all(_is_int(side) and _is_int(start) for side, start in pairs):
    return False
  starts = [s for _, s in pairs]
  return all(side > 0 for side, _ in pairs) and starts[0] == 0 and starts == sorted(set(starts))


def _has(config, field: str) -> bool:
  node = config
  for part in field.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def _get(config, field: str):
  node = config
  for part in field.split("."):
    node = node[part]
  return node


def validate(config: ml_collections.ConfigDict, prefix: str = "config") -> None:
  """Checks the fields `config` has (see `_FIELDS` and below); raises ConfigError.

  `prefix` is where `config` sits in the job config (`config.sft` for the `sft`
  section), so errors name the field as the user would override it.
  """
  name = lambda field: f"{prefix}.{field}"
  for field, (check, what) in _FIELDS.items():
    if _has(config, field):
      require(config, field, check, what, prefix)
  if _has(config, "train.batch_size") and _has(config, "train.accum_steps"):
    require(config, "train.accum_steps", lambda v: config.train.batch_size % v == 0,
            f"must divide {name('train.batch_size')} = {config.train.batch_size}", prefix)
  if _has(config, "mesh.data"):
    axes = [config.mesh.get(a) for a in ("data", "fsdp", "tensor")]
    if axes.count(-1) > 1:
      raise ConfigError(f"{name('mesh')}: at most one of data/fsdp/tensor may be -1, got {axes}")
  if _has(config, "data.t2i_weight") and _has(config, "data.edit_weight"):
    require(config, "data.edit_weight", lambda v: v + config.data.t2i_weight > 0,
            f"{name('data.t2i_weight')} + {name('data.edit_weight')} must be > 0", prefix)
  if _has(config, "model.unet"):
    _validate_dataclass_fields(config, "model.unet", UNetConfig, prefix)
  if _has(config, "model.unet.dtype") and _has(config, "train.compute_dtype"):
    require(config, "model.unet.dtype", lambda v: v == config.train.compute_dtype,
            f"must equal {name('train.compute_dtype')} = {config.train.compute_dtype!r}", prefix)
  if _has(config, "model.vae"):
    _validate_dataclass_fields(config, "model.vae", VAEConfig, prefix)
  if _has(config, "model.unet") and _has(config, "model.vae") and _has(config, "data.resolutions"):
    _check_sides(config.data.resolutions, _side_multiple(config.model), name("data.resolutions"))
  if _has(config, "model.conditioning"):
    require(config, "model.conditioning", lambda v: v in channel_concat.CONDITIONING,
            f"must be one of {channel_concat.CONDITIONING}", prefix)
  if _has(config, "model.text_encoder.text_length"):
    require(config, "model.text_encoder.text_length", *_positive_int, prefix)
  if _has(config, "model.text_encoder.spec"):
    require(config, "model.text_encoder.spec", lambda v: isinstance(v, str),
            "must be a string: a local Qwen3-VL folder, 'tiny:SEED' or '' (none)", prefix)
  if _has(config, "loss") and config.get("kind") == "pretrain":
    _validate_dataclass_fields(config, "loss", PretrainLossConfig, prefix)


def validate_trainer(config: ml_collections.ConfigDict) -> None:
  """`validate` plus: every field the trainer reads exists."""
  for field in TRAINER_FIELDS:
    if not _has(config, field):
      raise ConfigError(f"config.{field} is missing (the trainer needs it; see "
                        f"experiments/train_defaults.py)")
  validate(config)
  _check_warmup(config)


def _check_warmup(config: ml_collections.ConfigDict, prefix: str = "config") -> None:
  """The trainer's schedule warms up within the run."""
  require(config, "train.warmup_steps", lambda v: v <= config.train.steps,
          f"must be <= {prefix}.train.steps = {config.train.steps} (the trainer's schedule)",
          prefix)


def _side_multiple(model: ml_collections.ConfigDict) -> int:
  """Image sides must be multiples of this: the VAE's and the U-Net's downsampling."""
  unet = UNetConfig.from_dict(model.unet.to_dict())
  vae = VAEConfig.from_dict(model.vae.to_dict())
  return vae.downsample_factor * unet.downsample_factor


def _check_sides(resolutions, multiple: int, field: str) -> None:
  bad = [side for side, _ in resolutions if side % multiple]
  if bad:
    raise ConfigError(f"{field} = {tuple(map(tuple, resolutions))!r}: sides {bad} are not "
                      f"multiples of {multiple} (the VAE's x the U-Net's downsampling)")


def _validate_dataclass_fields(config, field: str, cls: type, prefix: str = "config") -> None:
  """`config.<field>` must hold exactly the fields of the config dataclass `cls`."""
  known = {f.name for f in dataclasses.fields(cls)}
  section = _get(config, field)
  unknown = sorted(set(section.keys()) - known)
  if unknown:
    raise ConfigError(f"{prefix}.{field}.{unknown[0]}: not a field of {cls.__name__} "
                      f"(unknown: {unknown})")
  try:
    build = getattr(cls, "from_dict", None) or (lambda d: cls(**d))
    build(section.to_dict())
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{prefix}.{field}: {cls.__name__} rejects it: {e}") from e


# --- the whole job --------------------------------------------------------------------------


def is_model_path(parent: str) -> bool:
  """Whether a stage's `parent` names a model outside the job (a path) rather than a stage."""
  return "/" in parent or parent.startswith(".")


def stage_names(config: ml_collections.ConfigDict) -> list[str]:
  """Names with a section that has a `kind`: the stages this config can run or name as parent."""
  return [k for k, v in config.items()
          if isinstance(v, ml_collections.ConfigDict) and isinstance(v.get("kind"), str)]


def _validate_pretrain_section(config: ml_collections.ConfigDict, name: str) -> None:
  """A pretrain-kind section: complete trainer fields, PretrainLossConfig `loss`, the
  T2I : edit mix and, on caches, the resolution schedule."""
  section, prefix = config[name], f"config.{name}"
  required = TRAIN_FIELDS + ("loss", "data.t2i_weight", "data.edit_weight")
  if config.data.get("source") == "cache":
    required += ("data.resolutions",)
  for field in required:
    if not _has(section, field):
      raise ConfigError(f"{prefix}.{field} is missing (a {section.kind!r}-kind stage needs it)")
  _check_warmup(section, prefix)
  if _has(config, "model.unet.dtype"):
    require(config, "model.unet.dtype", lambda v: v == section.train.compute_dtype,
            f"must equal {prefix}.train.compute_dtype = {section.train.compute_dtype!r} "
            f"(the U-Net's compute dtype in training)")
  if _has(section, "data.resolutions"):
    _check_sides(section.data.resolutions, _side_multiple(config.model),
                 f"{prefix}.data.resolutions")


def _validate_trained_section(config: ml_collections.ConfigDict, name: str) -> None:
  """A vae- or distill-kind section: complete trainer fields, warm-up within the run."""
  section, prefix = config[name], f"config.{name}"
  for field in TRAIN_FIELDS:
    if not _has(section, field):
      raise ConfigError(f"{prefix}.{field} is missing (a {section.kind!r}-kind stage needs it)")
  _check_warmup(section, prefix)


def check_rl_accum_steps(section: ml_collections.ConfigDict, name: str) -> None:
  """An rl-kind section takes one train step per minibatch of an iteration's rollouts
  (its train.batch_size is derived from them): no gradient accumulation."""
  accum = section.get("train", {}).get("accum_steps", 1)
  if accum != 1:
    raise ConfigError(f"config.{name}.train.accum_steps = {accum!r}: must be 1 for RL (each "
                      f"train step is one of the num_minibatches minibatches of an iteration's "
                      f"rollouts, and config.{name}.train.batch_size is derived from them; set "
                      f"num_minibatches to change the rows per step)")


def _validate_rl_section(config: ml_collections.ConfigDict, name: str) -> None:
  """An rl-kind section: see `check_rl_accum_steps`."""
  check_rl_accum_steps(config[name], name)


def _validate_samplers(config: ml_collections.ConfigDict, names: list[str]) -> None:
  """Every sampler section of the job is a valid `SamplerConfig`; the stages `names`
  have theirs."""
  for field in JOB_SAMPLERS:
    if _has(config, field):
      SamplerConfig.from_config(_get(config, field), f"config.{field}")
  for name in stage_names(config):
    section = config[name]
    for field in SAMPLERS.get(section.kind, ()):
      if _has(section, field):
        SamplerConfig.from_config(_get(section, field), f"config.{name}.{field}")
      elif name in names and field not in OPTIONAL_SAMPLERS:
        raise ConfigError(f"config.{name}.{field} is missing (a {section.kind!r}-kind stage "
                          f"samples with it: a section with {SAMPLER_FIELDS})")


# kind -> section checks beyond `validate(section)`; kinds not listed get those only.
_KIND_CHECKS: dict[str, Callable[[ml_collections.ConfigDict, str], None]] = {
    "pretrain": _validate_pretrain_section,
    "vae": _validate_trained_section,
    "distill": _validate_trained_section,
    "rl": _validate_rl_section,
}


def validate_job(config: ml_collections.ConfigDict, names: list[str]) -> None:
  """Validates a job config for running the stages `names` (already known to have a
  section with a known kind: `stages.parse_stages`). Raises ConfigError on the first
  problem, naming the field's full path (`config.pretrain_t2i.train.schedule`)."""
  for field in ("seed", "mesh", "model", "data"):
    if field not in config:
      raise ConfigError(f"config.{field} is missing (every job config has it)")
  for field in ("mesh.data", "mesh.fsdp", "mesh.tensor", "model.unet", "model.vae",
                "model.vae_checkpoint", "model.text_encoder.spec", "data.source"):
    if not _has(config, field):
      raise ConfigError(f"config.{field} is missing")
  require(config, "data.source", lambda v: v in DATA_SOURCES, f"must be one of {DATA_SOURCES}")
  if config.data.source == "cache":
    for field in ("data.t2i_cache", "data.edit_cache"):
      if not _has(config, field):
        raise ConfigError(f"config.{field} is missing (the cache source reads it; '' = none)")
  require(config, "model.vae_checkpoint", lambda v: isinstance(v, str),
          "must be a path string ('' = the job's own vae stage)")
  validate(config)
  known = stage_names(config)
  for name in names:
    section = config[name]
    validate(section, f"config.{name}")
    parent = section.get("parent", "")
    if parent and parent not in known and not is_model_path(parent):
      raise ConfigError(f"config.{name}.parent = {parent!r}: not a stage of this config "
                        f"(sections with a kind: {known}) nor a model path (a run, a job's "
                        f"stage directory or a diffusers DreamLite folder)")
    check = _KIND_CHECKS.get(section.kind)
    if check is not None:
      check(config, name)
  _validate_samplers(config, names)


def _cache_problem(root: str, sides: list[int]) -> str:
  """What is wrong with a cache root for `sides` ('' when nothing)."""
  if not root:
    return "no cache given"
  path = epath.Path(root)
  if not path.is_dir():
    return "not a directory"
  missing = [f"{side}/{CACHE_INFO}" for side in sides
             if not (path / str(side) / CACHE_INFO).is_file()]
  if missing:
    return f"no {', '.join(missing)} (a missing or unfinished sub-cache)"
  return ""


def _cache_draws(section: ml_collections.ConfigDict) -> tuple[list[int], dict[str, float]]:
  """(sides, {task: weight}) a stage reads from the caches: pretrain kinds by their
  resolutions and weights, rl and distill at `data.size` by their edit fraction."""
  data = section.get("data")
  if not isinstance(data, ml_collections.ConfigDict):
    return [], {}
  if section.get("kind") in ("rl", "distill") and "size" in data:
    edit = float(section.edit_fraction if section.kind == "rl" else data.edit_fraction)
    return [int(data.size)], {"t2i": 1.0 - edit, "edit": edit}
  sides = [int(side) for side, _ in data.get("resolutions") or ()]
  return sides, {task: data.get(f"{task}_weight") or 0 for task in ("t2i", "edit")}


def _check_caches(config: ml_collections.ConfigDict, names: list[str]) -> None:
  for name in names:
    sides, weights = _cache_draws(config[name])
    field = {"rl": "edit_fraction", "distill": "data.edit_fraction"}.get(
        config[name].get("kind"), "data.{task}_weight")
    for task in ("t2i", "edit"):
      weight = weights.get(task, 0)
      if weight <= 0:
        continue
      root = config.data[f"{task}_cache"]
      problem = _cache_problem(root, sides)
      if problem:
        raise ConfigError(
            f"config.data.{task}_cache = {root!r}: {problem}; stage {name!r} draws {task} rows "
            f"(config.{name}.{field.format(task=task)} gives weight {weight}) at sides {sides} "
            f"(build it with python -m data_pipelines.build_cache)")


def _check_weight_folders(config: ml_collections.ConfigDict, names: list[str]) -> None:
  vae = config.model.vae_checkpoint
  has_vae_stage = config.get("vae") is not None and config.vae.get("kind") == "vae"
  needs_vae = [n for n in names if config[n].kind != "vae"]
  if not vae and needs_vae and not has_vae_stage:
    raise ConfigError(f"config.model.vae_checkpoint = '': stage {needs_vae[0]!r} needs a VAE and "
                      f"this job has no 'vae' stage; set it to a diffusers AutoencoderTiny "
                      f"folder or a VAE training run")
  if vae:
    path = epath.Path(vae)
    run = (path / "checkpoints").is_dir()
    diffusers = ((path / "config.json").is_file()
                 and (path / "diffusion_pytorch_model.safetensors").is_file())
    if not (run or diffusers):
      what = ("not a directory" if not path.is_dir() else
              "neither a training run (checkpoints/) nor a diffusers AutoencoderTiny folder "
              "(config.json + diffusion_pytorch_model.safetensors)")
      raise ConfigError(f"config.model.vae_checkpoint = {vae!r}: {what}")
  for name in names:
    reward = config[name].get("reward")
    if config[name].get("kind") == "rl" and reward is not None and reward.name == "clip":
      if not reward.path or not epath.Path(reward.path).is_dir():
        raise ConfigError(f"config.{name}.reward.path = {reward.path!r}: the clip reward needs "
                          f"a local CLIP folder (transformers layout, safetensors)")
  for name in names:
    parent = config[name].get("parent", "")
    if parent and is_model_path(parent) and not (
        (epath.Path(parent) / "checkpoints").is_dir() or find_unet_dir(parent)):
      raise ConfigError(f"config.{name}.parent = {parent!r}: neither a training run "
                        f"(checkpoints/) nor a diffusers DreamLite folder (unet/)")
  spec = config.model.text_encoder.spec
  if spec and not spec.startswith("tiny:") and not epath.Path(spec).is_dir():
    raise ConfigError(f"config.model.text_encoder.spec = {spec!r}: not a directory (a local "
                      f"Qwen3-VL folder; or 'tiny:SEED', or '' for none)")


def _check_devices(config: ml_collections.ConfigDict, names: list[str], device_count: int,
                   process_count: int) -> None:
  mesh = config.mesh
  axes = {a: mesh[a] for a in mesh_lib.MESH_AXES}
  try:
    shape = dict(zip(mesh_lib.MESH_AXES, mesh_lib.mesh_shape(mesh, device_count)))
  except ConfigError as e:
    why = str(e).removeprefix("config.mesh: ")
    raise ConfigError(f"config.mesh = {axes}: does not fit jax.device_count() = {device_count} "
                      f"({process_count} process(es)): {why}") from e
  shards = shape["data"] * shape["fsdp"]
  for name in names:
    section = config[name]
    prompts = section.get("prompts_per_iteration")
    if section.get("kind") == "rl" and prompts is not None and prompts % process_count:
      raise ConfigError(f"config.{name}.prompts_per_iteration = {prompts}: must be divisible "
                        f"by jax.process_count() = {process_count} (each process rolls out "
                        f"its prompts)")
    if not _has(section, "train.batch_size"):
      continue
    batch = section.train.batch_size
    if batch % shards:
      raise ConfigError(
          f"config.{name}.train.batch_size = {batch}: must be divisible by the {shards} data "
          f"shards of the mesh (data x fsdp = {shape['data']} x {shape['fsdp']} on "
          f"{device_count} devices)")
    if batch % process_count:
      raise ConfigError(f"config.{name}.train.batch_size = {batch}: must be divisible by "
                        f"jax.process_count() = {process_count} (each process loads its rows)")


def check_job_environment(config: ml_collections.ConfigDict, names: list[str], *,
                          device_count: int, process_count: int) -> None:
  """What running `names` needs from this machine (after `validate_job`): the caches the
  stages draw from (cache source), the VAE and text-encoder folders, the mesh against
  `device_count`, each stage's global batch against the data shards and `process_count`."""
  if config.data.source == "cache":
    _check_caches(config, names)
  _check_weight_folders(config, names)
  _check_devices(config, names, device_count, process_count)
