"""Tiny real-format inputs of the paper-scale journey, each written into a given directory.

What a user hands `python -m data_pipelines.build_cache`, at test size:

  write_tiny_vae(dir)           random `diffusers.AutoencoderTiny` folder (config.json +
                                diffusion_pytorch_model.safetensors), 8x (or 4x) downsampling,
                                4 latent channels; loads with `weights.load_vae_dir`.
  write_tiny_text_encoder(dir)  random transformers `Qwen3VLForConditionalGeneration` folder
                                (config.json + model.safetensors) with the real Qwen vocabulary
                                size (the offline tokenizer's ids index it) and a vision tower;
                                loads with `TextEncoder.from_pretrained`; hidden size 64.
  write_t2i_folder(dir)         JPEGs + captions.jsonl with three bad lines.
  write_edit_folder(dir)        source/target JPEG pairs + edits.jsonl with three bad lines.

Each function returns the directory it wrote. Everything is seeded, so two calls
write the same bytes. The bad lines and what `build_cache` counts for them are in
`T2I_SKIPS` / `EDIT_SKIPS`; the captions it keeps, in order, come from
`t2i_captions(n)` / `edit_instructions(n)`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

T2I_SKIPS = {"bad_json_line": 1, "missing_file": 1, "invalid_utf8": 1}
EDIT_SKIPS = {"bad_json_line": 1, "missing_file": 1, "empty_caption": 1}
TEXT_HIDDEN = 64
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")


def write_tiny_vae(directory: str | os.PathLike, downsample_factor: int = 8, seed: int = 0) -> str:
  """A random-weight `AutoencoderTiny` (8 channels, one block per level) saved as safetensors.

  `downsample_factor` 8 (TAESD's four levels) or 4 (three levels): cache sides must be
  multiples of it.
  """
  import torch
  from diffusers import AutoencoderTiny

  levels = {8: 4, 4: 3}.get(downsample_factor)
  if levels is None:
    raise ValueError(f"downsample_factor must be 4 or 8, got {downsample_factor}")
  torch.manual_seed(seed)
  vae = AutoencoderTiny(encoder_block_out_channels=(8,) * levels,
                        decoder_block_out_channels=(8,) * levels,
                        num_encoder_blocks=(1,) * levels, num_decoder_blocks=(1,) * levels,
                        latent_channels=4)
  os.makedirs(directory, exist_ok=True)
  vae.save_pretrained(str(directory), safe_serialization=True)
  return str(directory)


def write_tiny_text_encoder(directory: str | os.PathLike, seed: int = 0) -> str:
  """A random-weight Qwen3-VL (3 layers, hidden 64, vision tower of depth 2) saved as safetensors.

  The vocabulary is Qwen's full 151,936 ids with the real image / vision token ids,
  because `TextEncoder.from_pretrained` tokenizes with the offline Qwen tokenizer when
  the folder has no tokenizer.json. Input and output embeddings are tied, so the file
  holds one 151936 x 64 table (about 40 MB).
  """
  import torch
  import transformers

  text = dict(vocab_size=151936, hidden_size=TEXT_HIDDEN, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
              tie_word_embeddings=True,
              rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[2, 3, 3],
                                   mrope_interleaved=True))
  vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TEXT_HIDDEN,
                num_position_embeddings=64, deepstack_visual_indexes=[0], patch_size=16,
                temporal_patch_size=2, spatial_merge_size=2)
  config = transformers.Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)
  torch.manual_seed(seed)
  model = transformers.Qwen3VLForConditionalGeneration(config).eval()
  os.makedirs(directory, exist_ok=True)
  model.save_pretrained(str(directory), safe_serialization=True)
  return str(directory)


def _image(rng: np.random.Generator, height: int, width: int) -> Image.Image:
  """Smooth random colours (upsampled 4x4 noise) with a bright square: JPEG-friendly content."""
  base = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
  arr = np.array(Image.fromarray(base).resize((width, height), Image.BILINEAR))
  y, x = rng.integers(0, height // 2), rng.integers(0, width // 2)
  arr[y:y + height // 3, x:x + width // 3] = rng.integers(128, 256, 3).astype(np.uint8)
  return Image.fromarray(arr)


def _shape(i: int, size: int) -> tuple[int, int]:
  """(height, width): square, landscape 5:4 and portrait 4:5 in turn (centre crops differ)."""
  return [(size, size), (size, size * 5 // 4), (size * 5 // 4, size)][i % 3]


def t2i_captions(n: int = 12) -> list[str]:
  """The captions of `write_t2i_folder(dir, n)`'s kept items, in manifest order."""
  return [f"photo {i}: a {COLOURS[i % len(COLOURS)]} square on a soft background" for i in range(n)]


def edit_instructions(n: int = 12) -> list[str]:
  """The instructions of `write_edit_folder(dir, n)`'s kept items, in manifest order."""
  return [f"the square painted {COLOURS[(i + 1) % len(COLOURS)]} ({i})" for i in range(n)]


def _insert_bad(lines: list[bytes], bad: list[bytes]) -> list[bytes]:
  """Spreads the bad lines through the manifest (so host shards each meet some)."""
  out = list(lines)
  for k, line in enumerate(bad):
    out.insert(min(len(out), 2 + 5 * k), line)
  return out


def write_t2i_folder(directory: str | os.PathLike, n: int = 12, size: int = 80, seed: int = 0) -> str:
  """`n` JPEGs under images/ and captions.jsonl listing them, plus three bad lines.

  The bad lines (`T2I_SKIPS`): one that is not JSON, one naming a missing file, one whose
  caption bytes are not valid UTF-8. Images are `size` on the shorter side, square,
  5:4 or 4:5.
  """
  root = Path(directory)
  (root / "images").mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  lines = []
  for i, caption in enumerate(t2i_captions(n)):
    name = f"images/{i:03d}.jpg"
    _image(rng, *_shape(i, size)).save(root / name, quality=95)
    lines.append(json.dumps({"file": name, "caption": caption}).encode())
  bad = [b'{"file": "images/000.jpg", "caption": ',
         json.dumps({"file": "images/gone.jpg", "caption": "a missing photo"}).encode(),
         b'{"file": "images/001.jpg", "caption": "caf\xe9 in latin-1"}']
  (root / "captions.jsonl").write_bytes(b"\n".join(_insert_bad(lines, bad)) + b"\n")
  return str(root)


def write_edit_folder(directory: str | os.PathLike, n: int = 12, size: int = 80, seed: int = 1) -> str:
  """`n` source/target JPEG pairs and edits.jsonl listing them, plus three bad lines.

  The bad lines (`EDIT_SKIPS`): one that is not JSON, one whose target is missing, one
  with a blank instruction. A pair's two images have the same size (`size` on the
  shorter side; square, 5:4 or 4:5).
  """
  root = Path(directory)
  (root / "images").mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  lines = []
  for i, instruction in enumerate(edit_instructions(n)):
    h, w = _shape(i, size)
    source = _image(rng, h, w)
    target = np.array(source)
    target[h // 4:h // 2, w // 4:w // 2] = rng.integers(0, 256, 3).astype(np.uint8)
    src, tgt = f"images/{i:03d}_source.jpg", f"images/{i:03d}_target.jpg"
    source.save(root / src, quality=95)
    Image.fromarray(target).save(root / tgt, quality=95)
    lines.append(json.dumps({"source": src, "target": tgt, "instruction": instruction}).encode())
  bad = [b'{"source": "images/000_source.jpg", "target": ',
         json.dumps({"source": "images/000_source.jpg", "target": "images/gone.jpg",
                     "instruction": "remove the square"}).encode(),
         json.dumps({"source": "images/001_source.jpg", "target": "images/001_target.jpg",
                     "instruction": "   "}).encode()]
  (root / "edits.jsonl").write_bytes(b"\n".join(_insert_bad(lines, bad)) + b"\n")
  return str(root)
