"""DreamLite for users: `generate()` text-to-image and `edit()` instruction editing.

A `Pipeline` holds the three frozen parts and their params: the text encoder
(`TextEncoder`, Qwen3-VL plus DreamLite's templates), the U-Net and the VAE. It
can be built from in-memory params (tests, the trainer's periodic samples) or
from any model `dreamlite_jax.model_ref` names (`load_pipeline`): a training run,
a job's stage directory, or a diffusers DreamLite folder such as the release. Sampling follows
`DreamLitePipeline`: shifted flow-matching sigmas, Euler steps, text CFG for
generation and dual (text + image) guidance for editing; `guidance=0` gives
the CFG-free few-step sampler of distilled (mobile) checkpoints (None, too).

CLI (`--model` and `--checkpoint` are the same option):
  python -m dreamlite_jax.pipeline generate --model DIR --prompt "a red circle" --out a.png
  python -m dreamlite_jax.pipeline edit --model DIR --image in.png --instruction "make it blue" --out b.png
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import os
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dreamlite_jax import model_ref
from dreamlite_jax.diffusion import flow
from dreamlite_jax.diffusion import sampling
# Part of this module's API (shared_models and build_cache build encoders through it).
from dreamlite_jax.model_ref import build_text_encoder, read_run_config  # noqa: F401
from dreamlite_jax.models.unet import DreamLiteUNet
from dreamlite_jax.models.vae import TinyAutoencoder

ImageLike = Image.Image | np.ndarray


def _velocity_fn(unet, params):
  def velocity(canvas, timestep, cond):
    return unet.apply({"params": params}, canvas, timestep, cond["text"], cond["text_mask"],
                      cond["time_ids"])
  return velocity


def _denoise(unet, params, noise, condition, sigmas, cond, uncond, guidance, image_guidance):
  """Whole sampling loop, jitted once per (batch shape, guidance mode)."""
  velocity = _velocity_fn(unet, params)
  if uncond is None:
    return sampling.few_step_sample(velocity, noise, condition, sigmas, cond)
  return sampling.euler_sample(velocity, noise, condition, sigmas, cond, uncond, guidance,
                               image_guidance)


def _sampling_placement(params: Any) -> Any:
  """Params committed to this process's first device, unless sharded.

  The jitted sampler is keyed on where its arguments live: the same U-Net from a
  checkpoint, from the trainer's mesh and from host memory would otherwise compile
  the same program three times (5-8 s each for the tiny U-Net on XLA:CPU). Params
  with any leaf sharded across devices (FSDP, tensor parallel) stay where they are,
  all of them: one jitted call cannot mix leaves on one device with leaves on a mesh.
  """
  def sharded(x):
    return isinstance(x, jax.Array) and not (x.is_fully_addressable
                                             and x.sharding.is_fully_replicated)

  if any(sharded(x) for x in jax.tree.leaves(params)):
    return params
  return jax.device_put(params, jax.local_devices()[0])


def _vae_call(vae, params, x, method: str):
  return vae.apply({"params": params}, x, method=method)


def to_uint8(images: jax.Array) -> np.ndarray:
  """[-1, 1] float images [B, H, W, 3] -> uint8 (as diffusers' postprocess rounds)."""
  x = np.clip(np.asarray(images, np.float32) / 2.0 + 0.5, 0.0, 1.0)
  return np.round(x * 255.0).astype(np.uint8)


def _as_size(size: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(size, int):
    return size, size
  size = tuple(int(s) for s in size)
  if len(size) != 2:
    raise ValueError(f"size must be an int or (height, width), got {size}")
  return size


def load_image(image: ImageLike, size: tuple[int, int]) -> np.ndarray:
  """A PIL image or uint8 [H, W, 3] array -> float32 [height, width, 3] in [-1, 1] (Lanczos)."""
  if isinstance(image, np.ndarray):
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise ValueError(f"image arrays must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    image = Image.fromarray(image)
  if not isinstance(image, Image.Image):
    raise TypeError(f"expected a PIL image or a uint8 array, got {type(image).__name__}")
  height, width = size
  image = image.convert("RGB")
  if image.size != (width, height):
    image = image.resize((width, height), Image.LANCZOS)
  return np.asarray(image, np.float32) / 127.5 - 1.0


@dataclasses.dataclass
class Pipeline:
  """Text encoder + U-Net + VAE with params, and the sampling defaults.

  Attributes:
    text_encoder: `dreamlite_jax.models.text_conditioning.TextEncoder` (holds its params).
    unet: `DreamLiteUNet`; unet_params its params.
    vae: `TinyAutoencoder`; vae_params its params.
    shift: resolution-dependent sigma shift of the schedule.
    size_multiple: image sides must be multiples of this (vae_scale x the U-Net's total
      downsampling).
    vae_scale: pixels per latent cell (8 for DreamLite's VAE; the tiny shapes VAE is 4x).
  """
  text_encoder: Any
  unet: Any
  unet_params: Any
  vae: Any
  vae_params: Any
  shift: flow.ShiftConfig = flow.ShiftConfig()
  size_multiple: int = 32
  vae_scale: int = flow.VAE_SCALE

  def __post_init__(self):
    self.unet_params = _sampling_placement(self.unet_params)
    self._denoise = jax.jit(functools.partial(_denoise, self.unet))
    self._encode = jax.jit(functools.partial(_vae_call, self.vae, method="encode"))
    self._decode = jax.jit(functools.partial(_vae_call, self.vae, method="decode"))

  # ---------------------------------------------------------------- helpers

  def _check_size(self, size: tuple[int, int]) -> None:
    if size[0] % self.size_multiple or size[1] % self.size_multiple or min(size) <= 0:
      raise ValueError(f"image size {size[0]}x{size[1]} must be positive multiples of "
                       f"{self.size_multiple}")

  def _noise(self, seed: int, batch: int, size: tuple[int, int], noise=None) -> jax.Array:
    shape = (size[0] // self.vae_scale, size[1] // self.vae_scale, 4)
    if noise is not None:
      noise = jnp.asarray(noise, jnp.float32)
      if noise.shape != (batch, *shape):
        raise ValueError(f"noise must be [{batch}, {shape[0]}, {shape[1]}, 4] for {batch} "
                         f"image(s) of {size[0]}x{size[1]}, got {tuple(noise.shape)}")
      return noise
    # One key per image index, so image i depends only on (seed, i), not on the batch size.
    key = jax.random.PRNGKey(seed)
    return jnp.stack([jax.random.normal(jax.random.fold_in(key, i), shape) for i in range(batch)])

  @staticmethod
  def _cond(features, mask, size: tuple[int, int]) -> dict:
    batch = features.shape[0]
    time_ids = jnp.asarray(flow.size_ids(batch, size[0], size[1]))
    return {"text": jnp.asarray(features, jnp.float32), "text_mask": jnp.asarray(mask),
            "time_ids": time_ids}

  def _finish(self, latents: jax.Array, output: str):
    if output == "latent":
      return np.asarray(latents)
    images = to_uint8(self._decode(self.vae_params, latents))
    if output == "np":
      return images
    if output == "pil":
      return [Image.fromarray(im) for im in images]
    raise ValueError(f"output must be 'pil', 'np' or 'latent', got {output!r}")

  def denoise(self, noise: jax.Array, condition: jax.Array, cond: dict, uncond: dict | None,
              steps: int, guidance: float | None, image_guidance: float | None) -> jax.Array:
    """Runs the sampler on latents `[B, h, w, 4]`; returns final latents `[B, h, w, 4]`.

    `guidance` 0 (or None) samples without CFG (`uncond` is then unused);
    `image_guidance` 0 (or None) is text CFG, any other value dual guidance (three
    branches, even at 1). See `sampling.guidance_scales`.
    """
    # Padded to one length: every step count shares the compiled sampler of its mode.
    sigmas = jnp.asarray(sampling.pad_schedule(
        flow.sampling_sigmas(steps, self.shift.mu(*noise.shape[1:3]))))
    g, g_img = sampling.guidance_scales(guidance, image_guidance)
    if g is None:
      uncond = None
    else:
      g = jnp.float32(g)
      g_img = None if g_img is None else jnp.float32(g_img)
    return self._denoise(self.unet_params, noise, condition, sigmas, cond, uncond, g, g_img)

  # ---------------------------------------------------------------- public API

  def with_unet_params(self, unet_params: Any) -> "Pipeline":
    """The same pipeline (sharing its compiled functions) with other U-Net params."""
    other = copy.copy(self)
    other.unet_params = _sampling_placement(unet_params)
    return other

  def generate(self, prompts: str | Sequence[str], seed: int = 0, steps: int = 28,
               guidance: float | None = 3.5, size: int | Sequence[int] = 1024,
               output: str = "pil", noise=None):
    """Text-to-image.

    Args:
      prompts: one prompt or a list (one image each, batched).
      seed: images are a deterministic function of (seed, index in the batch).
      steps: Euler steps (28 base, 4 for distilled checkpoints).
      guidance: text CFG scale; 0 (or None) = no CFG (distilled checkpoints).
      size: int or (height, width) in pixels.
      output: "pil" (list of PIL images), "np" (uint8 [B, H, W, 3]) or "latent".
      noise: initial latents [B, H/vae_scale, W/vae_scale, 4] instead of the seed's (e.g.
        another implementation's, to compare with it).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
      raise ValueError("generate() needs at least one prompt")
    size = _as_size(size)
    self._check_size(size)
    b = len(prompts)
    guidance, _ = sampling.guidance_scales(guidance)
    cond = self._cond(*self.text_encoder.encode_generate(prompts), size)
    uncond = None
    if guidance is not None:
      uncond = self._cond(*self.text_encoder.encode_generate_unconditional(b), size)
    noise = self._noise(seed, b, size, noise)
    latents = self.denoise(noise, jnp.zeros_like(noise), cond, uncond, steps, guidance, None)
    return self._finish(latents, output)

  def edit(self, images: ImageLike | Sequence[ImageLike], instructions: str | Sequence[str],
           seed: int = 0, steps: int = 28, guidance: float | None = 3.5,
           image_guidance: float | None = 1.0, size: int | Sequence[int] | None = None,
           output: str = "pil", noise=None):
    """Instruction-based editing of source images.

    Args:
      images: PIL image(s) or uint8 [H, W, 3] array(s), one per instruction.
      instructions: edit instruction(s).
      guidance: text guidance `g`; 0 (or None) = no guidance at all (distilled
        checkpoints; `image_guidance` is then unused).
      image_guidance: image guidance `g_img` of the dual guidance
        `u + g (v_text - v_img) + g_img (v_img - u)` (3 network branches per
        step); 0, None or 1.0 = text CFG with the source in both branches (2
        branches; for g_img = 1 this is the same formula).
      size: output (height, width); default: the first source's size rounded
        down to `size_multiple`. Sources are resized to it (Lanczos).
      Others as in `generate`.
    """
    instructions = [instructions] if isinstance(instructions, str) else list(instructions)
    if isinstance(images, (Image.Image, np.ndarray)) and not (
        isinstance(images, np.ndarray) and images.ndim == 4):
      images = [images]
    images = list(images)
    if len(images) != len(instructions) or not images:
      raise ValueError(f"edit() needs one image per instruction, got {len(images)} images and "
                       f"{len(instructions)} instructions")
    if size is None:
      first = images[0]
      h, w = (first.size[1], first.size[0]) if isinstance(first, Image.Image) else first.shape[:2]
      m = self.size_multiple
      size = (max(m, h // m * m), max(m, w // m * m))
    size = _as_size(size)
    self._check_size(size)
    b = len(images)
    guidance, image_guidance = sampling.guidance_scales(guidance, image_guidance)
    pixels = jnp.asarray(np.stack([load_image(im, size) for im in images]))
    source = self._encode(self.vae_params, pixels)
    vision_images = pixels if getattr(self.text_encoder.config, "vision", None) is not None else None
    cond = self._cond(*self.text_encoder.encode_edit(instructions, vision_images), size)
    uncond = None
    if guidance is not None:
      uncond = self._cond(*self.text_encoder.encode_edit_unconditional(b, vision_images), size)
    if image_guidance == 1.0:
      # g_img = 1: u + g (v_text - v_img) + (v_img - u) = v_img + g (v_text - v_img), i.e.
      # text CFG whose negative branch keeps the source: two network branches, not three.
      image_guidance = None
    noise = self._noise(seed, b, size, noise)
    latents = self.denoise(noise, source, cond, uncond, steps, guidance, image_guidance)
    return self._finish(latents, output)


  def sample_cached(self, conditions: dict, steps: int = 28, guidance: float | None = 3.5,
                    image_guidance: float | None = 1.0, seed: int = 0) -> np.ndarray:
    """Samples precomputed conditions (a training batch of an embedding cache: `text`,
    `text_mask`, `null_text`, `null_text_mask`, `source_latents` (zeros for T2I rows),
    `time_ids`, and `latents` for the shape) -> uint8 images [B, H, W, 3].

    No text encoder runs: the features are the cached ones. T2I rows have a zero
    source, for which dual guidance reduces to text CFG, so one batch may mix both tasks.
    Guidance as in `edit` (0 or None = off).
    """
    latents = np.asarray(conditions["latents"])
    b, h, w = latents.shape[:3]
    guidance, image_guidance = sampling.guidance_scales(guidance, image_guidance)
    cond = {"text": jnp.asarray(conditions["text"], jnp.float32),
            "text_mask": jnp.asarray(conditions["text_mask"]),
            "time_ids": jnp.asarray(conditions["time_ids"], jnp.float32)}
    uncond = None
    if guidance is not None:
      uncond = {"text": jnp.asarray(conditions["null_text"], jnp.float32),
                "text_mask": jnp.asarray(conditions["null_text_mask"]),
                "time_ids": cond["time_ids"]}
    if image_guidance == 1.0:  # two branches, as in `edit`
      image_guidance = None
    noise = self._noise(seed, b, (h * self.vae_scale, w * self.vae_scale))
    out = self.denoise(noise, jnp.asarray(conditions["source_latents"], jnp.float32), cond,
                       uncond, steps, guidance, image_guidance)
    return self._finish(out, "np")


def make_sample_fn(pipe: Pipeline, prompts: Sequence[str], seed: int = 0, steps: int = 28,
                   guidance: float | None = 3.5, size: int | Sequence[int] = 256
                   ) -> Callable[[Any, int], np.ndarray]:
  """The trainer's `sample_fn(params, step) -> uint8 [N, H, W, 3]` for a fixed prompt set."""

  def sample(unet_params, step):
    del step
    return pipe.with_unet_params(unet_params).generate(list(prompts), seed=seed, steps=steps,
                                                       guidance=guidance, size=size, output="np")

  return sample


# ---------------------------------------------------------------- loading


def load_pipeline(model: "str | model_ref.ModelRef", *, text_encoder: Any = None, vae_checkpoint: str | None = None,
                  step: int = -1, ema: bool = True, text_length: int | None = None,
                  log: Callable[[str], None] | None = None) -> Pipeline:
  """A pipeline from any model `dreamlite_jax.model_ref.resolve` names.

  `model` (a path, or the `ModelRef` `model_ref.resolve` made of one): a training run (its
  run config holds `model.unet`, `model.vae` and names the
  VAE and text encoder), a job's stage directory (what its run config leaves open comes
  from the job's records: e.g. the job's own VAE stage), or a diffusers DreamLite folder
  (U-Net, VAE, Qwen3-VL, tokenizer and sigma shift from its sub-folders).
  The U-Net params of a run are its EMA (`ema=False`: the raw params) at `step`.
  `vae_checkpoint` (a VAE run or an `AutoencoderTiny` folder) and `text_encoder` (a
  `TextEncoder`, or a `build_text_encoder` spec) override what the model names;
  `text_length` the generate text length. `log` gets what was found and assumed
  (default: the `dreamlite_jax.model_ref` logger).
  """
  ref = model if isinstance(model, model_ref.ModelRef) else model_ref.resolve(model, step, log)
  unet_config, unet_params = ref.unet(ema=ema)
  vae_config, vae_params = ref.vae(vae_checkpoint)
  if text_encoder is None or isinstance(text_encoder, str):
    text_encoder = ref.text_encoder(text_encoder, text_length)
  vae_scale = vae_config.downsample_factor
  return Pipeline(text_encoder, DreamLiteUNet(unet_config), unet_params,
                  TinyAutoencoder(vae_config), vae_params, shift=ref.shift,
                  size_multiple=vae_scale * unet_config.downsample_factor, vae_scale=vae_scale)


# ---------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m dreamlite_jax.pipeline", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  for name in ("generate", "edit"):
    p = sub.add_parser(name)
    p.add_argument("--model", "--checkpoint", dest="model", required=True,
                   help="a training run, a job's stage directory (runs/demo/distill/student) or "
                        "a diffusers DreamLite folder")
    p.add_argument("--vae-checkpoint", default=None,
                   help="VAE run or AutoencoderTiny folder (default: what the model names)")
    p.add_argument("--text-encoder", default=None,
                   help="Qwen3-VL directory or tiny:SEED (default: what the model names)")
    p.add_argument("--step", type=int, default=-1)
    p.add_argument("--no-ema", action="store_true", help="use the raw params, not the EMA")
    p.add_argument("--out", required=True, help="output PNG (index suffix added for several)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=3.5, help="text CFG scale; 0 disables CFG")
    p.add_argument("--size", type=int, nargs="+", default=None, help="H [W] in pixels")
    if name == "generate":
      p.add_argument("--prompt", required=True, action="append", help="repeat for a batch")
    else:
      p.add_argument("--image", required=True, help="source image file")
      p.add_argument("--instruction", required=True)
      p.add_argument("--image-guidance", type=float, default=1.0, help="0 = text CFG only")
  return parser


def _out_paths(out: str, n: int) -> list[str]:
  if n == 1:
    return [out]
  root, ext = os.path.splitext(out)
  return [f"{root}_{i}{ext or '.png'}" for i in range(n)]


def main(argv: Sequence[str] | None = None,
         loader: Callable[..., Pipeline] = load_pipeline) -> list[str]:
  """Runs the CLI; returns the written paths. `loader` builds the Pipeline."""
  args = _parser().parse_args(argv)
  model_ref.log_to_console()
  pipe = loader(args.model, text_encoder=args.text_encoder,
                vae_checkpoint=args.vae_checkpoint, step=args.step, ema=not args.no_ema)
  size = None if args.size is None else (args.size[0], args.size[-1])
  if args.command == "generate":
    images = pipe.generate(args.prompt, seed=args.seed, steps=args.steps, guidance=args.guidance,
                           size=size or 1024)
  else:
    if not os.path.isfile(args.image):
      raise FileNotFoundError(f"--image not found: {args.image}")
    with Image.open(args.image) as source:
      source = source.convert("RGB")
    images = pipe.edit(source, args.instruction, seed=args.seed, steps=args.steps,
                       guidance=args.guidance, image_guidance=args.image_guidance, size=size)
  paths = _out_paths(args.out, len(images))
  for image, path in zip(images, paths):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path)
    print(f"wrote {path}")
  return paths


if __name__ == "__main__":
  main(sys.argv[1:])
