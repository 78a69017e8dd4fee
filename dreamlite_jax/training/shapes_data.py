"""The shapes-world training set of the tiny job, built once and shared by its stages.

Rendering shapes, running the VAE encoder and the frozen text encoder every step
would cost more CPU than the tiny U-Net itself, so the job renders a fixed set
of T2I examples and edit triplets once (`raw.npz`), and after the VAE stage
encodes them once (`encoded.npz`: target/source latents, plus one text-feature
row per distinct caption or instruction: the shapes vocabulary is small).
`BatchIterator` then draws batches from memory; its state is just the step, so
the trainer resumes the exact data stream.
"""
from __future__ import annotations

import json
import zipfile
from typing import Any, Callable

import numpy as np
from etils import epath

from data_pipelines import shapes
from dreamlite_jax.diffusion import flow


def build_raw(num_t2i: int, num_edit: int, size: int, seed: int) -> dict[str, np.ndarray]:
  """Renders the training examples.

  Returns {"t2i_images" uint8 [N, S, S, 3], "t2i_captions" [N] str,
  "edit_sources", "edit_targets" uint8 [M, S, S, 3], "edit_instructions" [M] str}.
  Example i of each source cycles through the categories / edit types.
  """
  t2i = shapes.ShapesT2ISource("train", size, max(num_t2i, 1), seed)
  edit = shapes.ShapesEditSource("train", size, max(num_edit, 1), seed)
  t2i_ex = [t2i[i] for i in range(num_t2i)]
  edit_ex = [edit[i] for i in range(num_edit)]
  empty = np.zeros((0, size, size, 3), np.uint8)
  return {
      "t2i_images": np.stack([e["image"] for e in t2i_ex]) if t2i_ex else empty,
      "t2i_captions": np.array([e["caption"] for e in t2i_ex], dtype=str),
      "edit_sources": np.stack([e["source"] for e in edit_ex]) if edit_ex else empty,
      "edit_targets": np.stack([e["target"] for e in edit_ex]) if edit_ex else empty,
      "edit_instructions": np.array([e["instruction"] for e in edit_ex], dtype=str),
  }


# The key under which a cache file records the inputs it was built from.
INPUTS_KEY = "_built_from"


def load_or_build(path: str, build: Callable[[], dict[str, np.ndarray]], inputs: dict,
                  log: Callable[[str], None] = print, write: bool = True
                  ) -> dict[str, np.ndarray]:
  """`np.load(path)` if it was built from the same `inputs`, else `build()` saved atomically.

  `inputs` (JSON-able) names everything the arrays are a function of (data config,
  VAE checkpoint, text encoder). A file built from other inputs, by an older version
  without the record, or unreadable (truncated, corrupt) is rebuilt, with a log line
  that says why: a changed config never trains on the old data silently. `path` may
  be a URL (`gs://...`); with several processes only one should `write`.
  """
  key = json.dumps(inputs, sort_keys=True)
  path = epath.Path(path)
  if path.exists():
    try:
      with path.open("rb") as file, np.load(file) as f:
        recorded = str(f[INPUTS_KEY]) if INPUTS_KEY in f.files else None
        if recorded == key:
          return {k: f[k] for k in f.files if k != INPUTS_KEY}
      why = f"was built from {recorded}" if recorded else "does not record what it was built from"
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
      why = f"is unreadable ({type(e).__name__}: {e})"
    log(f"[data] {path} {why}; rebuilding it from {key}")
  arrays = build()
  if write:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (path.name + ".tmp")
    with tmp.open("wb") as f:
      np.savez(f, **arrays, **{INPUTS_KEY: np.array(key)})
    tmp.replace(path)
  return arrays


def _unique_features(texts: np.ndarray, encode: Callable[[list[str]], tuple[Any, Any]],
                     batch: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Encodes each distinct text once: (index [N] int32, features [U, L, D], mask [U, L])."""
  unique, index = np.unique(texts, return_inverse=True)
  feats, masks = [], []
  for i in range(0, len(unique), batch):
    chunk = list(unique[i:i + batch])
    pad = batch - len(chunk)  # one static batch shape: the encoder compiles once
    f, m = encode(chunk + [""] * pad)
    feats.append(np.asarray(f)[:len(chunk)])
    masks.append(np.asarray(m)[:len(chunk)])
  return index.astype(np.int32), np.concatenate(feats), np.concatenate(masks).astype(np.int32)


def encode(raw: dict[str, np.ndarray], vae_encode: Callable[[np.ndarray], np.ndarray],
           text_encoder: Any, batch: int = 64) -> dict[str, np.ndarray]:
  """Latents and text features of `build_raw`'s examples.

  Args:
    vae_encode: uint8 images [B, S, S, 3] -> latents [B, S/f, S/f, 4] (f: the VAE's scale).
    text_encoder: a `TextEncoder` (`encode_generate`, `encode_edit`, unconditional variants).
  Returns: t2i_latents [N, h, w, 4], t2i_text_index [N], t2i_text [U, L, D], t2i_mask [U, L],
    edit_targets / edit_sources latents [M, h, w, 4], edit_text_index, edit_text, edit_mask,
    null_t2i_text [1, L, D], null_t2i_mask [1, L], null_edit_text, null_edit_mask.
  """
  def latents(images):
    out = [np.asarray(vae_encode(images[i:i + batch])) for i in range(0, len(images), batch)]
    return np.concatenate(out).astype(np.float32)

  out = {}
  if len(raw["t2i_images"]):
    out["t2i_latents"] = latents(raw["t2i_images"])
    (out["t2i_text_index"], out["t2i_text"],
     out["t2i_mask"]) = _unique_features(raw["t2i_captions"], text_encoder.encode_generate, batch)
  if len(raw["edit_sources"]):
    out["edit_targets"] = latents(raw["edit_targets"])
    out["edit_sources"] = latents(raw["edit_sources"])
    (out["edit_text_index"], out["edit_text"],
     out["edit_mask"]) = _unique_features(raw["edit_instructions"], text_encoder.encode_edit, batch)
  f, m = text_encoder.encode_generate_unconditional(1)
  out["null_t2i_text"], out["null_t2i_mask"] = np.asarray(f), np.asarray(m).astype(np.int32)
  f, m = text_encoder.encode_edit_unconditional(1)
  out["null_edit_text"], out["null_edit_mask"] = np.asarray(f), np.asarray(m).astype(np.int32)
  return out


class BatchIterator:
  """Random batches mixing T2I and edit examples at `edit_fraction`.

  Yields the pretraining loss's batch: latents, text, text_mask, source_latents,
  is_edit, null_text, null_text_mask (per example: the T2I or edit null prompt) and
  time_ids (the `image_size` pixel size ids the pipeline passes when sampling).
  Global batch `k` (`batch_size` rows) is a pure function of (seed, k); process `i` of
  `n` gets its rows `[i * batch_size / n, (i + 1) * batch_size / n)`, so the processes
  together train on the global batch. `get_state`/`set_state` carry k.
  """

  def __init__(self, data: dict[str, np.ndarray], batch_size: int, edit_fraction: float,
               seed: int, image_size: int, process_index: int = 0, process_count: int = 1):
    if not 0.0 <= edit_fraction <= 1.0:
      raise ValueError(f"edit_fraction must be in [0, 1], got {edit_fraction}")
    if edit_fraction < 1.0 and "t2i_latents" not in data:
      raise ValueError("edit_fraction < 1 but the shapes data has no T2I examples")
    if edit_fraction > 0.0 and "edit_targets" not in data:
      raise ValueError("edit_fraction > 0 but the shapes data has no edit examples")
    if batch_size % process_count:
      raise ValueError(f"batch_size {batch_size} is not divisible by {process_count} processes")
    self.data, self.batch_size, self.edit_fraction, self.seed = data, batch_size, edit_fraction, seed
    self.image_size = image_size
    per_process = batch_size // process_count
    self._rows = slice(process_index * per_process, (process_index + 1) * per_process)
    self.step = 0

  def __iter__(self) -> "BatchIterator":
    return self

  def get_state(self) -> dict[str, int]:
    return {"step": self.step}

  def set_state(self, state: dict[str, int]) -> None:
    self.step = int(state["step"])

  def __next__(self) -> dict[str, np.ndarray]:
    d, b = self.data, self.batch_size
    rng = np.random.default_rng([self.seed, self.step])
    self.step += 1
    is_edit = rng.random(b) < self.edit_fraction
    n_edit = int(is_edit.sum())
    any_latents = d["t2i_latents"] if "t2i_latents" in d else d["edit_targets"]
    latents = np.zeros((b,) + any_latents.shape[1:], np.float32)
    source = np.zeros_like(latents)
    length = d["null_t2i_text"].shape[1]
    text = np.zeros((b, length, d["null_t2i_text"].shape[2]), np.float32)
    mask = np.zeros((b, length), np.int32)
    null_text = np.repeat(d["null_t2i_text"], b, axis=0)
    null_mask = np.repeat(d["null_t2i_mask"], b, axis=0)
    if n_edit < b:
      i = rng.integers(len(d["t2i_latents"]), size=b - n_edit)
      t = d["t2i_text_index"][i]
      latents[~is_edit], text[~is_edit], mask[~is_edit] = (
          d["t2i_latents"][i], d["t2i_text"][t], d["t2i_mask"][t])
    if n_edit:
      i = rng.integers(len(d["edit_targets"]), size=n_edit)
      t = d["edit_text_index"][i]
      latents[is_edit], source[is_edit] = d["edit_targets"][i], d["edit_sources"][i]
      text[is_edit], mask[is_edit] = d["edit_text"][t], d["edit_mask"][t]
      null_text[is_edit], null_mask[is_edit] = d["null_edit_text"], d["null_edit_mask"]
    batch = {"latents": latents, "text": text, "text_mask": mask, "source_latents": source,
             "is_edit": is_edit.astype(np.float32), "null_text": null_text,
             "null_text_mask": null_mask,
             "time_ids": flow.size_ids(b, self.image_size, self.image_size)}
    return {k: v[self._rows] for k, v in batch.items()}
