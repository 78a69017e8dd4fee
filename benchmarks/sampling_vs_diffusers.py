"""Sampling, ours vs the diffusers DreamLite pipelines, same weights, fp32 on CPU.

  python -m benchmarks.sampling_vs_diffusers [--configs reduced] [--size 128] [--repeats 3]

- `cfg28`: 28-step Euler with text CFG 3.5: our jitted `sampling.euler_sample`
  over `DreamLiteUNet` vs `DreamLitePipeline.__call__` (its scheduler, CFG
  batching and U-Net loop, unchanged);
- `mobile4`: 4-step CFG-free `sampling.few_step_sample` vs
  `DreamLiteMobilePipeline.__call__`.
Both pipelines run with precomputed text features (their `encode_prompt` is
replaced by a function returning the same features we use) and
`output_type="latent"`, so no text encoder or VAE runs on either side: this
times the denoising loop only. Both start from the same noise; the max
difference of the final latents is printed as a parity check. Timed calls are
interleaved (ours, theirs, ours, ...). The last line is the headline
`speedup_vs_diffusers_sampling` (reduced config, cfg28).
"""
from __future__ import annotations

import argparse
from typing import Callable

from benchmarks import timing  # first: sets OpenMP's wait policy before torch loads

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks.train_step_vs_torch import SETUPS, torch_unet
from dreamlite_jax.diffusion import flow
from dreamlite_jax.diffusion import sampling
from dreamlite_jax.models import weights
from dreamlite_jax.models.unet import DreamLiteUNet, UNetConfig

GUIDANCE = 3.5
TEXT_LEN = 32


class _NoTextEncoder(torch.nn.Module):
  """Stands in for Qwen3-VL: the pipelines only read its device and dtype."""

  def __init__(self):
    super().__init__()
    self.unused = torch.nn.Parameter(torch.zeros(1))

  device = property(lambda self: torch.device("cpu"))
  dtype = property(lambda self: torch.float32)


def make_pipeline(unet, mobile: bool, embeds: np.ndarray, mask: np.ndarray):
  """A diffusers pipeline whose `encode_prompt` returns the last N rows of `embeds`/`mask`.

  `DreamLitePipeline` asks for [negative, prompt]; the mobile one for [prompt].
  """
  from diffusers import (AutoencoderTiny, DreamLiteMobilePipeline, DreamLitePipeline,
                         FlowMatchEulerDiscreteScheduler)
  vae = AutoencoderTiny(encoder_block_out_channels=(4, 4, 4, 4), decoder_block_out_channels=(4, 4, 4, 4),
                        num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1))
  scheduler = FlowMatchEulerDiscreteScheduler(
      use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
      max_image_seq_len=4096, time_shift_type="exponential")
  cls = DreamLiteMobilePipeline if mobile else DreamLitePipeline
  pipe = cls(text_encoder=_NoTextEncoder(), tokenizer=None, processor=None, vae=vae, unet=unet,
             scheduler=scheduler)
  pipe.set_progress_bar_config(disable=True)
  embeds_t, mask_t = torch.from_numpy(embeds), torch.from_numpy(mask).long()

  def encode_prompt(mode, prompts, device, dtype, **unused):
    return embeds_t[-len(prompts):].to(dtype), mask_t[-len(prompts):]

  pipe.encode_prompt = encode_prompt
  return pipe


def features(unet_config: UNetConfig, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Rows [negative, prompt] of text features [2, L, D] and masks [2, L]."""
  rng = np.random.default_rng(seed)
  embeds = rng.standard_normal((2, TEXT_LEN, unet_config.encoder_hid_dim)).astype(np.float32)
  mask = np.ones((2, TEXT_LEN), np.float32)
  mask[0, 4:] = 0.0  # the empty negative prompt is short
  mask[1, 20:] = 0.0
  return embeds, mask


def our_sampler(unet_config: UNetConfig, params, size: int, steps: int, cfg: bool,
                embeds: np.ndarray, mask: np.ndarray) -> Callable[[jax.Array], jax.Array]:
  """Jitted `noise [1, h, w, 4] -> latents` for `size`px, with or without CFG."""
  model = DreamLiteUNet(unet_config)
  sigmas = flow.schedule_for_size(steps, size, size)

  def velocity(canvas, timestep, cond):
    return model.apply({"params": params}, canvas, timestep, cond["text"], cond["text_mask"],
                       cond["time_ids"])

  time_ids = jnp.array([[size, size]], jnp.float32)
  row = lambda i: {"text": jnp.asarray(embeds[i:i + 1]), "text_mask": jnp.asarray(mask[i:i + 1]),
                   "time_ids": time_ids}

  def run(noise):
    condition = jnp.zeros_like(noise)
    if cfg:
      return sampling.euler_sample(velocity, noise, condition, sigmas, row(1), row(0), GUIDANCE)
    return sampling.few_step_sample(velocity, noise, condition, sigmas, row(1))
  return jax.jit(run)


def run_case(name: str, unet_config: UNetConfig, size: int, steps: int, cfg: bool,
             repeats: int, warmup: int) -> float:
  unet = torch_unet(unet_config).eval()
  state_dict = {k: v.detach().numpy() for k, v in unet.state_dict().items()}
  params = weights.params_from_state_dict(state_dict, weights.unet_abstract_params(unet_config))
  embeds, mask = features(unet_config)
  pipe = make_pipeline(unet, mobile=not cfg, embeds=embeds if cfg else embeds[1:],
                       mask=mask if cfg else mask[1:])
  h = size // 8
  # The pipelines draw their initial latents exactly like this from `generator`.
  noise_t = torch.randn((1, 4, h, h), generator=torch.Generator().manual_seed(1))
  noise = jnp.asarray(noise_t.permute(0, 2, 3, 1).numpy())
  ours_fn = our_sampler(unet_config, params, size, steps, cfg, embeds, mask)
  guidance = {"guidance_scale": GUIDANCE} if cfg else {}
  result = {}

  def ours():
    result["ours"] = np.asarray(jax.block_until_ready(ours_fn(noise)))

  def theirs():
    with torch.no_grad():
      out = pipe(prompt="unused", height=size, width=size, num_inference_steps=steps,
                 generator=torch.Generator().manual_seed(1), output_type="latent", **guidance)
    result["theirs"] = out.images.permute(0, 2, 3, 1).numpy()

  times = timing.interleaved({"ours": ours, "diffusers": theirs}, warmup=warmup, repeats=repeats)
  scale = max(1.0, float(np.abs(result["theirs"]).max()))
  print(f"{name}_size: {size}x{size} steps {steps} cfg {GUIDANCE if cfg else 'none'}")
  print(f"{name}_latents_max_abs_diff: {float(np.abs(result['ours'] - result['theirs']).max()) / scale:.2e}")
  medians = {k: timing.report(f"{name}_{k}", v) for k, v in times.items()}
  speedup = medians["diffusers"] / medians["ours"]
  print(f"{name}_speedup_vs_diffusers: {speedup:.3f}")
  return speedup


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default="reduced", help=f"comma list of {sorted(SETUPS)}")
  parser.add_argument("--size", type=int, default=128, help="image side in pixels")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=1)
  args = parser.parse_args()
  names = args.configs.split(",")
  unknown = [n for n in names if n not in SETUPS]
  if unknown:
    parser.error(f"unknown --configs {unknown}; choose from {sorted(SETUPS)}")
  print(f"device: {jax.devices()[0].device_kind} torch_threads {torch.get_num_threads()}")
  speedups = {}
  for name in names:
    config = SETUPS[name].unet
    speedups[name, "mobile4"] = run_case(f"{name}_mobile4", config, args.size, 4, False,
                                         args.repeats, args.warmup)
    speedups[name, "cfg28"] = run_case(f"{name}_cfg28", config, args.size, 28, True,
                                       args.repeats, args.warmup)
  first = names[0]
  print(f"speedup_vs_diffusers_mobile4: {speedups[first, 'mobile4']:.3f}")
  print(f"speedup_vs_diffusers_sampling: {speedups[first, 'cfg28']:.3f}")


if __name__ == "__main__":
  main()
