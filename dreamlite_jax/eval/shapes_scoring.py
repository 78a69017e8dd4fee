"""Shapes-world scores of a U-Net: what the job's `eval` stage and every stage's check run.

`evaluate(pipe, sets, sampler, batch_size, seed)` samples the fixed evaluation sets
(T2I prompts per GenEval-style category, edit triplets per ImgEdit-style type, held-in
and held-out) with the pipeline and a `SamplerConfig` and scores them exactly with
`shapes_eval`.
Scores are nested the way `scores.json` holds them:
  {"t2i": {"overall", "heldout_overall", <category>..., "heldout_<category>"...},
   "edit": {"accuracy", "heldout_accuracy", <type>..., "heldout_<type>"...}}.
Sample grids (T2I: prompt over image; edit: source | instruction | result) go
to PNGs next to the stage's outputs.
"""
from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np
from PIL import Image, ImageDraw

from data_pipelines import shapes
from dreamlite_jax.diffusion.sampling import SamplerConfig
from dreamlite_jax.eval import shapes_eval

_SETS: dict[tuple, dict] = {}


def eval_sets(config: ml_collections.ConfigDict, per_category: int | None = None,
              per_type: int | None = None) -> dict[str, list[dict]]:
  """The fixed evaluation sets (`shapes.EVAL_SEED`), memoised per size and counts.

  Returns {"t2i": held-in prompts, "t2i_heldout", "edit": held-in triplets, "edit_heldout"}.
  """
  e = config.eval
  size = int(config.data.image_size)
  per_category = e.per_category if per_category is None else per_category
  per_type = e.per_type if per_type is None else per_type
  key = (size, per_category, per_type)
  if key not in _SETS:
    _SETS[key] = {
        "t2i": shapes.t2i_eval_prompts("train", per_category, size),
        "t2i_heldout": shapes.t2i_eval_prompts("heldout", per_category, size),
        "edit": shapes.edit_eval_set("train", per_type, size),
        "edit_heldout": shapes.edit_eval_set("heldout", per_type, size),
    }
  return _SETS[key]


def _chunks(items: list, size: int):
  for i in range(0, len(items), size):
    yield items[i:i + size]


def _pad(items: list, size: int) -> list:
  return items + [items[-1]] * (size - len(items))


def sample_t2i(pipe, items: list[dict], sampler: SamplerConfig, batch_size: int,
               seed: int) -> np.ndarray:
  """uint8 [N, S, S, 3] samples of the prompts, in batches of `batch_size` (the last one
  padded: one compilation), each batch from `seed`."""
  out = []
  size = int(items[0]["metadata"]["scene"]["height"])
  for chunk in _chunks(items, batch_size):
    prompts = _pad([it["caption"] for it in chunk], batch_size)
    images = pipe.generate(prompts, seed=seed, steps=sampler.steps, guidance=sampler.guidance,
                           size=size, output="np")
    out.append(images[:len(chunk)])
  return np.concatenate(out)


def sample_edit(pipe, items: list[dict], sampler: SamplerConfig, batch_size: int,
                seed: int) -> np.ndarray:
  """uint8 [N, S, S, 3] edit results of the triplets' sources and instructions (batched
  as in `sample_t2i`)."""
  out = []
  for chunk in _chunks(items, batch_size):
    padded = _pad(chunk, batch_size)
    images = pipe.edit([it["source"] for it in padded], [it["instruction"] for it in padded],
                       seed=seed, steps=sampler.steps, guidance=sampler.guidance,
                       image_guidance=sampler.image_guidance, output="np")
    out.append(images[:len(chunk)])
  return np.concatenate(out)


def nest_scores(t2i: dict[str, float], edit: dict[str, float]) -> dict[str, dict[str, float]]:
  """`shapes_eval.score_*` dicts -> the nested `scores.json` layout (see module docstring)."""
  def rename(scores, overall):
    out = {}
    for k, v in scores.items():
      name = k.replace("heldout/", "heldout_")
      out[{"overall": overall, "heldout_overall": f"heldout_{overall}"}.get(name, name)] = v
    return out
  return {"t2i": rename(t2i, "overall"), "edit": rename(edit, "accuracy")}


def evaluate(pipe, sets: dict[str, list[dict]], sampler: SamplerConfig, batch_size: int,
             seed: int, grid_dir: str | None = None, prefix: str = "") -> dict[str, Any]:
  """Samples every set with `sampler` (`batch_size` rows per call, each call from `seed`)
  and scores it; optionally writes `<prefix>t2i.png` / `<prefix>edit.png`."""
  t2i_items = sets["t2i"] + sets["t2i_heldout"]
  t2i_images = sample_t2i(pipe, t2i_items, sampler, batch_size, seed)
  t2i = shapes_eval.score_t2i(t2i_images, [it["metadata"] for it in t2i_items])
  edit_items = sets["edit"] + sets["edit_heldout"]
  edit_images = sample_edit(pipe, edit_items, sampler, batch_size, seed)
  edit = shapes_eval.score_edit([it["source"] for it in edit_items], edit_images,
                                [it["metadata"] for it in edit_items])
  scores = nest_scores(t2i, edit)
  if grid_dir is not None:
    os.makedirs(grid_dir, exist_ok=True)
    t2i_grid(os.path.join(grid_dir, f"{prefix}t2i.png"), t2i_items, t2i_images)
    edit_grid(os.path.join(grid_dir, f"{prefix}edit.png"), edit_items, edit_images)
  return scores


def _pick_examples(items: list[dict], key: str, n: int) -> list[int]:
  """Indices of up to `n` items, round-robin over `items[i][key]` so every kind shows up."""
  seen: dict[str, list[int]] = {}
  for i, it in enumerate(items):
    seen.setdefault(it[key], []).append(i)
  picked, r = [], 0
  while len(picked) < n and any(r < len(v) for v in seen.values()):
    picked += [v[r] for v in seen.values() if r < len(v)]
    r += 1
  return picked[:n]


_MEASURE = ImageDraw.Draw(Image.new("RGB", (1, 1)))


def _wrap(text: str, width: int) -> str:
  """`text` broken into lines at most `width - 4` pixels wide (a long word gets its own line)."""
  lines: list[str] = []
  for word in text.split():
    if lines and _MEASURE.textlength(f"{lines[-1]} {word}") <= width - 4:
      lines[-1] += f" {word}"
    else:
      lines.append(word)
  return "\n".join(lines)


def _label_height(texts: list[str], width: int) -> int:
  """Pixels that the tallest of `texts`, wrapped to `width`, needs."""
  return max(_MEASURE.multiline_textbbox((2, 2), _wrap(t, width))[3] for t in texts) + 4


def _framed(cell: np.ndarray) -> np.ndarray:
  """A 1-pixel grey frame, so white scenes and white labels stay apart."""
  return np.pad(cell, ((1, 1), (1, 1), (0, 0)), constant_values=128)


def _label(text: str, width: int, height: int) -> np.ndarray:
  """The whole text, wrapped, black on white; `height` must come from `_label_height`."""
  canvas = Image.new("RGB", (width, height), (255, 255, 255))
  ImageDraw.Draw(canvas).multiline_text((2, 2), _wrap(text, width), fill=(0, 0, 0))
  return np.asarray(canvas)


def t2i_grid(path: str, items: list[dict], images: np.ndarray, n: int = 24,
             columns: int = 6, scale: int = 3) -> str:
  """PNG of prompt captions over their samples (round-robin over categories); every
  caption is shown whole (labels as tall as the longest needs)."""
  picked = _pick_examples(items, "category", n)
  width = images.shape[2] * scale
  height = _label_height([items[i]["caption"] for i in picked], width)
  cells = []
  for i in picked:
    im = np.kron(images[i], np.ones((scale, scale, 1), np.uint8))
    cells.append(_framed(np.concatenate([_label(items[i]["caption"], width, height), im])))
  rows = [np.concatenate(_pad(cells[r:r + columns], columns) if len(cells) >= columns
                         else cells[r:r + columns], axis=1) for r in range(0, len(cells), columns)]
  width = max(r.shape[1] for r in rows)
  rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
  Image.fromarray(np.concatenate(rows)).save(path)
  return path


def edit_grid(path: str, items: list[dict], results: np.ndarray, n: int = 14,
              scale: int = 2) -> str:
  """PNG with one row per edit: source | instruction | result | ground-truth target; the
  instruction column widens until every instruction fits beside its images."""
  picked = _pick_examples(items, "edit_type", n)
  big = lambda x: np.kron(x, np.ones((scale, scale, 1), np.uint8))
  side = items[picked[0]]["source"].shape[0] * scale if picked else 0
  width = 2 * side
  texts = [items[i]["instruction"] for i in picked]
  while texts and _label_height(texts, width) > side:
    width += side // 2
  rows = []
  for i in picked:
    src, res, tgt = big(items[i]["source"]), big(results[i]), big(items[i]["target"])
    rows.append(np.concatenate([_framed(x) for x in (
        src, _label(items[i]["instruction"], width, side), res, tgt)], axis=1))
  Image.fromarray(np.concatenate(rows)).save(path)
  return path
