"""ImgEdit-style edit export: a checkpoint's edits of a benchmark manifest, named by item key.

The manifest is a JSON dict `key -> {"id" or "image": image path relative to the
image folder, "prompt" or "instruction": text, "edit_type": str}`. Each item's
result goes to `<outdir>/<key>.png` (written under a temporary name, then
renamed); existing results are skipped, so an interrupted export resumes.
Items that cannot be loaded are counted per reason in `<outdir>/summary.json`.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import numpy as np
from PIL import Image

# edit(images uint8 [H, W, 3] list, instructions, seed) -> uint8 [B, H, W, 3].
EditFn = Callable[[Sequence[np.ndarray], Sequence[str], int], np.ndarray]

REASONS = ("bad_entry", "path_escapes_folder", "missing_file", "undecodable_image")


def read_manifest(path: str) -> dict[str, dict]:
  """The manifest dict of `path` (JSON object of item key -> item dict)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"ImgEdit manifest not found: {path}")
  with open(path, encoding="utf-8") as f:
    try:
      manifest = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
  if not isinstance(manifest, dict):
    raise ValueError(f"{path}: expected a JSON object of item key -> item, got {type(manifest).__name__}")
  return manifest


def _safe_key(key: str) -> bool:
  return bool(key) and "/" not in key and "\\" not in key and key not in (".", "..")


def load_item(key: str, item: object, image_dir: str) -> tuple[np.ndarray | None, str | None, str]:
  """(uint8 [H, W, 3] image, instruction, "") or (None, None, failure reason)."""
  if not isinstance(item, dict) or not _safe_key(str(key)):
    return None, None, "bad_entry"
  rel = item.get("id", item.get("image"))
  text = item.get("prompt", item.get("instruction"))
  if not isinstance(rel, str) or not isinstance(text, str):
    return None, None, "bad_entry"
  root = os.path.realpath(image_dir)
  path = os.path.realpath(os.path.join(root, rel))
  if os.path.isabs(rel) or os.path.commonpath([root, path]) != root:
    return None, None, "path_escapes_folder"
  if not os.path.isfile(path):
    return None, None, "missing_file"
  try:
    with Image.open(path) as im:
      image = np.asarray(im.convert("RGB"))
  except (OSError, ValueError, Image.DecompressionBombError):
    return None, None, "undecodable_image"
  return image, text, ""


def export(manifest_path: str, image_dir: str, outdir: str, edit: EditFn, seed: int = 0,
           progress: bool = False) -> dict:
  """Writes `<outdir>/<key>.png` for every loadable item; returns and writes the summary.

  Summary: {"items", "edited", "skipped" (already present), "failed" (count),
  "failed_by_reason" {reason: count}, "failed_items" {key: reason}}.
  """
  if not os.path.isdir(image_dir):
    raise FileNotFoundError(f"ImgEdit image folder not found: {image_dir}")
  manifest = read_manifest(manifest_path)
  os.makedirs(outdir, exist_ok=True)
  edited = skipped = 0
  failed: dict[str, str] = {}
  for i, (key, item) in enumerate(sorted(manifest.items())):
    out = os.path.join(outdir, f"{key}.png") if _safe_key(str(key)) else None
    if out is not None and os.path.isfile(out):
      skipped += 1
      continue
    image, text, reason = load_item(key, item, image_dir)
    if reason:
      failed[key] = reason
      continue
    result = np.asarray(edit([image], [text], seed + i))
    if result.dtype != np.uint8 or result.ndim != 4 or result.shape[0] != 1 or result.shape[-1] != 3:
      raise ValueError(f"edit returned {result.dtype} {result.shape} for item {key!r}; "
                       f"expected uint8 [1, H, W, 3]")
    Image.fromarray(result[0]).save(out + ".tmp.png")
    os.replace(out + ".tmp.png", out)
    edited += 1
    if progress:
      print(f"imgedit: {i + 1}/{len(manifest)} {key}", flush=True)
  by_reason = {r: sum(1 for v in failed.values() if v == r) for r in REASONS}
  summary = {"items": len(manifest), "edited": edited, "skipped": skipped, "failed": len(failed),
             "failed_by_reason": by_reason, "failed_items": failed}
  with open(os.path.join(outdir, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  return summary
