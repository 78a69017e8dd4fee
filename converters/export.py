"""A model -> the four static-shape `.tflite` files and `manifest.json` a phone app needs.

The model is any `dreamlite_jax.model_ref` names: a training run, a job's stage
directory, or a diffusers DreamLite folder (the release), which exports from the folder
alone: U-Net, VAE, Qwen3-VL text stack, its tokenizer (copied as `tokenizer.json`) and
its scheduler's sigma shift.

Every file passes two gates before it is written: `gpu_check` (zero findings:
the GPU delegate takes every op) and `numerics` (TFLite vs the JAX function on
random inputs and on real inputs chained through the pipeline: a tokenised
prompt, its text features, a VAE-encoded image). A failing gate fails the export.

  python -m converters.export --model DIR --out DIR [--precision fp32|fp16] [--size 1024]
  python -m converters.export --checkpoint RUN --config experiments/X.py --out DIR
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np

from converters import components, gpu_check, litert, numerics
from converters.components import Component
from converters.jax_to_tflite import PRECISIONS, convert_jax_function, output_specs
from converters.manifest import MANIFEST_FORMAT, sha256_file, write_manifest
from dreamlite_jax import model_ref
from dreamlite_jax import pipeline as pipeline_lib
from dreamlite_jax.config import load_config
from dreamlite_jax.diffusion import flow
from dreamlite_jax.models import prompts
from dreamlite_jax.models.tokenizer import load_tokenizer

STUDENT_STEPS = 4
EVAL_PROMPT = 'a red circle above a blue square'


class ExportGateError(RuntimeError):
  """A converted model failed gpu_check or the numerics gate; nothing was written for it."""


@dataclasses.dataclass(frozen=True)
class DeployModels:
  """Modules and params of the deployed pipeline (a 4-step student)."""
  unet: nn.Module
  unet_params: Any
  vae: nn.Module
  vae_params: Any
  text_encoder: nn.Module
  text_params: Any
  text_len: int = 128  # U-Net text length after dropping the template prefix
  latent_scaling: float = 1.0
  latent_shift: float = 0.0
  shift: flow.ShiftConfig = flow.ShiftConfig()  # the student schedule's sigma shift

  @classmethod
  def from_pipeline(cls, pipe) -> 'DeployModels':
    """From a `dreamlite_jax.pipeline.Pipeline` (its text encoder's static text length).

    The vision tower is not exported (the app edits from the instruction alone), so a
    pipeline whose edit length holds image tokens exports at its generate length.
    """
    te = pipe.text_encoder
    if te.edit_text_length != te.text_length and te.config.vision is None:
      raise ValueError(f'the phone U-Net has one text length; the pipeline uses '
                       f'{te.text_length} (generate) and {te.edit_text_length} (edit)')
    return cls(pipe.unet, pipe.unet_params, pipe.vae, pipe.vae_params, te.model, te.params,
               text_len=te.text_length, shift=pipe.shift)


def export_component(component: Component, gate_inputs: list[dict[str, np.ndarray]],
                     precision: str, out_dir: Path, log: Callable[[str], None] = print) -> dict:
  """Converts, gates and writes one component; returns its manifest entry."""
  start = time.time()
  content = convert_jax_function(component.fn, component.params, component.inputs, precision,
                                 component.name)
  findings = gpu_check.check_model(content)
  if findings:
    lines = '\n  '.join(str(f) for f in findings[:40])
    raise ExportGateError(f'{component.name}: {len(findings)} GPU delegate finding(s):\n  {lines}')
  model = litert.load_model(content, label=f'{component.name}.tflite')
  reference = functools.partial(_call, component)
  try:
    results = numerics.numerics_gate(model, reference, gate_inputs, precision)
  except numerics.NumericsGateError as e:
    raise ExportGateError(str(e)) from e
  sum_risks = gpu_check.fp16_sum_risks(content)
  for warning in sum_risks[:5]:
    log(f'{component.name}: warning: {warning}')
  path = out_dir / f'{component.name}.tflite'
  path.write_bytes(content)
  worst = numerics.worst(results)
  log(f'{component.name}: {len(content) / 2 ** 20:.1f} MiB, gpu_check clean, worst {worst} '
      f'({time.time() - start:.1f}s)')
  return {
      'file': path.name, 'sha256': sha256_file(path), 'bytes': len(content),
      'signature': litert.SIGNATURE_KEY,
      'inputs': [s.to_json() for s in component.inputs],
      'outputs': [s.to_json() for s in output_specs(component.fn, component.params,
                                                     component.inputs)],
      'gpu_check_findings': 0,
      'large_sum_reductions': len(sum_risks),
      'numerics': {'precision': precision, 'max_rel_err': worst.rel_err,
                   'max_abs_err': worst.max_abs_err, 'min_psnr_db': min(c.psnr_db for c in results),
                   'threshold': numerics.THRESHOLDS[precision],
                   'psnr_floor_db': numerics.MIN_PSNR_DB[precision]},
      **component.info,
  }


@functools.lru_cache(maxsize=None)
def _jitted(fn: Callable) -> Callable:
  return jax.jit(fn)


def _call(component: Component, **inputs) -> dict[str, np.ndarray]:
  """The JAX reference outputs of a component (compiled once per component function)."""
  return {k: np.asarray(v) for k, v in _jitted(component.fn)(component.params, **inputs).items()}


def synthetic_image(height: int, width: int, seed: int = 0) -> np.ndarray:
  """A smooth image with a few flat shapes, `[1, H, W, 3]` in [-1, 1] (a 'real' gate input)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing='ij')
  img = np.stack([0.6 * xx, 0.6 * yy, -0.4 * xx * yy], -1)
  for _ in range(3):
    cy, cx, r = rng.uniform(-0.6, 0.6), rng.uniform(-0.6, 0.6), rng.uniform(0.15, 0.35)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(-0.9, 0.9, 3)
  return img[None].astype(np.float32)


def text_features(models: DeployModels, tokenizer, prompt: str, seq_len: int,
                  table: np.ndarray, parts: list[Component]) -> tuple[np.ndarray, np.ndarray,
                                                                    dict[str, np.ndarray]]:
  """Runs the JAX text parts on a generate prompt; returns (text, text_mask, part-0 inputs)."""
  batch = prompts.tokenize_generate(tokenizer, [prompt], models.text_len)
  ids = np.full((1, seq_len), tokenizer.pad_id, np.int32)
  mask = np.zeros((1, seq_len), np.float32)
  ids[:, :batch.ids.shape[1]] = batch.ids
  mask[:, :batch.mask.shape[1]] = batch.mask
  first = {'embeds': table[ids].astype(np.float32), 'mask': mask}
  hidden = first['embeds']
  for part in parts:
    hidden = _call(part, embeds=hidden, mask=mask)['hidden']
  drop, keep = batch.drop, batch.feature_mask.astype(np.float32)
  return hidden[:, drop:drop + models.text_len] * keep[:, :, None], keep, first


def export_all(models: DeployModels, out_dir: str | Path, precision: str = 'fp32',
               size: tuple[int, int] = (1024, 1024), tokenizer=None, seed: int = 0,
               time_ids_input: bool = False, log: Callable[[str], None] = print) -> dict:
  """Exports, gates and writes all models plus `manifest.json`; returns the manifest.

  `time_ids_input` keeps the U-Net's size ids as an input (see `components.unet_step`).
  """
  if precision not in PRECISIONS:
    raise ValueError(f'--precision must be one of {PRECISIONS}, got {precision!r}')
  if tokenizer is None:
    tokenizer = load_tokenizer()
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  height, width = size
  vae_scale = models.vae.config.downsample_factor
  h, w = height // vae_scale, width // vae_scale
  rng = np.random.default_rng(seed)
  seq_len = max(prompts.GENERATE_DROP, prompts.EDIT_DROP) + models.text_len
  sigmas = flow.schedule_for_size(STUDENT_STEPS, height, width, models.shift, vae_scale=vae_scale)
  timesteps = flow.timesteps_from_sigmas(sigmas)
  entries = {}

  # Text encoder (one or more layer-range parts) and its embedding table.
  parts, table = components.text_encoder_parts(models.text_encoder, models.text_params,
                                               seq_len=seq_len, precision=precision)
  table = table.astype(np.float16 if precision == 'fp16' else np.float32)
  text, text_mask, first = text_features(models, tokenizer, EVAL_PROMPT, seq_len, table, parts)
  random_mask = np.zeros((1, seq_len), np.float32)
  random_mask[:, :rng.integers(seq_len // 4, seq_len)] = 1
  random_first = {'embeds': table[rng.integers(0, table.shape[0], (1, seq_len))].astype(np.float32),
                  'mask': random_mask}
  sets = [first, random_first]
  for part in parts:
    entries[part.name] = export_component(part, sets, precision, out_dir, log)
    sets = [{'embeds': _call(part, **s)['hidden'], 'mask': s['mask']} for s in sets]
  table_path = out_dir / 'text_embeddings.npy'
  np.save(table_path, table)

  # VAE encoder on a synthetic image, decoder on those latents.
  image = synthetic_image(height, width, seed)
  enc = components.vae_encoder(models.vae, models.vae_params, height=height, width=width)
  entries['vae_encoder'] = export_component(
      enc, [{'image': image}, {'image': rng.uniform(-1, 1, image.shape).astype(np.float32)}],
      precision, out_dir, log)
  latents = _call(enc, image=image)['latents']
  dec = components.vae_decoder(models.vae, models.vae_params, height=height, width=width)
  entries['vae_decoder'] = export_component(
      dec, [{'latents': latents}, {'latents': rng.standard_normal(latents.shape, np.float32)}],
      precision, out_dir, log)

  # U-Net step: T2I at the first student timestep, edit at the last, and random inputs.
  text_dim = text.shape[-1]
  unet = components.unet_step(models.unet, models.unet_params, height=height, width=width,
                              text_len=models.text_len, text_dim=text_dim,
                              time_ids_input=time_ids_input, vae_scale=vae_scale)
  noise = rng.standard_normal((1, h, w, 4)).astype(np.float32)
  time_ids = np.array([[width, height]], np.float32)
  t2i = np.concatenate([noise, np.zeros_like(noise)], axis=2)
  x_t = (1 - sigmas[-2]) * latents + sigmas[-2] * noise
  edit = np.concatenate([x_t, latents], axis=2).astype(np.float32)
  random_text_mask = np.zeros((1, models.text_len), np.float32)
  random_text_mask[:, :rng.integers(1, models.text_len + 1)] = 1
  unet_sets = [
      dict(sample=t2i, timestep=timesteps[:1], text=text, text_mask=text_mask),
      dict(sample=edit, timestep=timesteps[-1:], text=text, text_mask=text_mask),
      dict(sample=rng.standard_normal(t2i.shape).astype(np.float32),
           timestep=rng.uniform(0, 1000, (1,)).astype(np.float32),
           text=rng.standard_normal(text.shape).astype(np.float32), text_mask=random_text_mask)]
  if time_ids_input:
    unet_sets = [{**s, 'time_ids': time_ids} for s in unet_sets]
  entries['unet'] = export_component(unet, unet_sets, precision, out_dir, log)

  manifest = build_manifest(models, entries, [p.name for p in parts], table_path, precision,
                            (height, width), seq_len, sigmas, timesteps, tokenizer)
  source = getattr(tokenizer, 'path', None)
  if source and str(source).endswith('.json'):
    # The app tokenises with the model's own tokenizer (the release ships one).
    copied = out_dir / 'tokenizer.json'
    shutil.copyfile(source, copied)
    manifest['text']['tokenizer_file'] = {'file': copied.name, 'sha256': sha256_file(copied)}
  log(f'wrote {write_manifest(out_dir, manifest)}')
  return manifest


def build_manifest(models: DeployModels, entries: dict, text_parts: list[str], table_path: Path,
                   precision: str, size: tuple[int, int], seq_len: int, sigmas: np.ndarray,
                   timesteps: np.ndarray, tokenizer) -> dict:
  """Everything the app needs to run the four models, and nothing else."""
  height, width = size
  vae_scale = models.vae.config.downsample_factor
  return {
      'format': MANIFEST_FORMAT,
      'precision': precision,
      'image': {'height': height, 'width': width, 'channels': 3, 'range': [-1.0, 1.0],
                'layout': 'NHWC'},
      'latent': {'height': height // vae_scale, 'width': width // vae_scale,
                 'channels': components.LATENT_CHANNELS,
                 'scaling_factor': models.latent_scaling, 'shift_factor': models.latent_shift,
                 'encode': 'latents = (vae_encoder(image) - shift_factor) * scaling_factor',
                 'decode': 'image = vae_decoder(latents / scaling_factor + shift_factor)'},
      'scheduler': {'type': 'flow_match_euler', 'num_steps': STUDENT_STEPS, 'cfg': False,
                    'sigmas': [float(s) for s in sigmas],
                    'timesteps': [float(t) for t in timesteps],
                    'noise': 'x = N(0, 1) of the latent shape',
                    'step': 'x = x + (sigmas[i + 1] - sigmas[i]) * velocity(x, timesteps[i])'},
      'text': {
          'tokenizer': 'Qwen3-VL byte-level BPE (qwen.tiktoken ranks + special tokens from id '
                       '151643)',
          'pad_id': int(tokenizer.pad_id),
          'generate_template': prompts.GENERATE_TEMPLATE,
          'generate_user_text': '[Generate]: {prompt}',
          'generate_drop': prompts.GENERATE_DROP,
          'edit_template': prompts.EDIT_TEMPLATE.replace(prompts.IMAGE_SLOT, ''),
          'edit_user_text': prompts.edit_text('{prompt}'),
          'edit_drop': prompts.EDIT_DROP,
          'encoder_length': seq_len, 'text_length': models.text_len,
          'padding': 'right-pad token ids with pad_id to encoder_length; mask 1 on real tokens',
          'features': 'text = hidden[:, drop:drop + text_length] * text_mask[..., None], '
                      'text_mask = mask[:, drop:drop + text_length]',
          'encoder_models': text_parts,
          'embedding_table': {'file': table_path.name, 'sha256': sha256_file(table_path),
                              'shape': list(np.load(table_path, mmap_mode='r').shape),
                              'dtype': str(np.load(table_path, mmap_mode='r').dtype)},
          'embedding_lookup': 'in the app: embeds = table[ids]. The GATHER on a vocabulary-'
                              'sized table is kept out of the GPU graph.',
      },
      'unet': {'time_ids': [width, height], 'timestep': 'sigma * 1000',
               'time_ids_input': 'time_ids' in [i['name'] for i in entries['unet']['inputs']]},
      'models': entries,
  }


def _config_field(config, dotted: str):
  node = config
  for part in dotted.split('.'):
    if part not in node:
      return None
    node = node[part]
  return node


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', '--checkpoint', dest='model', required=True,
                      help="a training run, a job's stage directory (runs/demo/distill/student) "
                           'or a diffusers DreamLite folder (the release)')
  parser.add_argument('--config', default=None,
                      help='experiment config; its model.text_encoder.spec and '
                           'model.vae_checkpoint are used unless given below')
  parser.add_argument('--text-encoder', default=None,
                      help='Qwen3-VL directory or tiny:SEED (default: what the model names)')
  parser.add_argument('--vae-checkpoint', default=None,
                      help='VAE run or AutoencoderTiny folder (default: what the model names)')
  parser.add_argument('--text-length', type=int, default=None,
                      help="the U-Net's static text length (default: the model's; 128 for a "
                           'DreamLite folder)')
  parser.add_argument('--step', type=int, default=-1)
  parser.add_argument('--no-ema', action='store_true', help='export the raw params, not the EMA')
  parser.add_argument('--out', required=True, help='output directory')
  parser.add_argument('--precision', choices=PRECISIONS, default='fp32')
  parser.add_argument('--size', type=int, nargs='+', default=None,
                      help="H [W] in pixels (default: the model's image size, else 1024)")
  parser.add_argument('--time-ids-input', action='store_true',
                      help='keep time_ids as a U-Net input instead of baking in the size')
  args = parser.parse_args(argv)
  text_encoder, vae_checkpoint = args.text_encoder, args.vae_checkpoint
  if args.config:
    config = load_config(args.config)
    text_encoder = text_encoder or _config_field(config, 'model.text_encoder.spec')
    vae_checkpoint = vae_checkpoint or _config_field(config, 'model.vae_checkpoint')
  model_ref.log_to_console()
  model = args.model
  if args.size is None:
    model = model_ref.resolve(args.model, step=args.step)
    args.size = [model.image_size or 1024]
  pipe = pipeline_lib.load_pipeline(model, text_encoder=text_encoder,
                                    vae_checkpoint=vae_checkpoint, step=args.step,
                                    ema=not args.no_ema, text_length=args.text_length)
  size = (args.size[0], args.size[-1])
  if size[0] % pipe.size_multiple or size[1] % pipe.size_multiple:
    parser.error(f'--size {size} must be multiples of {pipe.size_multiple}')
  manifest = export_all(DeployModels.from_pipeline(pipe), args.out, args.precision, size,
                        tokenizer=pipe.text_encoder.tokenizer, time_ids_input=args.time_ids_input)
  for name, entry in manifest['models'].items():
    print(f"{name}: {entry['bytes'] / 2 ** 20:.1f} MiB, gpu_check findings 0, "
          f"max_rel_err {entry['numerics']['max_rel_err']:.2e}")
  return manifest


if __name__ == '__main__':
  main(sys.argv[1:])
