"""DreamLite for users: `generate()` text-to-image and `edit()` instruction editing.

A `Pipeline` holds the three frozen parts and their params: the text encoder
(`TextEncoder`, Qwen3-VL plus DreamLite's templates), the U-Net and the VAE. It
can be built from in-memory params (tests, the trainer's periodic samples) or
from a training run's checkpoint (`load_pipeline`). Sampling follows
`DreamLitePipeline`: shifted flow-matching sigmas, Euler steps, text CFG for
generation and dual (text + image) guidance for editing; `guidance=None` gives
the CFG-free few-step sampler of distilled (mobile) checkpoints.

CLI:
  python -m dreamlite_jax.pipeline generate --checkpoint DIR --prompt "a red circle" --out a.png
  python -m dreamlite_jax.pipeline edit --checkpoint DIR --image in.png --instruction "make it blue" --out b.png
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
import orbax.checkpoint as ocp
from PIL import Image

from dreamlite_jax.diffusion import flow
from dreamlite_jax.diffusion import sampling
from dreamlite_jax.models.qwen3_vl import Qwen3VLConfig
from dreamlite_jax.models.text_conditioning import TextEncoder
from dreamlite_jax.models.unet import DreamLiteUNet, UNetConfig
from dreamlite_jax.models.vae import TinyAutoencoder, VAEConfig
from dreamlite_jax.training import checkpoints

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

  def _noise(self, seed: int, batch: int, size: tuple[int, int]) -> jax.Array:
    # One key per image index, so image i depends only on (seed, i), not on the batch size.
    key = jax.random.PRNGKey(seed)
    shape = (size[0] // self.vae_scale, size[1] // self.vae_scale, 4)
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
    """Runs the sampler on latents `[B, h, w, 4]`; returns final latents `[B, h, w, 4]`."""
    # Padded to one length: every step count shares the compiled sampler of its mode.
    sigmas = jnp.asarray(sampling.pad_schedule(
        flow.sampling_sigmas(steps, self.shift.mu(*noise.shape[1:3]))))
    g = None if guidance is None else jnp.float32(guidance)
    g_img = None if image_guidance is None else jnp.float32(image_guidance)
    return self._denoise(self.unet_params, noise, condition, sigmas, cond, uncond, g, g_img)

  # ---------------------------------------------------------------- public API

  def with_unet_params(self, unet_params: Any) -> "Pipeline":
    """The same pipeline (sharing its compiled functions) with other U-Net params."""
    other = copy.copy(self)
    other.unet_params = _sampling_placement(unet_params)
    return other

  def generate(self, prompts: str | Sequence[str], seed: int = 0, steps: int = 28,
               guidance: float | None = 3.5, size: int | Sequence[int] = 1024,
               output: str = "pil"):
    """Text-to-image.

    Args:
      prompts: one prompt or a list (one image each, batched).
      seed: images are a deterministic function of (seed, index in the batch).
      steps: Euler steps (28 base, 4 for distilled checkpoints).
      guidance: text CFG scale; None = no CFG (distilled checkpoints).
      size: int or (height, width) in pixels.
      output: "pil" (list of PIL images), "np" (uint8 [B, H, W, 3]) or "latent".
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
      raise ValueError("generate() needs at least one prompt")
    size = _as_size(size)
    self._check_size(size)
    b = len(prompts)
    cond = self._cond(*self.text_encoder.encode_generate(prompts), size)
    uncond = None
    if guidance is not None:
      uncond = self._cond(*self.text_encoder.encode_generate_unconditional(b), size)
    noise = self._noise(seed, b, size)
    latents = self.denoise(noise, jnp.zeros_like(noise), cond, uncond, steps, guidance, None)
    return self._finish(latents, output)

  def edit(self, images: ImageLike | Sequence[ImageLike], instructions: str | Sequence[str],
           seed: int = 0, steps: int = 28, guidance: float | None = 3.5,
           image_guidance: float | None = 1.0, size: int | Sequence[int] | None = None,
           output: str = "pil"):
    """Instruction-based editing of source images.

    Args:
      images: PIL image(s) or uint8 [H, W, 3] array(s), one per instruction.
      instructions: edit instruction(s).
      guidance: text guidance `g`; None = no guidance at all (distilled
        checkpoints; `image_guidance` is then unused).
      image_guidance: image guidance `g_img` of the dual guidance
        `u + g (v_text - v_img) + g_img (v_img - u)` (3 network branches per
        step); None or 1.0 = text CFG with the source in both branches (2
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
    pixels = jnp.asarray(np.stack([load_image(im, size) for im in images]))
    source = self._encode(self.vae_params, pixels)
    vision_images = pixels if getattr(self.text_encoder.config, "vision", None) is not None else None
    cond = self._cond(*self.text_encoder.encode_edit(instructions, vision_images), size)
    uncond = None
    if guidance is not None:
      uncond = self._cond(*self.text_encoder.encode_edit_unconditional(b, vision_images), size)
    if guidance is None or image_guidance == 1.0:
      # g_img = 1: u + g (v_text - v_img) + (v_img - u) = v_img + g (v_text - v_img), i.e.
      # text CFG whose negative branch keeps the source: two network branches, not three.
      image_guidance = None
    noise = self._noise(seed, b, size)
    latents = self.denoise(noise, source, cond, uncond, steps, guidance, image_guidance)
    return self._finish(latents, output)


  def sample_cached(self, conditions: dict, steps: int = 28, guidance: float | None = 3.5,
                    image_guidance: float | None = 1.0, seed: int = 0) -> np.ndarray:
    """Samples precomputed conditions (a training batch of an embedding cache: `text`,
    `text_mask`, `null_text`, `null_text_mask`, `source_latents` (zeros for T2I rows),
    `time_ids`, and `latents` for the shape) -> uint8 images [B, H, W, 3].

    No text encoder runs: the features are the cached ones. T2I rows have a zero
    source, for which dual guidance reduces to text CFG, so one batch may mix both tasks.
    """
    latents = np.asarray(conditions["latents"])
    b, h, w = latents.shape[:3]
    guided = guidance is not None and guidance > 0
    cond = {"text": jnp.asarray(conditions["text"], jnp.float32),
            "text_mask": jnp.asarray(conditions["text_mask"]),
            "time_ids": jnp.asarray(conditions["time_ids"], jnp.float32)}
    uncond = None
    if guided:
      uncond = {"text": jnp.asarray(conditions["null_text"], jnp.float32),
                "text_mask": jnp.asarray(conditions["null_text_mask"]),
                "time_ids": cond["time_ids"]}
    if not guided or image_guidance in (None, 1.0):
      image_guidance = None
    noise = self._noise(seed, b, (h * self.vae_scale, w * self.vae_scale))
    out = self.denoise(noise, jnp.asarray(conditions["source_latents"], jnp.float32), cond,
                       uncond, steps, guidance if guided else None, image_guidance)
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


def read_run_config(checkpoint_dir: str, step: int = -1) -> dict:
  """The run config (JSON dict) stored with a training checkpoint (`config` item)."""
  directory = checkpoints._resolve_checkpoints(checkpoint_dir)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory not found: {checkpoint_dir}")
  options = ocp.CheckpointManagerOptions(read_only=True)
  with ocp.CheckpointManager(directory, options=options, item_names=("config",)) as manager:
    step = manager.latest_step() if step < 0 else step
    if step is None or step not in manager.all_steps():
      raise FileNotFoundError(f"{directory}: no checkpoint step {step}")
    return dict(manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])


def _section(config: dict, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def build_text_encoder(spec: str, text_length: int = 128) -> Any:
  """`spec` = a local Qwen3-VL checkpoint directory, or `tiny:SEED` (random tiny encoder)."""
  if spec.startswith("tiny:"):
    try:
      seed = int(spec.split(":", 1)[1])
    except ValueError as e:
      raise ValueError(f"text encoder spec {spec!r}: expected tiny:<int seed>") from e
    return TextEncoder.random(Qwen3VLConfig.tiny(), seed=seed, text_length=text_length)
  if not os.path.isdir(spec):
    raise FileNotFoundError(f"text encoder directory not found: {spec} (or use tiny:SEED)")
  return TextEncoder.from_pretrained(spec, text_length=text_length)


def load_pipeline(checkpoint_dir: str, *, text_encoder: Any = None, vae_checkpoint: str | None = None,
                  step: int = -1, ema: bool = True) -> Pipeline:
  """A pipeline from a training run's checkpoint.

  The run config must hold `model.unet` (UNetConfig fields) and `model.vae`
  (VAEConfig fields); the U-Net params (EMA by default) come from the checkpoint.
  The VAE params come from `vae_checkpoint` (a run whose params are the VAE's),
  else from the run config's `model.vae_checkpoint`. The text encoder is
  `text_encoder` (a TextEncoder or a `build_text_encoder` spec), else the run
  config's `model.text_encoder.spec` (with `model.text_encoder.text_length`).
  """
  config = read_run_config(checkpoint_dir, step)
  unet_fields, vae_fields = _section(config, "model.unet"), _section(config, "model.vae")
  if unet_fields is None or vae_fields is None:
    raise KeyError(f"{checkpoint_dir}: the run config has no model.unet / model.vae section")
  unet_config, vae_config = UNetConfig.from_dict(unet_fields), VAEConfig(**vae_fields)
  vae_checkpoint = vae_checkpoint or _section(config, "model.vae_checkpoint")
  if not vae_checkpoint:
    raise ValueError(f"{checkpoint_dir}: no VAE weights: pass vae_checkpoint (--vae-checkpoint) "
                     f"or set model.vae_checkpoint in the run config")
  if text_encoder is None or isinstance(text_encoder, str):
    spec = text_encoder or _section(config, "model.text_encoder.spec")
    if not spec:
      raise ValueError(f"{checkpoint_dir}: no text encoder: pass text_encoder (--text-encoder) or "
                       f"set model.text_encoder.spec in the run config")
    length = _section(config, "model.text_encoder.text_length") or 128
    text_encoder = build_text_encoder(spec, int(length))
  unet_params = checkpoints.load_params(checkpoint_dir, step=step, ema=ema)
  vae_params = checkpoints.load_params(vae_checkpoint, ema=ema)
  vae_scale = vae_config.downsample_factor
  return Pipeline(text_encoder, DreamLiteUNet(unet_config), unet_params,
                  TinyAutoencoder(vae_config), vae_params,
                  size_multiple=vae_scale * unet_config.downsample_factor, vae_scale=vae_scale)


# ---------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m dreamlite_jax.pipeline", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  for name in ("generate", "edit"):
    p = sub.add_parser(name)
    p.add_argument("--checkpoint", required=True, help="training run workdir (or its checkpoints/)")
    p.add_argument("--vae-checkpoint", default=None, help="run whose params are the VAE")
    p.add_argument("--text-encoder", default=None, help="Qwen3-VL directory or tiny:SEED")
    p.add_argument("--step", type=int, default=-1)
    p.add_argument("--no-ema", action="store_true", help="use the raw params, not the EMA")
    p.add_argument("--out", required=True, help="output PNG (index suffix added for several)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=3.5, help="text CFG scale; <= 0 disables CFG")
    p.add_argument("--size", type=int, nargs="+", default=None, help="H [W] in pixels")
    if name == "generate":
      p.add_argument("--prompt", required=True, action="append", help="repeat for a batch")
    else:
      p.add_argument("--image", required=True, help="source image file")
      p.add_argument("--instruction", required=True)
      p.add_argument("--image-guidance", type=float, default=1.0, help="<= 0 = text CFG only")
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
  pipe = loader(args.checkpoint, text_encoder=args.text_encoder,
                vae_checkpoint=args.vae_checkpoint, step=args.step, ema=not args.no_ema)
  guidance = args.guidance if args.guidance > 0 else None
  size = None if args.size is None else (args.size[0], args.size[-1])
  if args.command == "generate":
    images = pipe.generate(args.prompt, seed=args.seed, steps=args.steps, guidance=guidance,
                           size=size or 1024)
  else:
    if not os.path.isfile(args.image):
      raise FileNotFoundError(f"--image not found: {args.image}")
    with Image.open(args.image) as source:
      source = source.convert("RGB")
    image_guidance = args.image_guidance if args.image_guidance > 0 else None
    images = pipe.edit(source, args.instruction, seed=args.seed, steps=args.steps,
                       guidance=guidance, image_guidance=image_guidance, size=size)
  paths = _out_paths(args.out, len(images))
  for image, path in zip(images, paths):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path)
    print(f"wrote {path}")
  return paths


if __name__ == "__main__":
  main(sys.argv[1:])
