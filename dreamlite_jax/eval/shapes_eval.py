"""Exact programmatic scorer for the synthetic shapes world (GenEval / ImgEdit style).

Generated shapes images are scored without any learned model: pixels are assigned to
the nearest palette colour (with a tolerance, since samples are noisy), each colour's
connected components above a minimum area are objects, and an object's shape is the
equal-area shape template, centred on the component's centroid, that overlaps it best. T2I samples are checked against the GenEval-style
`spec` in their metadata; edits against the source/target scenes. Every check is a
boolean, so scores are accuracies, and the fraction of passed checks is a partial-credit
reward for RL (`t2i_correct`, `edit_correct`).

    python -m dreamlite_jax.eval.shapes_eval --selftest
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from data_pipelines import shapes

_COLOR_NAMES = tuple(shapes.COLORS)
_BG_NAMES = tuple(shapes.BACKGROUNDS)
# Object colours first, then backgrounds: a pixel nearest to a background is not object.
_PALETTE = np.array([shapes.COLORS[c] for c in _COLOR_NAMES] +
                    [shapes.BACKGROUNDS[b] for b in _BG_NAMES], np.float32)
COLOR_TOLERANCE = 100.0  # RGB distance; colours are >= 140 apart and >= 145 from a background
MIN_AREA_FRACTION = 0.008  # of the image; smallest generated object is ~3.6%
POSITION_MARGIN = 0.1  # relation offsets must exceed this fraction of the short side
CENTER_TOLERANCE = 0.1  # "still in place", as a fraction of the short side
PSNR_THRESHOLD = 20.0  # dB, outside the edited region
RESIZE_AREA_RATIO = 1.5  # generated resizes scale the side by 1.5, the area by 2.25


@dataclasses.dataclass(frozen=True)
class Detection:
  """One detected object. center: bbox centre (x, y) in pixels; bbox: (x0, y0, x1, y1)."""
  shape: str
  color: str
  center: tuple[float, float]
  area: int
  bbox: tuple[int, int, int, int]


def to_uint8(image: Any, name: str = "image") -> np.ndarray:
  """uint8 [H, W, 3] from uint8, or from floats in [0, 1] (rejects [-1, 1] images)."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"{name} must be [H, W, 3], got shape {image.shape}")
  if image.dtype == np.uint8:
    return image
  if not np.issubdtype(image.dtype, np.floating):
    raise ValueError(f"{name} must be uint8 or float in [0, 1], got {image.dtype}")
  if image.min() < -0.05 or image.max() > 1.05:
    raise ValueError(f"{name} float values must lie in [0, 1] (got [{image.min():.2f}, "
                     f"{image.max():.2f}]); map [-1, 1] images with (x + 1) / 2 first")
  return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def _label_pixels(image: np.ndarray) -> np.ndarray:
  """[H, W] palette index per pixel, -1 where no palette colour is within tolerance."""
  px = image.reshape(-1, 3).astype(np.float32)
  d2 = (px * px).sum(1, keepdims=True) - 2 * px @ _PALETTE.T + (_PALETTE ** 2).sum(1)
  label = d2.argmin(1)
  label[d2[np.arange(len(px)), label] > COLOR_TOLERANCE ** 2] = -1
  return label.reshape(image.shape[:2])


def _template(shape: str, dx: np.ndarray, dy: np.ndarray, area: float) -> np.ndarray:
  """Mask of `shape` with the given area, its centroid at dx = dy = 0."""
  if shape == "circle":
    return dx * dx + dy * dy <= area / math.pi
  if shape == "square":
    r = math.sqrt(area) / 2
    return (np.abs(dx) <= r) & (np.abs(dy) <= r)
  if shape == "diamond":
    return np.abs(dx) + np.abs(dy) <= math.sqrt(area / 2)
  # Triangle with apex up, base = height = s: the centroid is s/6 below the bbox centre.
  r = math.sqrt(2 * area) / 2
  dy = dy + r / 3
  return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)


def classify_shape(component: np.ndarray) -> str:
  """Shape name of a boolean component [h, w]: the shape template of equal area placed
  at the component's centroid with the highest IoU. Unlike bbox extent this survives
  the rounded corners and soft edges of generated images."""
  pad = max(2, component.shape[0] // 2, component.shape[1] // 2)
  comp = np.pad(component, pad)
  ys, xs = np.nonzero(comp)
  area = float(len(ys))
  dy = np.arange(comp.shape[0])[:, None] + 0.5 - (ys.mean() + 0.5)
  dx = np.arange(comp.shape[1])[None, :] + 0.5 - (xs.mean() + 0.5)
  ious = []
  for shape in shapes.SHAPES:
    t = _template(shape, dx, dy, area)
    ious.append((comp & t).sum() / max(1, (comp | t).sum()))
  return shapes.SHAPES[int(np.argmax(ious))]


def detect(image: Any) -> tuple[str | None, list[Detection]]:
  """Background name (None if the border is no known background) and objects of an
  image [H, W, 3] (uint8 or float in [0, 1])."""
  image = to_uint8(image)
  h, w = image.shape[:2]
  labels = _label_pixels(image)
  border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
  border = border[border >= len(_COLOR_NAMES)]
  background = None
  if len(border) > h + w:  # most of the border (2h + 2w pixels) is a background colour
    background = _BG_NAMES[np.bincount(border - len(_COLOR_NAMES)).argmax()]
  min_area = max(4, MIN_AREA_FRACTION * h * w)
  found = []
  counts = np.bincount(labels.ravel() + 1, minlength=len(_PALETTE) + 1)[1:]
  for ci, color in enumerate(_COLOR_NAMES):
    if counts[ci] < min_area:
      continue
    mask = labels == ci
    comps, _ = ndimage.label(ndimage.binary_fill_holes(mask))
    areas = np.bincount(comps.ravel())
    for j, sl in enumerate(ndimage.find_objects(comps), start=1):
      if sl is None or areas[j] < min_area:
        continue
      (y0, y1), (x0, x1) = (sl[0].start, sl[0].stop), (sl[1].start, sl[1].stop)
      found.append(Detection(classify_shape(comps[sl] == j), color,
                             ((x0 + x1) / 2, (y0 + y1) / 2), int(areas[j]),
                             (x0, y0, x1, y1)))
  return background, found


def _metadata(metadata: dict | str) -> dict:
  return json.loads(metadata) if isinstance(metadata, str) else metadata


def _relation_holds(a: Detection, b: Detection, relation: str, margin: float) -> bool:
  """Whether a is `relation` b (GenEval: only the named axis is checked)."""
  dx, dy = a.center[0] - b.center[0], a.center[1] - b.center[1]
  offset = {"left of": -dx, "right of": dx, "above": -dy, "below": dy}.get(relation)
  if offset is None:
    raise ValueError(f"unknown relation {relation!r} (known: {shapes.RELATIONS})")
  return offset > margin


def t2i_checks(image: Any, metadata: dict | str) -> dict[str, bool]:
  """GenEval-style checks of one T2I sample [H, W, 3] against metadata["spec"]:
  include_i (enough objects of that shape/colour), position_i, exclude_i."""
  spec = _metadata(metadata)["spec"]
  image = to_uint8(image)
  _, dets = detect(image)
  margin = POSITION_MARGIN * min(image.shape[:2])
  matches = lambda d, req: d.shape == req["shape"] and req.get("color", d.color) == d.color
  found = [[d for d in dets if matches(d, req)] for req in spec["include"]]
  checks = {}
  for i, req in enumerate(spec["include"]):
    checks[f"include_{i}"] = len(found[i]) >= req["count"]
    if "position" in req:
      relation, ref = req["position"]
      checks[f"position_{i}"] = bool(found[i]) and bool(found[ref]) and all(
          _relation_holds(a, b, relation, margin) for a in found[i] for b in found[ref])
  for i, req in enumerate(spec["exclude"]):
    checks[f"exclude_{i}"] = sum(matches(d, req) for d in dets) < req["count"]
  return checks


def t2i_correct(image: Any, metadata: dict | str) -> float:
  """Partial-credit reward in [0, 1]: the fraction of passed checks (1.0 = correct)."""
  checks = t2i_checks(image, metadata)
  return sum(checks.values()) / len(checks)


def _summarise(groups: dict[str, list[bool]], categories: Sequence[str]) -> dict[str, float]:
  out = {}
  for split, prefix in (("train", ""), ("heldout", "heldout/")):
    accs = {c: float(np.mean(groups[(split, c)])) for c in categories if (split, c) in groups}
    if accs:
      out.update({prefix + c: a for c, a in accs.items()})
      out[prefix + "overall"] = float(np.mean(list(accs.values())))
  return out


def score_t2i(images: Sequence[Any], metadatas: Sequence[dict | str]) -> dict[str, float]:
  """GenEval-style accuracies: {category: acc, "overall": mean over categories} for
  held-in samples and the same keys prefixed "heldout/" for held-out ones.
  images: [B, H, W, 3] uint8 or float in [0, 1]."""
  if len(images) != len(metadatas):
    raise ValueError(f"{len(images)} images but {len(metadatas)} metadatas")
  groups: dict[tuple[str, str], list[bool]] = {}
  for image, meta in zip(images, metadatas):
    meta = _metadata(meta)
    groups.setdefault((meta["split"], meta["category"]), []).append(
        t2i_correct(image, meta) == 1.0)
  return _summarise(groups, shapes.T2I_CATEGORIES)


def _near(d: Detection, center: Sequence[float], tol: float) -> bool:
  return max(abs(d.center[0] - center[0]), abs(d.center[1] - center[1])) <= tol


def masked_psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
  """PSNR in dB of uint8 images [H, W, 3] over mask [H, W] (inf when equal or empty)."""
  if not mask.any():
    return math.inf
  mse = float(np.mean((a[mask].astype(np.float64) - b[mask].astype(np.float64)) ** 2))
  return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def _edited_ids(kind: str, p: dict) -> tuple[tuple | None, tuple | None]:
  """(identity the edit removes or changes, identity it creates), as (colour, shape)."""
  old = (p["color"], p["shape"]) if "shape" in p else None
  new = {"recolor": lambda: (p["to_color"], p["shape"]),
         "replace": lambda: (p["color"], p["to_shape"]),
         "add": lambda: old, "move": lambda: old, "resize": lambda: old}.get(kind)
  return (old if kind in ("recolor", "replace", "remove") else None), (new() if new else None)


def _change_done(kind: str, p: dict, src_objs: list, tgt_objs: list, background: str | None,
                 by_id: dict[tuple, list[Detection]], tol: float, h: int, w: int) -> bool:
  """Whether the result carries out the instruction (the edited object, not the rest)."""
  old_id, new_id = _edited_ids(kind, p)
  gone = old_id is None or not by_id.get(old_id)
  news = by_id.get(new_id, []) if new_id else []
  k = p.get("object")
  if kind == "background":
    return background == p["to_background"]
  if kind == "remove":
    return gone
  if kind == "add":
    return bool(news)
  if kind in ("recolor", "replace"):
    return gone and any(_near(d, tgt_objs[k]["center"], tol) for d in news)
  if kind == "move":
    (sx, sy), (ux, uy) = src_objs[k]["center"], {
        "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[p["direction"]]
    return any((d.center[0] - sx) * ux + (d.center[1] - sy) * uy >= tol and
               abs((d.center[0] - sx) * uy + (d.center[1] - sy) * ux) <= tol for d in news)
  if kind == "resize":
    src_area = shapes.shape_mask(src_objs[k], h, w).sum()
    ratio_ok = ((lambda r: r >= RESIZE_AREA_RATIO) if p["direction"] == "bigger"
                else (lambda r: r <= 1 / RESIZE_AREA_RATIO))
    return any(_near(d, src_objs[k]["center"], tol) and ratio_ok(d.area / src_area)
               for d in news)
  raise ValueError(f"unknown edit type {kind!r} in metadata")


def _keep_mask(kind: str, p: dict, src_objs: list, edited_objs: list,
               dets: list[Detection], h: int, w: int) -> np.ndarray:
  """[H, W] pixels the edit must leave as in the source: all but the (padded) boxes of
  the edited object before and after and of its detections (added / moved objects may
  land anywhere); for background edits, the interiors of the objects."""
  keep = np.zeros((h, w), bool)
  if kind == "background":
    for o in src_objs:
      keep |= ndimage.binary_erosion(shapes.shape_mask(o, h, w))
    return keep
  keep[:] = True
  ids = _edited_ids(kind, p)
  boxes = [d.bbox for d in dets if (d.color, d.shape) in ids]
  for o in edited_objs:
    r = o["size"] / 2
    boxes.append((o["center"][0] - r, o["center"][1] - r, o["center"][0] + r,
                  o["center"][1] + r))
  pad = 0.05 * min(h, w) + 1
  for x0, y0, x1, y1 in boxes:
    keep[max(0, int(y0 - pad)):max(0, math.ceil(y1 + pad)),
         max(0, int(x0 - pad)):max(0, math.ceil(x1 + pad))] = False
  return keep


def edit_checks(source: Any, result: Any, metadata: dict | str,
                psnr_threshold: float = PSNR_THRESHOLD) -> dict[str, bool]:
  """Checks of one edit result [H, W, 3] against its source [H, W, 3] and metadata:
  change (the instruction was carried out), objects (exactly the target's objects),
  layout (unedited objects in place), background, preserved (masked PSNR vs source
  outside the edited region >= psnr_threshold; for background edits, over the objects)."""
  meta = _metadata(metadata)
  kind, p = meta["edit_type"], meta["params"]
  src_objs, tgt_objs = meta["source"]["objects"], meta["target"]["objects"]
  h, w = meta["source"]["height"], meta["source"]["width"]
  source, result = to_uint8(source, "source"), to_uint8(result, "result")
  for name, im in (("source", source), ("result", result)):
    if im.shape[:2] != (h, w):
      raise ValueError(f"{name} is {im.shape[:2]} but the metadata scene is {(h, w)}")
  tol = CENTER_TOLERANCE * min(h, w)
  background, dets = detect(result)
  by_id: dict[tuple, list[Detection]] = {}
  for d in dets:
    by_id.setdefault((d.color, d.shape), []).append(d)
  ident = lambda o: (o["color"], o["shape"])
  k = p.get("object")
  # Index of the edited object in the target list (added objects are appended).
  edited = {"add": len(tgt_objs) - 1, "remove": None, "background": None}.get(kind, k)
  edited_objs = ([src_objs[k]] if k is not None else []) + (
      [tgt_objs[edited]] if edited is not None else [])
  keep = _keep_mask(kind, p, src_objs, edited_objs, dets, h, w)
  return {
      "change": bool(_change_done(kind, p, src_objs, tgt_objs, background, by_id, tol, h, w)),
      "objects": sorted(by_id) == sorted(ident(o) for o in tgt_objs) and all(
          len(v) == 1 for v in by_id.values()),
      "layout": all(any(_near(d, o["center"], tol) for d in by_id.get(ident(o), []))
                    for i, o in enumerate(tgt_objs) if i != edited),
      "background": background == meta["target"]["background"],
      "preserved": masked_psnr(result, source, keep) >= psnr_threshold,
  }


def edit_correct(source: Any, result: Any, metadata: dict | str) -> float:
  """Partial-credit edit reward in [0, 1]: the fraction of passed edit checks."""
  checks = edit_checks(source, result, metadata)
  return sum(checks.values()) / len(checks)


def score_edit(sources: Sequence[Any], results: Sequence[Any],
               metadatas: Sequence[dict | str]) -> dict[str, float]:
  """Edit accuracy per edit type and "overall" (mean over types), held-out types under
  "heldout/". sources, results: [B, H, W, 3] uint8 or float in [0, 1]."""
  if not len(sources) == len(results) == len(metadatas):
    raise ValueError(f"{len(sources)} sources, {len(results)} results, "
                     f"{len(metadatas)} metadatas")
  groups: dict[tuple[str, str], list[bool]] = {}
  for src, res, meta in zip(sources, results, metadatas):
    meta = _metadata(meta)
    groups.setdefault((meta["split"], meta["edit_type"]), []).append(
        edit_correct(src, res, meta) == 1.0)
  return _summarise(groups, shapes.EDIT_TYPES)


def corrupt_t2i(metadata: dict | str, rng: np.random.Generator) -> np.ndarray:
  """Renders a scene that contradicts its prompt: uint8 [H, W, 3]. Per category: another
  shape (single_object), a missing object (two_objects), a wrong count (counting),
  a wrong colour (colors), swapped positions (position), swapped colours (color_attr)."""
  meta = _metadata(metadata)
  scene = json.loads(json.dumps(meta["scene"]))
  objs, cat = scene["objects"], meta["category"]
  if cat == "single_object" or (cat == "counting" and len(objs) == 1):
    objs[0]["shape"] = str(rng.choice([s for s in shapes.SHAPES if s != objs[0]["shape"]]))
  elif cat in ("two_objects", "counting"):
    objs.pop()
  elif cat == "colors":
    objs[0]["color"] = str(rng.choice([c for c in shapes.COLORS if c != objs[0]["color"]]))
  elif cat == "position":
    objs[0]["center"], objs[1]["center"] = objs[1]["center"], objs[0]["center"]
  elif cat == "color_attr":
    objs[0]["color"], objs[1]["color"] = objs[1]["color"], objs[0]["color"]
  else:
    raise ValueError(f"unknown T2I category {cat!r} in metadata")
  return shapes.render(scene)


def _add_noise(image: np.ndarray, rng: np.random.Generator, sigma: float = 15.0):
  """Gaussian pixel noise, a stand-in for the grain of generated samples."""
  return np.clip(image + rng.normal(0, sigma, image.shape), 0, 255).astype(np.uint8)


def selftest(num: int = 1000, seed: int = shapes.EVAL_SEED) -> dict[str, float]:
  """Scores ground-truth renders (clean, and with noise sigma 15), corrupted T2I renders
  and no-op edits (result = source); prints and returns `name: accuracy`."""
  rng = np.random.default_rng(seed)
  out: dict[str, float] = {}
  for split, n in (("train", num), ("heldout", max(num // 5, 2))):
    t2i = shapes.ShapesT2ISource(split, 64, n, seed)
    exs = [t2i[i] for i in range(n)]
    metas = [json.loads(e["metadata"]) for e in exs]
    for tag, images in (("t2i_gt", [e["image"] for e in exs]),
                        ("t2i_corrupt", [corrupt_t2i(mt, rng) for mt in metas]),
                        ("t2i_noisy", [_add_noise(e["image"], rng) for e in exs])):
      scores = score_t2i(images, metas)
      out.update({f"{tag}/{k}": v for k, v in scores.items()
                  if tag != "t2i_noisy" or k.endswith("overall")})
    edit = shapes.ShapesEditSource(split, 64, n, seed)
    exs = [edit[i] for i in range(n)]
    srcs, metas = [e["source"] for e in exs], [json.loads(e["metadata"]) for e in exs]
    for tag, results in (("edit_gt", [e["target"] for e in exs]), ("edit_noop", srcs),
                         ("edit_noisy", [_add_noise(e["target"], rng) for e in exs])):
      scores = score_edit(srcs, results, metas)
      out.update({f"{tag}/{k}": v for k, v in scores.items()
                  if tag != "edit_noisy" or k.endswith("overall")})
  for name, value in out.items():
    print(f"{name}: {value:.4f}")
  gt = [v for k, v in out.items() if k.startswith(("t2i_gt", "edit_gt"))]
  bad = [v for k, v in out.items() if k.startswith(("t2i_corrupt", "edit_noop"))]
  print(f"max_corrupted_accuracy: {max(bad):.4f}")
  print(f"min_ground_truth_accuracy: {min(gt):.4f}")
  return out


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--selftest", action="store_true",
                      help="score ground-truth and corrupted renders")
  parser.add_argument("--num", type=int, default=1000, help="renders per split and kind")
  args = parser.parse_args(argv)
  if not args.selftest:
    parser.error("nothing to do: pass --selftest (scoring samples goes through "
                 "score_t2i / score_edit or `python -m dreamlite_jax.eval`)")
  stats = selftest(args.num)
  gt_ok = all(v >= 0.99 for k, v in stats.items() if k.startswith(("t2i_gt", "edit_gt")))
  if not gt_ok:
    raise SystemExit("selftest failed: a ground-truth accuracy is below 0.99")


if __name__ == "__main__":
  main()
