"""A reference phone app in Python: generate and edit with the exported `.tflite` files only.

It does exactly what an Android app would, reading everything from
`manifest.json`: tokenise the templated prompt (with the exported `tokenizer.json`
when the export has one, else the offline Qwen tokenizer: the same ids), look the ids up in the exported
embedding table, run the text encoder part(s), keep the features after the
template prefix, run the U-Net `num_steps` times with Euler updates on the
target half, and decode with the VAE decoder (edit: encode the source first).
No JAX model code runs here, so a test comparing this with
`dreamlite_jax.pipeline` checks the deployed chain end to end.

  python -m converters.tflite_pipeline --models DIR --prompt "a red circle" --out a.png
  python -m converters.tflite_pipeline --models DIR --image in.png --instruction "make it blue" --out b.png

Editing conditions on text only: the Qwen3-VL vision tower is not exported, so
the edit template has no image slot (as `TextEncoder.encode_edit` without images).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from converters.litert import TFLiteModel, load_model
from converters.manifest import load_manifest
from dreamlite_jax.models import prompts
from dreamlite_jax.models.tokenizer import load_tokenizer

def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] float images -> uint8, rounding as the JAX pipeline does."""
  x = np.clip(np.asarray(images, np.float32) / 2.0 + 0.5, 0.0, 1.0)
  return np.round(x * 255.0).astype(np.uint8)


def source_pixels(image: Image.Image | np.ndarray, height: int, width: int) -> np.ndarray:
  """A PIL image or uint8 [H, W, 3] -> float32 [1, height, width, 3] in [-1, 1] (Lanczos)."""
  if isinstance(image, np.ndarray):
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise ValueError(f'image arrays must be uint8 [H, W, 3], got {image.dtype} {image.shape}')
    image = Image.fromarray(image)
  image = image.convert('RGB')
  if image.size != (width, height):
    image = image.resize((width, height), Image.LANCZOS)
  return (np.asarray(image, np.float32) / 127.5 - 1.0)[None]


class TFLitePipeline:
  """The four exported models plus the manifest's recipe; batch 1."""

  def __init__(self, model_dir: str | Path, tokenizer=None, num_threads: int | None = None,
               verify: bool = True):
    self.dir = Path(model_dir)
    self.manifest = load_manifest(self.dir, verify)
    self.models: dict[str, TFLiteModel] = {
        name: load_model(self.dir / entry['file'], num_threads=num_threads)
        for name, entry in self.manifest['models'].items()}
    text = self.manifest['text']
    self.table = np.load(self.dir / text['embedding_table']['file'], mmap_mode='r')
    if tokenizer is None and 'tokenizer_file' in text:
      # The model's own tokenizer, exported beside the models (e.g. the release's).
      tokenizer = load_tokenizer(str(self.dir / text['tokenizer_file']['file']))
    self.tokenizer = tokenizer or load_tokenizer()
    if self.tokenizer.pad_id != text['pad_id']:
      raise ValueError(f'tokenizer pad id {self.tokenizer.pad_id} != manifest {text["pad_id"]}')
    self.latent_shape = (1, self.manifest['latent']['height'], self.manifest['latent']['width'],
                         self.manifest['latent']['channels'])

  def encode_text(self, batch: prompts.PromptBatch) -> tuple[np.ndarray, np.ndarray]:
    """Token batch -> (features [1, L, D] zeroed on padding, mask [1, L]) float32."""
    text = self.manifest['text']
    length, seq = text['text_length'], text['encoder_length']
    n = batch.ids.shape[1]
    if n > seq or n != batch.drop + length:
      raise ValueError(f'prompt batch of {n} tokens does not fit the encoder length {seq}')
    ids = np.full((1, seq), text['pad_id'], np.int64)
    mask = np.zeros((1, seq), np.float32)
    ids[:, :n], mask[:, :n] = batch.ids, batch.mask
    hidden = self.table[ids].astype(np.float32)
    for name in text['encoder_models']:
      hidden = self.models[name](embeds=hidden, mask=mask)['hidden']
    keep = mask[:, batch.drop:batch.drop + length]
    return hidden[:, batch.drop:batch.drop + length] * keep[:, :, None], keep

  def denoise(self, noise: np.ndarray, condition: np.ndarray, text: np.ndarray,
              text_mask: np.ndarray) -> np.ndarray:
    """Euler steps of the manifest's schedule; latents `[1, h, w, 4]` in and out."""
    sched = self.manifest['scheduler']
    sigmas, timesteps = sched['sigmas'], sched['timesteps']
    unet = self.models['unet']
    extra = {}
    if self.manifest['unet']['time_ids_input']:
      extra['time_ids'] = np.array([self.manifest['unet']['time_ids']], np.float32)
    x = noise.astype(np.float32)
    for i, t in enumerate(timesteps):
      sample = np.concatenate([x, condition], axis=2)
      v = unet(sample=sample, timestep=np.array([t], np.float32), text=text,
               text_mask=text_mask, **extra)['velocity']
      x = x + np.float32(sigmas[i + 1] - sigmas[i]) * v
    return x

  def _noise(self, seed: int, noise: np.ndarray | None) -> np.ndarray:
    if noise is None:
      return np.random.default_rng(seed).standard_normal(self.latent_shape, np.float32)
    noise = np.asarray(noise, np.float32).reshape(self.latent_shape)
    return noise

  def decode(self, latents: np.ndarray) -> np.ndarray:
    lat = self.manifest['latent']
    z = latents / lat['scaling_factor'] + lat['shift_factor']
    return to_uint8(self.models['vae_decoder'](latents=z)['image'])[0]

  def generate(self, prompt: str, seed: int = 0, noise: np.ndarray | None = None) -> np.ndarray:
    """Text-to-image; returns uint8 [H, W, 3]. `noise` [1, h, w, 4] overrides the seed."""
    batch = prompts.tokenize_generate(self.tokenizer, [prompt], self.manifest['text']['text_length'])
    text, mask = self.encode_text(batch)
    x = self._noise(seed, noise)
    return self.decode(self.denoise(x, np.zeros_like(x), text, mask))

  def edit(self, image: Image.Image | np.ndarray, instruction: str, seed: int = 0,
           noise: np.ndarray | None = None) -> np.ndarray:
    """Edits `image` (resized to the export size) by `instruction`; returns uint8 [H, W, 3]."""
    img = self.manifest['image']
    pixels = source_pixels(image, img['height'], img['width'])
    lat = self.manifest['latent']
    source = self.models['vae_encoder'](image=pixels)['latents']
    source = (source - lat['shift_factor']) * lat['scaling_factor']
    batch = prompts.tokenize_edit(self.tokenizer, [instruction],
                                  self.manifest['text']['text_length'], None)
    text, mask = self.encode_text(batch)
    return self.decode(self.denoise(self._noise(seed, noise), source, text, mask))


def main(argv: list[str] | None = None) -> Path:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', required=True, help='export directory with manifest.json')
  parser.add_argument('--prompt', help='text-to-image prompt')
  parser.add_argument('--image', help='source image to edit')
  parser.add_argument('--instruction', help='edit instruction (with --image)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', required=True, help='output PNG')
  args = parser.parse_args(argv)
  if bool(args.prompt) == bool(args.image):
    parser.error('give either --prompt, or --image with --instruction')
  if args.image and not args.instruction:
    parser.error('--image needs --instruction')
  pipe = TFLitePipeline(args.models)
  if args.prompt:
    out = pipe.generate(args.prompt, args.seed)
  else:
    with Image.open(args.image) as source:
      out = pipe.edit(source.convert('RGB'), args.instruction, args.seed)
  path = Path(args.out)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(out).save(path)
  print(f'wrote {path}')
  return path


if __name__ == '__main__':
  main(sys.argv[1:])
