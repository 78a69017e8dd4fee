"""Synthetic "shapes world": coloured shapes on a plain background, exact ground truth.

The embedded default trains every stage on a laptop CPU, so it needs data that a tiny
diffusion model (32x32 pixels -> 8x8x4 latents) can learn and that a program can score
exactly. Shapes are big (a third of the image or more), crisp (no anti-aliasing), on a
dark background and drawn from a palette of colours far apart in RGB, so colour
segmentation recovers them, from the renders and from the tiny VAE's round-trips alike. Captions mirror GenEval's categories
and edit triplets mirror ImgEdit's edit types; every example carries its full scene.

A fixed set of (colour, shape) pairs, `HELDOUT_PAIRS`, never appears in a 'train' image,
caption or instruction; every 'heldout' example names one of them (compositional
generalisation). Everything is a pure function of (seed, index).

Scene (also the metadata's "scene"/"source"/"target"): {"height", "width", "background",
"objects": [{"shape", "color", "center": [x, y] (pixels, bbox centre), "size": side of
the bbox in pixels}]}.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from data_pipelines import shapes_captions

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (40, 70, 230),
    "yellow": (240, 220, 40), "magenta": (210, 50, 220), "cyan": (40, 210, 220)}
# Dark backgrounds only: the tiny VAE's round-trips of shapes on white or lighter grays come
# back with colours bled into the background (blue on white reads as blue + cyan) and
# diamonds as circles (docs/results.md, "The VAE and the edit ceiling").
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0), "gray": (56, 56, 56)}
SHAPES = ("circle", "square", "triangle", "diamond")
# One held-out colour per shape, each colour at most once: every colour and every shape
# is still seen in training, only these combinations are not.
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("blue", "circle"), ("yellow", "square"), ("red", "triangle"), ("green", "diamond"))
SPLITS = ("train", "heldout")
T2I_CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position",
                  "color_attr")
EDIT_TYPES = ("recolor", "add", "remove", "replace", "move", "resize", "background")
# Only categories whose text names a colour-shape pair can test unseen pairs.
HELDOUT_T2I_CATEGORIES = ("colors", "color_attr")
HELDOUT_EDIT_TYPES = ("recolor", "add", "replace")
RELATIONS = ("left of", "right of", "above", "below")
MOVE_DIRECTIONS = ("left", "right", "up", "down")
T2I_BACKGROUND = "black"
EVAL_SEED = 1_000_003  # fixed evaluation sets; training sources default to seed 0
# Object bbox side as a fraction of the image's short side: at least 11.5 px at the job's
# 32x32, the smallest a 4x VAE round-trip keeps the shape of (docs/results.md); two
# objects of the largest size still fit side by side.
SIZE_RANGE = (0.36, 0.44)
COUNT_SIZE_RANGE = (0.36, 0.4)  # the same, for counting scenes of 3 or more objects
MAX_EDIT_OBJECTS = 2  # objects in an edit source
RESIZE_FACTOR = 1.5
RESIZE_RANGE = (0.27, 0.66)  # a resized object's side stays within this fraction
_ATTEMPTS = 200

Scene = dict[str, Any]


def world() -> dict[str, Any]:
  """The layout constants every rendered example depends on (for cache keys and records)."""
  return {"size_range": list(SIZE_RANGE), "count_size_range": list(COUNT_SIZE_RANGE),
          "max_edit_objects": MAX_EDIT_OBJECTS, "resize_factor": RESIZE_FACTOR,
          "resize_range": list(RESIZE_RANGE),
          "backgrounds": {k: list(v) for k, v in BACKGROUNDS.items()}}


def pairs_for(split: str) -> list[tuple[str, str]]:
  """(colour, shape) pairs an example of `split` may contain (heldout: only new ones)."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  if split == "heldout":
    return list(HELDOUT_PAIRS)
  return [(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELDOUT_PAIRS]


def shape_mask(obj: dict[str, Any], height: int, width: int) -> np.ndarray:
  """Boolean [H, W] mask of one object, sampled at pixel centres (no anti-aliasing)."""
  ys = np.arange(height, dtype=np.float64)[:, None] + 0.5
  xs = np.arange(width, dtype=np.float64)[None, :] + 0.5
  cx, cy = obj["center"]
  r = obj["size"] / 2
  dx, dy = xs - cx, ys - cy
  shape = obj["shape"]
  if shape == "circle":
    return dx * dx + dy * dy <= r * r
  if shape == "square":
    return (np.abs(dx) <= r) & (np.abs(dy) <= r)
  if shape == "triangle":  # apex up, base at the bottom of the bbox
    return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
  if shape == "diamond":
    return np.abs(dx) + np.abs(dy) <= r
  raise ValueError(f"unknown shape {shape!r} (known: {SHAPES})")


def render(scene: Scene) -> np.ndarray:
  """Draws a scene; returns uint8 [H, W, 3]."""
  h, w = scene["height"], scene["width"]
  image = np.empty((h, w, 3), np.uint8)
  image[:] = BACKGROUNDS[scene["background"]]
  for obj in scene["objects"]:
    image[shape_mask(obj, h, w)] = COLORS[obj["color"]]
  return image


def _image_hw(size: int | Sequence[int]) -> tuple[int, int]:
  h, w = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
  if h < 20 or w < 20:  # two objects of a third of the side each, a gap and margins
    raise ValueError(f"shapes image size must be at least 20x20, got {h}x{w}")
  return int(h), int(w)


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
  return items[int(rng.integers(len(items)))]


def _obj(shape: str, color: str, cx: float, cy: float, size: float) -> dict[str, Any]:
  # Rounded before rendering so the stored numbers are exactly what was drawn.
  return {"shape": shape, "color": color, "center": [round(float(cx), 2), round(float(cy), 2)],
          "size": round(float(size), 2)}


def _box(center: Sequence[float], size: float) -> tuple[float, float, float, float]:
  r = size / 2
  return (center[0] - r, center[1] - r, center[0] + r, center[1] + r)


def _fits(box, others, h: int, w: int) -> bool:
  """Inside the image (1 px margin) and a clear gap from every other bbox."""
  m = min(h, w)
  margin, gap = max(1.0, 0.02 * m), max(2.0, 0.04 * m)
  if box[0] < margin or box[1] < margin or box[2] > w - margin or box[3] > h - margin:
    return False
  return all(box[0] >= o[2] + gap or o[0] >= box[2] + gap or
             box[1] >= o[3] + gap or o[1] >= box[3] + gap for o in others)


def _place(rng, sizes: Sequence[float], h: int, w: int,
           taken: Sequence[tuple] = ()) -> list[tuple[float, float]] | None:
  """Random non-overlapping centres for objects of `sizes`, or None if none found."""
  boxes, centers = list(taken), []
  for size in sizes:
    r = size / 2
    for _ in range(_ATTEMPTS):
      c = (rng.uniform(r, w - r), rng.uniform(r, h - r))
      if _fits(_box(c, size), boxes, h, w):
        boxes.append(_box(c, size))
        centers.append(c)
        break
    else:
      return None
  return centers


def _sizes(rng, n: int, m: int, size_range: Sequence[float] | None = None):
  lo, hi = size_range or SIZE_RANGE
  return [round(float(s), 2) for s in rng.uniform(lo, hi, n) * m]


def _scene(h: int, w: int, background: str, objects: list[dict[str, Any]]) -> Scene:
  return {"height": h, "width": w, "background": background, "objects": objects}


def _t2i_layout(rng, split: str, category: str, h: int, w: int):
  """One attempt at a T2I scene: (objects, relation) or None when placement failed."""
  m = min(h, w)
  train = pairs_for("train")
  color_of = lambda shape: _pick(rng, [c for c, s in train if s == shape])
  if category in ("single_object", "colors"):
    color, shape = _pick(rng, pairs_for(split)) if category == "colors" else (
        None, _pick(rng, SHAPES))
    color = color or color_of(shape)
    ids, sizes = [(color, shape)], _sizes(rng, 1, m)
  elif category == "two_objects":
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:2]]
    ids, sizes = [(color_of(s), s) for s in shapes], _sizes(rng, 2, m)
  elif category == "counting":
    n, shape = int(rng.integers(1, 5)), _pick(rng, SHAPES)
    ids = [(color_of(shape), shape)] * n
    sizes = _sizes(rng, n, m, COUNT_SIZE_RANGE if n >= 3 else None)
  elif category == "color_attr":
    for _ in range(_ATTEMPTS):
      a, b = _pick(rng, pairs_for(split)), _pick(rng, train)
      if a[0] != b[0] and a[1] != b[1]:
        break
    ids = [a, b] if rng.integers(2) else [b, a]
    sizes = _sizes(rng, 2, m)
  elif category == "position":
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:2]]
    ids, sizes = [(color_of(s), s) for s in shapes], _sizes(rng, 2, m)
    relation = _pick(rng, RELATIONS)
    d, off = rng.uniform(0.4, 0.62) * m, rng.uniform(-0.12, 0.12) * m
    step = {"left of": (-d, off), "right of": (d, off), "above": (off, -d),
            "below": (off, d)}[relation]
    for _ in range(_ATTEMPTS):  # objects[0] is `relation` objects[1]
      b = (rng.uniform(0, w), rng.uniform(0, h))
      a = (b[0] + step[0], b[1] + step[1])
      box_b = _box(b, sizes[1])
      if _fits(box_b, [], h, w) and _fits(_box(a, sizes[0]), [box_b], h, w):
        objs = [_obj(s, c, *p, z) for (c, s), p, z in zip(ids, (a, b), sizes)]
        return objs, relation
    return None
  else:
    raise ValueError(f"unknown T2I category {category!r} (known: {T2I_CATEGORIES})")
  centers = _place(rng, sizes, h, w)
  if centers is None:
    return None
  return [_obj(s, c, *p, z) for (c, s), p, z in zip(ids, centers, sizes)], None


def t2i_spec(category: str, objects: list[dict[str, Any]],
             relation: str | None) -> dict[str, Any]:
  """GenEval-style requirements: include [{shape, count, color?, position?}], exclude."""
  first = {"shape": objects[0]["shape"], "count": 1}
  if category == "single_object":
    return {"include": [first], "exclude": []}
  if category == "counting":
    n = len(objects)
    return {"include": [dict(first, count=n)], "exclude": [dict(first, count=n + 1)]}
  colored = [{"shape": o["shape"], "count": 1, "color": o["color"]} for o in objects]
  if category == "colors":
    return {"include": colored[:1], "exclude": []}
  if category == "color_attr":
    return {"include": colored, "exclude": []}
  second = {"shape": objects[1]["shape"], "count": 1}
  if category == "two_objects":
    return {"include": [first, second], "exclude": []}
  if category == "position":  # GenEval: include[1] is `relation` include[0]
    return {"include": [second, dict(first, position=[relation, 0])], "exclude": []}
  raise ValueError(f"unknown T2I category {category!r}")


def make_t2i_example(split: str, category: str, seed: int, index: int,
                     size: int | Sequence[int] = 64) -> dict[str, Any]:
  """One T2I example: {"image" uint8 [H, W, 3], "caption", "category", "metadata" dict}."""
  h, w = _image_hw(size)
  if split == "heldout" and category not in HELDOUT_T2I_CATEGORIES:
    raise ValueError(f"category {category!r} has no held-out prompts "
                     f"(held-out categories: {HELDOUT_T2I_CATEGORIES})")
  pairs_for(split)
  rng = np.random.default_rng([seed, index, 0])
  for _ in range(_ATTEMPTS):
    layout = _t2i_layout(rng, split, category, h, w)
    if layout is not None:
      break
  else:
    raise RuntimeError(f"could not lay out a {category} scene at {h}x{w}")
  objects, relation = layout
  scene = _scene(h, w, T2I_BACKGROUND, objects)
  caption = shapes_captions.t2i_caption(category, objects, relation)
  metadata = {"split": split, "category": category, "seed": seed, "index": index,
              "caption": caption, "scene": scene, "relation": relation,
              "spec": t2i_spec(category, objects, relation)}
  return {"image": render(scene), "caption": caption, "category": category,
          "metadata": metadata}


def _apply_edit(rng, split: str, edit_type: str, source: Scene):
  """(target objects, target background, params) for one edit of `source`, or None."""
  h, w, m = source["height"], source["width"], min(source["height"], source["width"])
  objs = source["objects"]
  present = {(o["color"], o["shape"]) for o in objs}
  new_pairs = [p for p in pairs_for(split) if p not in present]
  target = [dict(o, center=list(o["center"])) for o in objs]
  background = source["background"]
  if edit_type == "background":
    to = _pick(rng, [b for b in BACKGROUNDS if b != background])
    return target, to, {"from_background": background, "to_background": to}
  if edit_type == "add":
    if not new_pairs:
      return None
    color, shape = _pick(rng, new_pairs)
    size = _sizes(rng, 1, m)[0]
    centers = _place(rng, [size], h, w, [_box(o["center"], o["size"]) for o in objs])
    if centers is None:
      return None
    target.append(_obj(shape, color, *centers[0], size))
    return target, background, {"color": color, "shape": shape}
  k = int(rng.integers(len(objs)))
  obj, others = objs[k], [_box(o["center"], o["size"]) for i, o in enumerate(objs) if i != k]
  params = {"object": k, "color": obj["color"], "shape": obj["shape"]}
  if edit_type == "remove":
    del target[k]
    return target, background, params
  if edit_type == "recolor":
    colors = [c for c, s in new_pairs if s == obj["shape"] and c != obj["color"]]
    if not colors:
      return None
    target[k]["color"] = params["to_color"] = _pick(rng, colors)
    return target, background, params
  if edit_type == "replace":
    shapes = [s for c, s in new_pairs if c == obj["color"] and s != obj["shape"]]
    if not shapes:
      return None
    target[k]["shape"] = params["to_shape"] = _pick(rng, shapes)
    return target, background, params
  if edit_type == "move":
    direction = _pick(rng, MOVE_DIRECTIONS)
    d = rng.uniform(0.25, 0.45) * m
    dx, dy = {"left": (-d, 0), "right": (d, 0), "up": (0, -d), "down": (0, d)}[direction]
    moved = _obj(obj["shape"], obj["color"], obj["center"][0] + dx, obj["center"][1] + dy,
                 obj["size"])
    if not _fits(_box(moved["center"], moved["size"]), others, h, w):
      return None
    target[k] = moved
    params["direction"] = direction
    return target, background, params
  if edit_type == "resize":
    options = (["bigger"] if obj["size"] * RESIZE_FACTOR <= RESIZE_RANGE[1] * m else []) + (
        ["smaller"] if obj["size"] / RESIZE_FACTOR >= RESIZE_RANGE[0] * m else [])
    if not options:
      return None
    direction = _pick(rng, options)
    size = obj["size"] * (RESIZE_FACTOR if direction == "bigger" else 1 / RESIZE_FACTOR)
    target[k] = _obj(obj["shape"], obj["color"], *obj["center"], size)
    if not _fits(_box(target[k]["center"], target[k]["size"]), others, h, w):
      return None
    params.update(direction=direction, factor=RESIZE_FACTOR)
    return target, background, params
  raise ValueError(f"unknown edit type {edit_type!r} (known: {EDIT_TYPES})")


def make_edit_example(split: str, edit_type: str, seed: int, index: int,
                      size: int | Sequence[int] = 64) -> dict[str, Any]:
  """One edit triplet: {"source", "target" uint8 [H, W, 3], "instruction", "edit_type",
  "metadata" dict with "source"/"target" scenes and the edit's "params"}.

  Source scenes hold 1-3 objects of distinct (colour, shape) identities, so an
  instruction naming "the red circle" is unambiguous. Source objects always come from
  the training pairs; in 'heldout' the edit introduces a held-out pair.
  """
  h, w = _image_hw(size)
  if split == "heldout" and edit_type not in HELDOUT_EDIT_TYPES:
    raise ValueError(f"edit type {edit_type!r} has no held-out instructions "
                     f"(held-out edit types: {HELDOUT_EDIT_TYPES})")
  if edit_type not in EDIT_TYPES:
    raise ValueError(f"unknown edit type {edit_type!r} (known: {EDIT_TYPES})")
  train = pairs_for("train")
  rng = np.random.default_rng([seed, index, 1])
  for _ in range(_ATTEMPTS):
    n = int(rng.integers(1, MAX_EDIT_OBJECTS + 1))
    ids = [train[i] for i in rng.permutation(len(train))[:n]]
    sizes = _sizes(rng, n, min(h, w))
    centers = _place(rng, sizes, h, w)
    if centers is None:
      continue
    objs = [_obj(s, c, *p, z) for (c, s), p, z in zip(ids, centers, sizes)]
    source = _scene(h, w, _pick(rng, list(BACKGROUNDS)), objs)
    edited = _apply_edit(rng, split, edit_type, source)
    if edited is not None:
      break
  else:
    raise RuntimeError(f"could not make a {edit_type} edit at {h}x{w}")
  target_objs, target_bg, params = edited
  target = _scene(h, w, target_bg, target_objs)
  instruction = shapes_captions.edit_instruction(edit_type, params)
  metadata = {"split": split, "edit_type": edit_type, "seed": seed, "index": index,
              "instruction": instruction, "params": params, "source": source,
              "target": target}
  return {"source": render(source), "target": render(target), "instruction": instruction,
          "edit_type": edit_type, "metadata": metadata}


def _categories(split: str, given: Sequence[str] | None, known: Sequence[str],
                heldout: Sequence[str], what: str) -> tuple[str, ...]:
  pairs_for(split)
  cats = tuple(given) if given is not None else (heldout if split == "heldout" else known)
  allowed = heldout if split == "heldout" else known
  bad = [c for c in cats if c not in allowed]
  if not cats or bad:
    raise ValueError(f"{what} {bad or cats} not available in split {split!r} "
                     f"(available: {allowed})")
  return cats


class ShapesT2ISource:
  """Random-access T2I source for grain. Example i has category categories[i % len].

  __getitem__ returns {"image": uint8 [H, W, 3], "caption": str, "category": str,
  "metadata": JSON str}.
  """

  def __init__(self, split: str = "train", size: int | Sequence[int] = 64,
               num_examples: int = 100_000, seed: int = 0,
               categories: Sequence[str] | None = None):
    self.split, self.size, self.num_examples, self.seed = split, _image_hw(size), num_examples, seed
    self.categories = _categories(split, categories, T2I_CATEGORIES, HELDOUT_T2I_CATEGORIES,
                                  "T2I categories")

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = _check_index(index, self.num_examples)
    ex = make_t2i_example(self.split, self.categories[index % len(self.categories)],
                          self.seed, index, self.size)
    return dict(ex, metadata=json.dumps(ex["metadata"]))

  def __repr__(self) -> str:
    return (f"ShapesT2ISource(split={self.split!r}, size={self.size}, "
            f"num_examples={self.num_examples}, seed={self.seed})")


class ShapesEditSource:
  """Random-access edit-triplet source for grain. Example i has type edit_types[i % len].

  __getitem__ returns {"source": uint8 [H, W, 3], "target": uint8 [H, W, 3],
  "instruction": str, "edit_type": str, "metadata": JSON str}.
  """

  def __init__(self, split: str = "train", size: int | Sequence[int] = 64,
               num_examples: int = 100_000, seed: int = 0,
               edit_types: Sequence[str] | None = None):
    self.split, self.size, self.num_examples, self.seed = split, _image_hw(size), num_examples, seed
    self.edit_types = _categories(split, edit_types, EDIT_TYPES, HELDOUT_EDIT_TYPES,
                                  "edit types")

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = _check_index(index, self.num_examples)
    ex = make_edit_example(self.split, self.edit_types[index % len(self.edit_types)],
                           self.seed, index, self.size)
    return dict(ex, metadata=json.dumps(ex["metadata"]))

  def __repr__(self) -> str:
    return (f"ShapesEditSource(split={self.split!r}, size={self.size}, "
            f"num_examples={self.num_examples}, seed={self.seed})")


def _check_index(index: int, n: int) -> int:
  index = int(index)
  if not 0 <= index < n:
    raise IndexError(f"shapes source index {index} out of range [0, {n})")
  return index


def t2i_eval_prompts(split: str = "train", per_category: int = 32,
                     size: int | Sequence[int] = 64, seed: int = EVAL_SEED) -> list[dict]:
  """Fixed evaluation prompts: per_category of each category of `split` ('train' means
  held-in combinations). Each item: {"caption", "category", "metadata" dict (with
  "spec", which the evaluator reads, and the reference "scene")}."""
  cats = _categories(split, None, T2I_CATEGORIES, HELDOUT_T2I_CATEGORIES, "T2I categories")
  items = []
  for i in range(per_category * len(cats)):
    ex = make_t2i_example(split, cats[i % len(cats)], seed, i, size)
    items.append({k: ex[k] for k in ("caption", "category", "metadata")})
  return items


def edit_eval_set(split: str = "train", per_type: int = 16,
                  size: int | Sequence[int] = 64, seed: int = EVAL_SEED) -> list[dict]:
  """Fixed evaluation edits: per_type of each edit type of `split`. Each item:
  {"source", "target" uint8 [H, W, 3], "instruction", "edit_type", "metadata" dict}."""
  types = _categories(split, None, EDIT_TYPES, HELDOUT_EDIT_TYPES, "edit types")
  return [make_edit_example(split, types[i % len(types)], seed, i, size)
          for i in range(per_type * len(types))]
