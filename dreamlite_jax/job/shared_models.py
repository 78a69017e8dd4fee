"""The frozen parts every stage of a job shares: text encoder, VAE, U-Net module, data.

Built lazily (a job that only converts never renders training data) and once
per job. The VAE's params come from the job's `vae` stage, or from
`config.model.vae_checkpoint`: a training run's directory or a diffusers
`AutoencoderTiny` folder (the released TAESD weights). The text encoder is
`config.model.text_encoder.spec` (`tiny:SEED` = the tiny Qwen3, random init with
that seed, frozen, with the real Qwen tokenizer; or a local Qwen3-VL folder); ''
means none: stages that train on embedding caches read precomputed features.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from data_pipelines import shapes
from dreamlite_jax.config import ConfigError
from dreamlite_jax.job import records
from dreamlite_jax.models import channel_concat
from dreamlite_jax.models import weights
from dreamlite_jax.models.unet import DreamLiteUNet, UNetConfig
from dreamlite_jax.models.vae import TinyAutoencoder, VAEConfig
from dreamlite_jax.pipeline import Pipeline, build_text_encoder
from dreamlite_jax.training import checkpoints
from dreamlite_jax.training import shapes_data


class SharedModels:
  """Lazily built shared models and data of a job rooted at `workdir`."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.workdir = workdir if "://" in workdir else os.path.abspath(workdir)
    self._vae_params = None
    self._text_encoder = None
    self._pipeline = None
    self._data: dict[str, Any] = {}

  @functools.cached_property
  def unet_config(self):
    return UNetConfig.from_dict(self.config.model.unet.to_dict())

  @functools.cached_property
  def unet(self):
    """The denoiser module; `config.model.conditioning = "channel"` selects the ablation."""
    mode = self.config.model.conditioning
    if mode == "spatial":
      return DreamLiteUNet(self.unet_config)
    if mode == "channel":
      return channel_concat.ChannelConcatUNet(channel_concat.channel_config(self.unet_config))
    raise ConfigError(f"config.model.conditioning = {mode!r}: expected one of "
                      f"{channel_concat.CONDITIONING}")

  @functools.cached_property
  def vae_config(self):
    return VAEConfig.from_dict(self.config.model.vae.to_dict())

  @functools.cached_property
  def vae(self):
    return TinyAutoencoder(self.vae_config)

  @property
  def vae_workdir(self) -> str:
    return self.config.model.vae_checkpoint or os.path.join(self.workdir, "vae")

  @property
  def vae_params(self) -> Any:
    """The VAE's params: the trained (EMA) ones of a run, or a diffusers folder's."""
    if self._vae_params is None:
      if _is_diffusers_vae(self.vae_workdir):
        self._vae_params = _load_diffusers_vae(self.vae_workdir, self.vae_config)
        return self._vae_params
      if not os.path.isdir(os.path.join(self.vae_workdir, "checkpoints")):
        raise FileNotFoundError(f"no VAE checkpoint in {self.vae_workdir}: run the 'vae' stage "
                                f"first or set config.model.vae_checkpoint")
      # Host numpy: uncommitted, so jitted VAE calls follow the other arguments' devices
      # (e.g. latents sampled with params sharded over the whole mesh).
      self._vae_params = checkpoints.as_numpy(checkpoints.load_params(self.vae_workdir, ema=True))
    return self._vae_params

  @property
  def text_encoder(self):
    """The frozen text encoder, or None when `model.text_encoder.spec` is ''."""
    te = self.config.model.text_encoder
    if self._text_encoder is None and te.spec:
      self._text_encoder = build_text_encoder(te.spec, te.text_length)
    return self._text_encoder

  @property
  def image_size(self) -> int:
    return int(self.config.data.image_size)

  def pipeline(self, unet_params: Any):
    """A `Pipeline` over the shared text encoder, U-Net module and trained VAE."""
    if self._pipeline is None:
      # Built once: every stage's pipeline shares its jitted sampler (one compilation per mode).
      vae_scale = self.vae_config.downsample_factor
      self._pipeline = Pipeline(self.text_encoder, self.unet, unet_params, self.vae,
                                self.vae_params, vae_scale=vae_scale,
                                size_multiple=vae_scale * self.unet_config.downsample_factor)
    return self._pipeline.with_unet_params(unet_params)

  def _raw_inputs(self) -> dict:
    d = self.config.data
    return {"renderer": "shapes_data.build_raw", "num_t2i": int(d.num_t2i),
            "num_edit": int(d.num_edit), "image_size": int(d.image_size), "seed": int(d.seed),
            "world": shapes.world()}

  def _vae_identity(self) -> dict:
    """Which trained VAE the cached latents come from: the `vae` stage's run (its
    DONE record's id), or an external checkpoint directory, its steps and the
    modification time of the latest."""
    if not self.config.model.vae_checkpoint:
      record = records.read_done(self.workdir, "vae") or {}
      return {"vae_stage_run": record.get("run_id", record.get("finished_at"))}
    if _is_diffusers_vae(self.vae_workdir):
      path = os.path.join(os.path.abspath(self.vae_workdir), "diffusion_pytorch_model.safetensors")
      return {"vae_folder": os.path.dirname(path), "modified_ns": os.stat(path).st_mtime_ns}
    directory = os.path.join(os.path.abspath(self.vae_workdir), "checkpoints")
    steps = sorted(int(n) for n in os.listdir(directory) if n.isdigit())
    latest = os.path.join(directory, str(steps[-1])) if steps else directory
    return {"vae_checkpoint": directory, "steps": steps,
            "modified_ns": os.stat(latest).st_mtime_ns}

  def raw_data(self) -> dict[str, np.ndarray]:
    """Rendered training examples (`shapes_data.build_raw`), cached in `<workdir>/data/`."""
    if "raw" not in self._data:
      d = self.config.data
      self._data["raw"] = shapes_data.load_or_build(
          os.path.join(self.workdir, "data", "raw.npz"),
          lambda: shapes_data.build_raw(d.num_t2i, d.num_edit, d.image_size, d.seed),
          self._raw_inputs(), write=jax.process_index() == 0)
    return self._data["raw"]

  def encoded_data(self) -> dict[str, np.ndarray]:
    """Latents + text features of the training examples (after the VAE stage), cached;
    rebuilt when the data, the VAE run or the text encoder changed."""
    if "encoded" not in self._data:
      vae, params = self.vae, self.vae_params
      enc = jax.jit(lambda p, x: vae.apply({"params": p}, x.astype("float32") / 127.5 - 1.0,
                                           method="encode"))
      te = self.config.model.text_encoder
      inputs = {"raw": self._raw_inputs(), "vae": self._vae_identity(),
                "text_encoder": {"spec": te.spec, "text_length": int(te.text_length)}}
      self._data["encoded"] = shapes_data.load_or_build(
          os.path.join(self.workdir, "data", "encoded.npz"),
          lambda: shapes_data.encode(self.raw_data(), lambda x: enc(params, x),
                                     self.text_encoder), inputs, write=jax.process_index() == 0)
    return self._data["encoded"]


def _is_diffusers_vae(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, "diffusion_pytorch_model.safetensors"))


def _load_diffusers_vae(directory: str, expected: VAEConfig) -> Any:
  """Params of an `AutoencoderTiny` folder; its config must be the job's `model.vae`."""
  found, params = weights.load_vae_dir(directory)
  if found != expected:
    raise ConfigError(f"config.model.vae_checkpoint = {directory!r} holds a VAE with {found}, "
                      f"but config.model.vae is {expected}")
  return checkpoints.as_numpy(params)
