"""Tiny diffusers DreamLite pipelines for parity tests (no text encoder, no downloads).

`encode_prompt` is replaced by a function returning fixed features, and the
source image is passed as a 4-channel latent (the pipelines then skip the VAE),
so the real `__call__` runs its scheduler, CFG and U-Net loop unchanged.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from diffusers import (AutoencoderTiny, DreamLiteMobilePipeline, DreamLitePipeline,
                       FlowMatchEulerDiscreteScheduler)
from diffusers.models.unets.unet_dreamlite import DreamLiteUNetModel

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64),
    layers_per_block=1, norm_num_groups=8, cross_attention_dim=48,
    transformer_layers_per_block=(1, 1, 1), encoder_hid_dim=40,
    encoder_hid_dim_type="text_proj_rms", attention_head_dim=(1, 2, 2),
    use_linear_projection=True, addition_embed_type="time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=16, ff_mult=3, num_kv_heads=1, qk_norm="rms_norm",
    use_sep_conv=True)
TEXT_DIM = 40


@contextlib.contextmanager
def _one_thread():
  """Tiny models: intra-op threads only contend on a shared CPU (restored after)."""
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    with torch.no_grad():
      yield
  finally:
    torch.set_num_threads(before)


class _NoTextEncoder(torch.nn.Module):
  """Stands in for Qwen3-VL: the pipelines only read its device and dtype."""

  def __init__(self):
    super().__init__()
    self.unused = torch.nn.Parameter(torch.zeros(1))

  device = property(lambda self: torch.device("cpu"))
  dtype = property(lambda self: torch.float32)


def tiny_unet(seed: int = 0, **overrides) -> DreamLiteUNetModel:
  torch.manual_seed(seed)
  return DreamLiteUNetModel(**{**TINY_UNET, **overrides}).eval()


def dreamlite_scheduler() -> FlowMatchEulerDiscreteScheduler:
  return FlowMatchEulerDiscreteScheduler(
      use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
      max_image_seq_len=4096, time_shift_type="exponential")


def make_pipeline(unet: DreamLiteUNetModel, mobile: bool, embeds: np.ndarray, mask: np.ndarray):
  """A pipeline whose `encode_prompt` returns rows of `embeds`/`mask` ([N, L, D], [N, L]).

  The pipelines ask for [neg, pos] (T2I), [neg, neg, pos] (edit) or [pos] (mobile);
  they get the last len(prompts) rows, so callers order rows accordingly.
  """
  vae = AutoencoderTiny(encoder_block_out_channels=(4, 4, 4, 4), decoder_block_out_channels=(4, 4, 4, 4),
                        num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1))
  cls = DreamLiteMobilePipeline if mobile else DreamLitePipeline
  pipe = cls(text_encoder=_NoTextEncoder(), tokenizer=None, processor=None, vae=vae, unet=unet,
             scheduler=dreamlite_scheduler())
  pipe.set_progress_bar_config(disable=True)
  embeds_t, mask_t = torch.from_numpy(embeds), torch.from_numpy(mask).long()

  def encode_prompt(mode, prompts, device, dtype, **unused):
    n = len(prompts)
    return embeds_t[-n:].to(dtype), mask_t[-n:]

  pipe.encode_prompt = encode_prompt
  return pipe


def reference_latents(pipe, seed: int, height: int, width: int, steps: int,
                      source_latents: np.ndarray | None = None, **guidance) -> tuple[np.ndarray, np.ndarray]:
  """Runs the pipeline; returns (initial noise, final latents), both NHWC numpy."""
  h, w = height // 8, width // 8
  noise = torch.randn((1, 4, h, w), generator=torch.Generator().manual_seed(seed))
  image = None if source_latents is None else torch.from_numpy(source_latents).permute(0, 3, 1, 2)
  with _one_thread():
    out = pipe(prompt="unused", image=image, height=height, width=width, num_inference_steps=steps,
               generator=torch.Generator().manual_seed(seed), output_type="latent", **guidance)
  to_nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
  return to_nhwc(noise), to_nhwc(out.images)


def torch_velocity(unet: DreamLiteUNetModel, canvas: np.ndarray, timestep: np.ndarray,
                   text: np.ndarray, text_mask: np.ndarray, time_ids: np.ndarray) -> np.ndarray:
  """The torch U-Net on an NHWC canvas (for sampler-only parity via a host callback)."""
  with _one_thread():
    out = unet(torch.from_numpy(np.array(canvas)).permute(0, 3, 1, 2),
               timestep=torch.from_numpy(np.array(timestep)),
               encoder_hidden_states=torch.from_numpy(np.array(text)),
               encoder_attention_mask=torch.from_numpy(np.array(text_mask)),
               added_cond_kwargs={"time_ids": torch.from_numpy(np.array(time_ids))},
               return_dict=False)[0]
  return out.permute(0, 2, 3, 1).numpy()
