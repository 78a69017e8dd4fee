"""Shapes world: metadata matches pixels, held-out split disjoint, determinism, errors."""
import json

import numpy as np
import pytest
from scipy import ndimage

from data_pipelines import shapes


def _components(image, color):
  """Bounding boxes (x0, y0, x1, y1) of the connected regions of exactly `color`."""
  labels, n = ndimage.label(np.all(image == shapes.COLORS[color], axis=-1))
  return sorted((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
                for sl in ndimage.find_objects(labels))


def _expected_boxes(scene, color):
  """Pixel bbox of each object from its centre/size (pixel centres inside the shape)."""
  out = []
  for o in scene["objects"]:
    if o["color"] != color:
      continue
    mask = shapes.shape_mask(o, scene["height"], scene["width"])
    ys, xs = np.nonzero(mask)
    out.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
    cx, cy = o["center"]
    r = o["size"] / 2
    # The drawn pixels lie inside the declared bbox and nearly fill it.
    assert cx - r - 0.5 <= xs.min() and xs.max() + 0.5 <= cx + r + 0.5
    assert cy - r - 0.5 <= ys.min() and ys.max() + 0.5 <= cy + r + 0.5
    assert xs.max() + 1 - xs.min() >= o["size"] - 2
  return sorted(out)


def _check_scene_pixels(image, scene):
  h, w = scene["height"], scene["width"]
  assert image.shape == (h, w, 3) and image.dtype == np.uint8
  drawn = np.zeros((h, w), bool)
  for o in scene["objects"]:
    mask = shapes.shape_mask(o, h, w)
    assert not (drawn & mask).any(), "objects overlap"
    drawn |= mask
    assert np.all(image[mask] == shapes.COLORS[o["color"]])
  assert np.all(image[~drawn] == shapes.BACKGROUNDS[scene["background"]])
  # Independent of shape_mask: one connected component per object, with its bbox.
  for color in {o["color"] for o in scene["objects"]}:
    assert _components(image, color) == _expected_boxes(scene, color)


def test_t2i_metadata_agrees_with_pixels_and_caption():
  src = shapes.ShapesT2ISource("train", size=64, num_examples=60, seed=3)
  seen = set()
  for i in range(len(src)):
    ex = src[i]
    meta = json.loads(ex["metadata"])
    seen.add(ex["category"])
    assert meta["category"] == ex["category"] and meta["caption"] == ex["caption"]
    scene = meta["scene"]
    _check_scene_pixels(ex["image"], scene)
    objs, spec = scene["objects"], meta["spec"]
    for req in spec["include"]:
      matching = [o for o in objs if o["shape"] == req["shape"]
                  and req.get("color", o["color"]) == o["color"]]
      assert len(matching) >= req["count"]
      assert req["shape"] in ex["caption"]
      if "color" in req:
        assert f"{req['color']} {req['shape']}" in ex["caption"]
    if ex["category"] == "counting":
      n = len(objs)
      assert ["zero", "one", "two", "three", "four"][n] in ex["caption"]
      assert len({(o["shape"], o["color"]) for o in objs}) == 1
    if ex["category"] == "position":
      (ax, ay), (bx, by) = objs[0]["center"], objs[1]["center"]
      offset = {"left of": bx - ax, "right of": ax - bx, "above": by - ay,
                "below": ay - by}[meta["relation"]]
      assert offset >= 0.4 * 64 - 0.01
      assert meta["relation"] in ex["caption"]
  assert seen == set(shapes.T2I_CATEGORIES)


def test_edit_targets_differ_from_sources_only_as_declared():
  src = shapes.ShapesEditSource("train", size=64, num_examples=70, seed=5)
  for i in range(len(src)):
    ex = src[i]
    meta = json.loads(ex["metadata"])
    kind, params = ex["edit_type"], meta["params"]
    source, target = meta["source"], meta["target"]
    _check_scene_pixels(ex["source"], source)
    _check_scene_pixels(ex["target"], target)
    s_objs, t_objs = source["objects"], target["objects"]
    for scene in (source, target):  # identities unique, so instructions are unambiguous
      ids = [(o["color"], o["shape"]) for o in scene["objects"]]
      assert len(ids) == len(set(ids))
    if kind == "background":
      assert s_objs == t_objs and source["background"] != target["background"]
      assert target["background"] in ex["instruction"]
      continue
    assert source["background"] == target["background"]
    assert f"{params['color']} {params['shape']}" in ex["instruction"]
    if kind == "add":
      assert t_objs[:-1] == s_objs and len(t_objs) == len(s_objs) + 1
      continue
    k = params["object"]
    rest_s = s_objs[:k] + s_objs[k + 1:]
    if kind == "remove":
      assert t_objs == rest_s
      continue
    assert t_objs[:k] + t_objs[k + 1:] == rest_s
    before, after = s_objs[k], t_objs[k]
    changed = {key for key in before if before[key] != after[key]}
    assert changed == {"recolor": {"color"}, "replace": {"shape"}, "move": {"center"},
                       "resize": {"size"}}[kind], (kind, before, after)
    if kind == "move":
      dx = after["center"][0] - before["center"][0]
      dy = after["center"][1] - before["center"][1]
      want = {"left": (dx < -15, dy == 0), "right": (dx > 15, dy == 0),
              "up": (dy < -15, dx == 0), "down": (dy > 15, dx == 0)}[params["direction"]]
      assert all(want), (params, dx, dy)
    if kind == "resize":
      ratio = after["size"] / before["size"]
      assert ratio > 1.4 if params["direction"] == "bigger" else ratio < 0.7


def _pairs(scene):
  return {(o["color"], o["shape"]) for o in scene["objects"]}


def _named_pairs(meta):
  """(colour, shape) pairs an edit instruction names, including the one it creates."""
  p = meta["params"]
  if meta["edit_type"] == "background":
    return set()
  named = {(p["color"], p["shape"])}
  if meta["edit_type"] == "recolor":
    named.add((p["to_color"], p["shape"]))
  if meta["edit_type"] == "replace":
    named.add((p["color"], p["to_shape"]))
  return named


def test_heldout_split_is_disjoint_from_train():
  held = set(shapes.HELDOUT_PAIRS)
  held_phrases = [f"{c} {s}" for c, s in held]
  # Every colour and shape is still seen in training; only the combinations are not.
  train_pairs = set(shapes.pairs_for("train"))
  assert not train_pairs & held
  assert {c for c, _ in train_pairs} == set(shapes.COLORS)
  assert {s for _, s in train_pairs} == set(shapes.SHAPES)
  t2i = shapes.ShapesT2ISource("train", 64, 240, seed=0)
  edit = shapes.ShapesEditSource("train", 64, 140, seed=0)
  for i in range(len(t2i)):
    ex = t2i[i]
    assert not _pairs(json.loads(ex["metadata"])["scene"]) & held
    assert not any(p in ex["caption"] for p in held_phrases)
  for i in range(len(edit)):
    ex = edit[i]
    meta = json.loads(ex["metadata"])
    assert not (_pairs(meta["source"]) | _pairs(meta["target"]) | _named_pairs(meta)) & held
    assert not any(p in ex["instruction"] for p in held_phrases)
  h_t2i = shapes.ShapesT2ISource("heldout", 64, 40, seed=0)
  h_edit = shapes.ShapesEditSource("heldout", 64, 30, seed=0)
  for i in range(len(h_t2i)):
    ex = h_t2i[i]
    assert ex["category"] in shapes.HELDOUT_T2I_CATEGORIES
    assert _pairs(json.loads(ex["metadata"])["scene"]) & held
    assert any(p in ex["caption"] for p in held_phrases)
  for i in range(len(h_edit)):
    ex = h_edit[i]
    meta = json.loads(ex["metadata"])
    assert not _pairs(meta["source"]) & held  # the held-out pair arrives with the edit
    assert _pairs(meta["target"]) & held
    assert _named_pairs(meta) & held


def test_deterministic_per_seed_and_index():
  a = shapes.ShapesT2ISource("train", 64, 10, seed=7)
  b = shapes.ShapesT2ISource("train", 64, 10, seed=7)
  c = shapes.ShapesT2ISource("train", 64, 10, seed=8)
  for i in (0, 5, 9):
    assert np.array_equal(a[i]["image"], b[i]["image"])
    assert a[i]["metadata"] == b[i]["metadata"]
  assert any(a[i]["metadata"] != c[i]["metadata"] for i in range(10))
  # Random access: order of reads does not matter.
  e1 = shapes.ShapesEditSource("train", 64, 20, seed=1)
  late = e1[17]
  _ = [e1[i] for i in range(5)]
  assert np.array_equal(e1[17]["target"], late["target"])
  assert e1[17]["metadata"] == late["metadata"]


def test_any_size_and_eval_sets():
  ex = shapes.ShapesT2ISource("train", size=(48, 80), num_examples=6)[4]
  assert ex["image"].shape == (48, 80, 3)
  _check_scene_pixels(ex["image"], json.loads(ex["metadata"])["scene"])
  prompts = shapes.t2i_eval_prompts("train", per_category=2)
  assert [p["category"] for p in prompts] == list(shapes.T2I_CATEGORIES) * 2
  assert prompts == shapes.t2i_eval_prompts("train", per_category=2)
  held = shapes.t2i_eval_prompts("heldout", per_category=2)
  assert {p["category"] for p in held} == set(shapes.HELDOUT_T2I_CATEGORIES)
  edits = shapes.edit_eval_set("heldout", per_type=1)
  assert [e["edit_type"] for e in edits] == list(shapes.HELDOUT_EDIT_TYPES)


def test_bad_inputs_raise_named_errors():
  with pytest.raises(ValueError, match="split"):
    shapes.ShapesT2ISource("validation")
  with pytest.raises(ValueError, match="single_object"):
    shapes.ShapesT2ISource("heldout", categories=["single_object"])
  with pytest.raises(ValueError, match="move"):
    shapes.ShapesEditSource("heldout", edit_types=["move"])
  with pytest.raises(IndexError, match="out of range"):
    shapes.ShapesT2ISource("train", num_examples=3)[3]
  with pytest.raises(ValueError, match="20x20"):
    shapes.ShapesT2ISource("train", size=8)
