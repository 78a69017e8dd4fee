"""GenEval sample export: a checkpoint's images in the folder layout GenEval scores.

GenEval (Ghosh et al. 2023) reads `<outdir>/<index:05d>/metadata.jsonl` (the
prompt's line of `evaluation_metadata.jsonl`) and `<outdir>/<index:05d>/samples/
<k:05d>.png`. The export is resumable: PNGs are written under a temporary name
and renamed, and the metadata file is written last, so a prompt counts as done
only when its folder holds the metadata and all N samples; anything else is redone.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

# generate(prompts, seed) -> uint8 [B, H, W, 3], one image per prompt.
GenerateFn = Callable[[Sequence[str], int], np.ndarray]


def read_metadata(path: str) -> list[dict]:
  """The GenEval metadata lines of `path` (JSON objects, each with a "prompt" string)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GenEval metadata file not found: {path}")
  items = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        item = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
      if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
        raise ValueError(f"{path}:{lineno}: expected a JSON object with a string 'prompt' field")
      items.append(item)
  if not items:
    raise ValueError(f"{path}: no metadata lines")
  return items


def prompt_done(folder: str, n: int) -> bool:
  """True when `folder` holds metadata.jsonl and samples/00000.png .. samples/<n-1>.png."""
  if not os.path.isfile(os.path.join(folder, "metadata.jsonl")):
    return False
  return all(os.path.isfile(os.path.join(folder, "samples", f"{k:05d}.png")) for k in range(n))


def _save_png(image: np.ndarray, path: str) -> None:
  tmp = path + ".tmp.png"
  Image.fromarray(image).save(tmp)
  os.replace(tmp, path)


def _check_images(images: Any, count: int, prompt: str) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != count or images.shape[-1] != 3:
    raise ValueError(f"generate returned {images.dtype} {images.shape} for prompt {prompt!r}; "
                     f"expected uint8 [{count}, H, W, 3]")
  return images


def export(metadata_path: str, outdir: str, generate: GenerateFn, n: int = 4, seed: int = 0,
           batch_size: int = 4, progress: bool = False) -> dict[str, int]:
  """Writes N samples per prompt of `metadata_path` in GenEval's layout under `outdir`.

  `generate(prompts, seed)` returns uint8 [len(prompts), H, W, 3]; sample k of
  prompt i comes from a batch of the prompt repeated, seeded `seed + i * n + start`
  so results do not depend on where an interrupted run resumed.
  Returns {"prompts", "generated", "skipped"} counts.
  """
  if n < 1 or batch_size < 1:
    raise ValueError(f"n and batch_size must be >= 1, got n={n} batch_size={batch_size}")
  items = read_metadata(metadata_path)
  os.makedirs(outdir, exist_ok=True)
  generated = skipped = 0
  for index, item in enumerate(items):
    folder = os.path.join(outdir, f"{index:05d}")
    if prompt_done(folder, n):
      skipped += 1
      continue
    samples = os.path.join(folder, "samples")
    os.makedirs(samples, exist_ok=True)
    meta_path = os.path.join(folder, "metadata.jsonl")
    if os.path.exists(meta_path):
      os.remove(meta_path)  # unfinished prompt: it is redone, metadata comes last
    for start in range(0, n, batch_size):
      count = min(batch_size, n - start)
      images = generate([item["prompt"]] * count, seed + index * n + start)
      images = _check_images(images, count, item["prompt"])
      for j in range(count):
        _save_png(images[j], os.path.join(samples, f"{start + j:05d}.png"))
    with open(meta_path + ".tmp", "w", encoding="utf-8") as f:
      f.write(json.dumps(item) + "\n")
    os.replace(meta_path + ".tmp", meta_path)
    generated += 1
    if progress:
      print(f"geneval: {index + 1}/{len(items)} {item['prompt']!r}", flush=True)
  return {"prompts": len(items), "generated": generated, "skipped": skipped}
