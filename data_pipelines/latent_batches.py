"""Training batches of the U-Net stages, read from embedding caches.

A cache root (`python -m data_pipelines.build_cache`) holds one sub-cache per
image side, `<root>/<side>/`, of precomputed VAE latents and text-encoder
features. `make_batches` mixes a T2I and an edit cache at `t2i_weight :
edit_weight` through the grain loader (global shuffle, one shard per process,
exact resume) and turns each batch into what the flow-matching loss reads:

  latents        float32 [B, h, w, C]  target latents
  source_latents float32 [B, h, w, C]  edit source latents; zeros for T2I rows
  text           float32 [B, L, D], text_mask int32 [B, L]
  null_text      float32 [B, L, D], null_text_mask int32 [B, L]  (CFG dropout)
  is_edit        float32 [B]
  time_ids       float32 [B, 2]        the size ids the pipeline passes when sampling

with B = global batch / process count (this process's rows). `ProgressiveBatches`
switches between sides on a step schedule (`data.resolutions`): batches of one
side at a time, so the train step compiles once per side.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from data_pipelines import cache
from data_pipelines import loader
from dreamlite_jax.diffusion import flow

# The loss batch's keys; `prompt` (strings) is kept only where a caller asks for it.
LOSS_KEYS = ("latents", "source_latents", "text", "text_mask", "null_text", "null_text_mask",
             "is_edit", "time_ids")


def cache_dir(root: str, side: int) -> str:
  """The sub-cache of `root` at image side `side`."""
  return os.path.join(root, str(int(side)))


def open_cache(root: str, side: int) -> cache.CachedSource:
  """`CachedSource` of `<root>/<side>`; a missing one names the directory and what builds it."""
  path = cache_dir(root, side)
  if not os.path.isfile(os.path.join(path, cache.INFO_FILE)):
    raise FileNotFoundError(
        f"no embedding cache at {path} (no {cache.INFO_FILE}): build it with "
        f"python -m data_pipelines.build_cache --out {root} --resolutions {side} ...")
  return cache.CachedSource(path)


def to_loss_record(raw: Mapping[str, Any], size: tuple[int, int], crop: str,
                   rng: np.random.Generator) -> dict[str, Any]:
  """One cache record -> one row of the loss batch (float32 latents, zero T2I sources)."""
  del crop, rng  # the cache holds fixed centre crops
  latents = np.asarray(raw["latents"], np.float32)
  source = raw.get("source_latents")
  source = np.zeros_like(latents) if source is None else np.asarray(source, np.float32)
  return {"latents": latents, "source_latents": source,
          "text": np.asarray(raw["text"], np.float32),
          "text_mask": np.asarray(raw["text_mask"], np.int32),
          "null_text": np.asarray(raw["null_text"], np.float32),
          "null_text_mask": np.asarray(raw["null_text_mask"], np.int32),
          "is_edit": np.float32(raw["is_edit"]),
          "time_ids": flow.size_ids(1, size[0], size[1])[0],
          "prompt": str(raw["prompt"])}


def _check_compatible(sources: Sequence[cache.CachedSource]) -> None:
  """T2I and edit rows share a batch: their latent and text shapes must agree."""
  def shapes(src):
    f = src.info["features"]
    return {k: f[k].get("shape") for k in ("latents", "text") if k in f}
  first = shapes(sources[0])
  for src in sources[1:]:
    if shapes(src) != first:
      raise ValueError(f"caches {sources[0].cache_dir} and {src.cache_dir} cannot share a batch: "
                       f"latent/text shapes {first} vs {shapes(src)}")


def make_batches(t2i_root: str, edit_root: str, *, side: int, t2i_weight: float,
                 edit_weight: float, global_batch_size: int, seed: int,
                 keep_prompts: bool = False, process_index: int | None = None,
                 process_count: int | None = None, num_threads: int = 4,
                 prefetch: int = 8) -> loader.MappedIterator:
  """This process's loss batches at image side `side`, T2I and edit mixed by weight.

  A task with weight 0 is not read (its root may be ''). Batches are an endless,
  exactly resumable stream (`get_state` / `set_state`). With `keep_prompts` each
  batch also holds `prompt`, an object array [B] of the captions / instructions.
  """
  roots = [(t2i_root, float(t2i_weight), "t2i"), (edit_root, float(edit_weight), "edit")]
  used = [(root, w, task) for root, w, task in roots if w > 0]
  if not used:
    raise ValueError("t2i_weight + edit_weight must be > 0")
  sources = []
  for root, _, task in used:
    if not root:
      raise ValueError(f"{task}_weight > 0 but no {task} cache is given")
    sources.append(open_cache(root, side))
  _check_compatible(sources)
  it = loader.make_loader(sources, global_batch_size=global_batch_size,
                          weights=[w for _, w, _ in used], seed=seed, size=(side, side),
                          convert=to_loss_record, process_index=process_index,
                          process_count=process_count, num_threads=num_threads,
                          prefetch=prefetch)
  keys = LOSS_KEYS + (("prompt",) if keep_prompts else ())
  return loader.map_batches(it, lambda batch: {k: batch[k] for k in keys})


class ProgressiveBatches:
  """Batches of one image side at a time, switching on a step schedule.

  `resolutions` = ((side, first_step), ...) with the first starting at step 0; batch
  `k` comes from the last entry whose first_step <= k. `make(side)` builds the stream
  of a side (e.g. `make_batches` with everything but the side fixed). The state is the
  step plus the state of every stream opened so far, so a resumed run continues with
  the very next batch at the right side.
  """

  def __init__(self, make: Callable[[int], Any], resolutions: Sequence[Sequence[int]]):
    self.resolutions = [(int(side), int(start)) for side, start in resolutions]
    if not self.resolutions or self.resolutions[0][1] != 0:
      raise ValueError(f"resolutions {resolutions} must start at step 0")
    self._make = make
    self._streams: dict[int, Any] = {}
    self.step = 0

  def side_at(self, step: int) -> int:
    return [side for side, start in self.resolutions if start <= step][-1]

  def _stream(self, side: int):
    if side not in self._streams:
      self._streams[side] = self._make(side)
    return self._streams[side]

  def __iter__(self) -> "ProgressiveBatches":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._stream(self.side_at(self.step)))
    self.step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"step": self.step,
            "streams": {str(side): s.get_state() for side, s in self._streams.items()}}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self.step = int(state["step"])
    for side, stream_state in state["streams"].items():
      self._stream(int(side)).set_state(stream_state)
