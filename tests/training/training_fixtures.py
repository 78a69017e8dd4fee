"""A tiny denoiser, a deterministic resumable data stream and a tiny config for trainer tests.

The denoiser is a small stand-in with the same call signature and logical axis
names as `DreamLiteUNet`, so a train step compiles in about a second on CPU;
the objective is the real `pretrain_loss` flow-matching loss.
"""
from __future__ import annotations

import os
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dreamlite_jax.training import pretrain_loss
from experiments import train_defaults

LATENT = 4     # target latent is [LATENT, LATENT, 4]; the canvas [LATENT, 2 * LATENT, 4]
TEXT_LEN = 3
TEXT_DIM = 8
WIDTH = 16


def _param(module, name, init, axes, shape):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


class TinyDenoiser(nn.Module):
  """`(sample [B, H, 2W, 4], timestep [B], text [B, L, D], text_mask [B, L], time_ids [B, 2])
  -> velocity [B, H, 2W, 4]`, every param with logical axis names."""
  width: int = WIDTH
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, sample, timestep, text, text_mask, time_ids):
    f = self.width
    conv = lambda x, name, cin, cout: jax.lax.conv_general_dilated(
        x.astype(self.dtype), _param(self, name, nn.initializers.lecun_normal(),
                                     ("conv_height", "conv_width", "conv_in", "conv_out"),
                                     (3, 3, cin, cout)).astype(self.dtype),
        (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    dense = lambda x, name, axes, cin, cout: x.astype(self.dtype) @ _param(
        self, name, nn.initializers.lecun_normal(), axes, (cin, cout)).astype(self.dtype)
    half = f // 2
    freqs = jnp.exp(-jnp.log(10000.0) * jnp.arange(half) / half)
    temb = jnp.concatenate([jnp.sin(timestep[:, None] * freqs), jnp.cos(timestep[:, None] * freqs)], -1)
    temb = dense(temb, "time", ("embed", "mlp"), f, f)
    mask = text_mask[..., None].astype(jnp.float32)
    pooled = jnp.sum(text * mask, 1) / jnp.maximum(jnp.sum(mask, 1), 1.0)
    temb = temb + dense(pooled, "text", ("embed", "mlp"), TEXT_DIM, f)
    h = conv(sample, "conv_in", 4, f) + temb[:, None, None, :]
    h = h + _param(self, "bias", nn.initializers.zeros, ("norm",), (f,))
    h = nn.silu(h)
    h = h + dense(nn.silu(dense(h, "mlp_in", ("embed", "mlp"), f, 2 * f)),
                  "mlp_out", ("mlp", "embed"), 2 * f, f)
    return conv(nn.silu(h), "conv_out", f, 4).astype(jnp.float32)


def tiny_config(**train_overrides) -> ml_collections.ConfigDict:
  """The trainer's sections at test scale (8 examples, fp32, constant lr)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.train = train_defaults.train_config(
      steps=6, batch_size=8, lr=1e-2, schedule="constant", warmup_steps=0, ema_decay=0.9,
      log_every=1, checkpoint_every=2, keep_checkpoints=5, progress_bar=False)
  config.train.update(train_overrides)
  config.mesh = train_defaults.mesh_config(data=-1, fsdp=1, tensor=1, max_replicated_fraction=1.0)
  config.init_from = train_defaults.init_from_config()
  return config


def make_model_fns(model: nn.Module | None = None):
  """(init_params(rng) -> boxed params, loss_fn(params, batch, rng)) for `model`
  (default the stand-in; any module with the DreamLiteUNet call signature)."""
  model = model or TinyDenoiser()
  b = 1
  dummy = (jnp.zeros((b, LATENT, 2 * LATENT, 4)), jnp.zeros((b,)), jnp.zeros((b, TEXT_LEN, TEXT_DIM)),
           jnp.ones((b, TEXT_LEN)), jnp.zeros((b, 2)))
  init_params = lambda rng: model.init(rng, *dummy)["params"]
  loss_fn = pretrain_loss.make_pretrain_loss(pretrain_loss.unet_predict_fn(model))
  return init_params, loss_fn


def make_batch(index: int, batch_size: int, seed: int = 0, process: int = 0) -> dict[str, np.ndarray]:
  """Batch number `index` of a deterministic stream (host `process` gets its own rows)."""
  rng = np.random.default_rng([seed, index, process])
  latents = rng.normal(size=(batch_size, LATENT, LATENT, 4)).astype(np.float32)
  # A learnable signal: the latent mean follows the first text feature.
  text = rng.normal(size=(batch_size, TEXT_LEN, TEXT_DIM)).astype(np.float32)
  latents += text[:, :1, :1, None] * 2.0
  mask = np.ones((batch_size, TEXT_LEN), np.float32)
  mask[:, -1] = rng.integers(0, 2, size=batch_size)
  return {"latents": latents, "text": text, "text_mask": mask}


class SyntheticStream:
  """Resumable iterator over `make_batch`; `get_state`/`set_state` like a grain iterator.

  `nan_at`: batch indices whose latents hold a NaN. `signal_at`: {index: signum}
  sends that signal to this process when the batch is fetched; `delay` seconds of
  sleep per batch stand in for a slow input pipeline (test hooks).
  """

  def __init__(self, batch_size: int, seed: int = 0, process: int = 0,
               nan_at: tuple[int, ...] = (), signal_at: dict[int, int] | None = None,
               delay: float = 0.0):
    self.batch_size, self.seed, self.process, self.delay = batch_size, seed, process, delay
    self.nan_at, self.signal_at = set(nan_at), dict(signal_at or {})
    self.index = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.delay:
      time.sleep(self.delay)
    batch = make_batch(self.index, self.batch_size, self.seed, self.process)
    if self.index in self.nan_at:
      batch["latents"][0, 0, 0, 0] = np.nan
    if self.index in self.signal_at:
      os.kill(os.getpid(), self.signal_at[self.index])
    self.index += 1
    return batch

  def get_state(self) -> dict:
    return {"index": self.index, "seed": self.seed}

  def set_state(self, state: dict) -> None:
    if state["seed"] != self.seed:
      raise ValueError(f"data state seed {state['seed']} != stream seed {self.seed}")
    self.index = int(state["index"])


SIGNALS = {"TERM": signal.SIGTERM, "KILL": signal.SIGKILL, "INT": signal.SIGINT}
