"""Shapes evaluator: exact on ground truth, robust to noise, fails what is wrong."""
import copy
import json

import numpy as np
import pytest

from data_pipelines import shapes
from dreamlite_jax.eval import shapes_eval
from experiments import shapes_tiny


def _t2i(split, n, seed=21):
  src = shapes.ShapesT2ISource(split, 64, n, seed)
  exs = [src[i] for i in range(n)]
  return [e["image"] for e in exs], [json.loads(e["metadata"]) for e in exs]


def _edits(split, n, seed=21, edit_types=None):
  src = shapes.ShapesEditSource(split, 64, n, seed, edit_types=edit_types)
  return [src[i] for i in range(n)]


def _noisy(image, rng, sigma=15.0):
  return np.clip(image + rng.normal(0, sigma, image.shape), 0, 255).astype(np.uint8)


def test_classifies_every_shape_at_every_size():
  for size in (12, 16, 24, 40):
    for shape in shapes.SHAPES:
      for color in shapes.COLORS:
        scene = {"height": 64, "width": 64, "background": "gray", "objects": [
            {"shape": shape, "color": color, "center": [30.3, 33.7], "size": size}]}
        background, dets = shapes_eval.detect(shapes.render(scene))
        assert background == "gray"
        assert [(d.shape, d.color) for d in dets] == [(shape, color)], (size, shape, color)
        assert abs(dets[0].center[0] - 30.3) <= 1 and abs(dets[0].center[1] - 33.7) <= 1


def test_ground_truth_t2i_scores_at_least_099_per_category():
  rng = np.random.default_rng(0)
  for split, n in (("train", 120), ("heldout", 24)):
    images, metas = _t2i(split, n)
    scores = shapes_eval.score_t2i(images, metas)
    prefix = "" if split == "train" else "heldout/"
    cats = shapes.T2I_CATEGORIES if split == "train" else shapes.HELDOUT_T2I_CATEGORIES
    assert set(scores) == {prefix + c for c in cats} | {prefix + "overall"}
    assert all(v >= 0.99 for v in scores.values()), scores
    # Generated samples are noisy; the palette tolerance absorbs that.
    noisy = shapes_eval.score_t2i([_noisy(x, rng) for x in images], metas)
    assert all(v >= 0.99 for v in noisy.values()), noisy
    # Float images in [0, 1] score like uint8.
    assert shapes_eval.score_t2i([x / 255.0 for x in images[:12]], metas[:12])[
        prefix + "overall"] == 1.0


def test_corrupted_t2i_renders_score_as_failures():
  images, metas = _t2i("train", 60)
  rng = np.random.default_rng(1)
  bad = [shapes_eval.corrupt_t2i(m, rng) for m in metas]
  scores = shapes_eval.score_t2i(bad, metas)
  assert all(v == 0.0 for v in scores.values()), scores
  held_images, held_metas = _t2i("heldout", 12)
  held_bad = [shapes_eval.corrupt_t2i(m, rng) for m in held_metas]
  assert shapes_eval.score_t2i(held_bad, held_metas)["heldout/overall"] == 0.0
  # Mixed input: held-in and held-out are reported apart.
  mixed = shapes_eval.score_t2i(images[:12] + held_bad, metas[:12] + held_metas)
  assert mixed["overall"] == 1.0 and mixed["heldout/overall"] == 0.0


def test_partial_credit_names_the_failed_requirement():
  images, metas = _t2i("train", 60)
  rng = np.random.default_rng(2)
  by_cat = {}
  for image, meta in zip(images, metas):
    by_cat.setdefault(meta["category"], (image, meta))
  image, meta = by_cat["position"]
  swapped = shapes_eval.corrupt_t2i(meta, rng)
  checks = shapes_eval.t2i_checks(swapped, meta)
  assert checks == {"include_0": True, "include_1": True, "position_1": False}
  assert shapes_eval.t2i_correct(swapped, meta) == pytest.approx(2 / 3)
  assert shapes_eval.t2i_correct(image, meta) == 1.0
  image, meta = by_cat["counting"]
  scene = copy.deepcopy(meta["scene"])
  n = len(scene["objects"])
  if n > 1:  # one too few: the include fails, the exclude (no more than n) holds
    scene["objects"].pop()
    assert shapes_eval.t2i_checks(shapes.render(scene), meta) == {
        "include_0": False, "exclude_0": True}
  image, meta = by_cat["colors"]
  wrong = copy.deepcopy(meta["scene"])
  wrong["objects"][0]["color"] = next(c for c in shapes.COLORS
                                      if c != wrong["objects"][0]["color"])
  assert shapes_eval.t2i_correct(shapes.render(wrong), meta) == 0.0


def test_ground_truth_edits_score_at_least_099_per_type_and_noop_fails():
  rng = np.random.default_rng(3)
  for split, n in (("train", 84), ("heldout", 18)):
    exs = _edits(split, n)
    srcs, tgts = [e["source"] for e in exs], [e["target"] for e in exs]
    metas = [e["metadata"] for e in exs]  # JSON strings are accepted too
    scores = shapes_eval.score_edit(srcs, tgts, metas)
    types = shapes.EDIT_TYPES if split == "train" else shapes.HELDOUT_EDIT_TYPES
    prefix = "" if split == "train" else "heldout/"
    assert set(scores) == {prefix + t for t in types} | {prefix + "overall"}
    assert all(v >= 0.99 for v in scores.values()), scores
    noisy = shapes_eval.score_edit(srcs, [_noisy(t, rng) for t in tgts], metas)
    assert all(v >= 0.99 for v in noisy.values()), noisy
    noop = shapes_eval.score_edit(srcs, srcs, metas)
    assert all(v == 0.0 for v in noop.values()), noop


def test_perfect_editor_scores_one_and_source_copier_zero_on_every_edit_type():
  """On the job's evaluation sets at the job's image size: the exact targets score 1.0 in
  every edit type, returning the source unchanged 0.0 (held-in and held-out)."""
  size = int(shapes_tiny.get_config().data.image_size)
  for split in shapes.SPLITS:
    exs = shapes.edit_eval_set(split, per_type=8, size=size)
    srcs, metas = [e["source"] for e in exs], [e["metadata"] for e in exs]
    types = shapes.EDIT_TYPES if split == "train" else shapes.HELDOUT_EDIT_TYPES
    prefix = "" if split == "train" else "heldout/"
    perfect = shapes_eval.score_edit(srcs, [e["target"] for e in exs], metas)
    assert perfect == {**{prefix + t: 1.0 for t in types}, prefix + "overall": 1.0}
    copier = shapes_eval.score_edit(srcs, srcs, metas)
    assert copier == {**{prefix + t: 0.0 for t in types}, prefix + "overall": 0.0}


def _wrong_target(meta, edit_type):
  """A target scene that carries out the edit wrongly, or None if not constructible."""
  tgt = copy.deepcopy(meta["target"])
  p, objs = meta["params"], tgt["objects"]
  if edit_type == "recolor":  # a colour other than the one asked for
    objs[p["object"]]["color"] = next(c for c in shapes.COLORS if c not in (
        p["to_color"], p["color"]))
  elif edit_type == "move":  # the opposite way
    before, after = meta["source"]["objects"][p["object"]]["center"], objs[p["object"]]["center"]
    objs[p["object"]]["center"] = [2 * before[0] - after[0], 2 * before[1] - after[1]]
  elif edit_type == "resize":  # resized the other way
    before = meta["source"]["objects"][p["object"]]["size"]
    objs[p["object"]]["size"] = before * (1.5 if p["direction"] == "smaller" else 1 / 1.5)
  elif edit_type == "background":
    tgt["background"] = meta["source"]["background"]
  elif edit_type == "add":  # added the right object but lost the background
    tgt["background"] = next(b for b in shapes.BACKGROUNDS if b != tgt["background"])
  elif edit_type == "remove" and len(meta["source"]["objects"]) > 1:  # removed another one
    tgt = copy.deepcopy(meta["source"])
    del tgt["objects"][(p["object"] + 1) % len(tgt["objects"])]
  elif edit_type == "replace":  # swapped to a different shape than asked
    objs[p["object"]]["shape"] = next(s for s in shapes.SHAPES if s not in (
        p["to_shape"], p["shape"]))
  else:
    return None
  return shapes.render(tgt)


def test_wrong_edits_fail_and_preservation_is_measured():
  rng = np.random.default_rng(4)
  exs = _edits("train", 70)
  failed = {}
  for e in exs:
    meta = json.loads(e["metadata"])
    wrong = _wrong_target(meta, e["edit_type"])
    if wrong is not None:
      failed.setdefault(e["edit_type"], []).append(
          shapes_eval.edit_correct(e["source"], wrong, meta) < 1.0)
  assert set(failed) == set(shapes.EDIT_TYPES) and all(all(v) for v in failed.values())
  # Damage outside the edited region: the change is right, preservation is not.
  e = next(x for x in exs if x["edit_type"] == "recolor")
  meta = json.loads(e["metadata"])
  damaged = _noisy(e["target"], rng, sigma=60)
  checks = shapes_eval.edit_checks(e["source"], damaged, meta)
  assert checks["change"] and not checks["preserved"]
  # An untouched object that wandered off (13 px, not onto anything): layout fails.
  tried = 0
  for x in exs:
    meta = json.loads(x["metadata"])
    if x["edit_type"] != "recolor" or len(meta["target"]["objects"]) < 2:
      continue
    moved = copy.deepcopy(meta["target"])
    other = moved["objects"][(meta["params"]["object"] + 1) % len(moved["objects"])]
    other["center"][0] += 13 if other["center"][0] < 32 else -13
    masks = [shapes.shape_mask(o, 64, 64) for o in moved["objects"]]
    if np.sum(masks, axis=0).max() > 1:
      continue
    checks = shapes_eval.edit_checks(x["source"], shapes.render(moved), meta)
    assert checks["change"] and checks["objects"] and not checks["layout"], checks
    tried += 1
  assert tried >= 2


def test_bad_inputs_raise_named_errors():
  images, metas = _t2i("train", 2)
  with pytest.raises(ValueError, match=r"\[-1, 1\]"):
    shapes_eval.t2i_correct(images[0] / 127.5 - 1.0, metas[0])
  with pytest.raises(ValueError, match="2 images but 1"):
    shapes_eval.score_t2i(images, metas[:1])
  with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
    shapes_eval.detect(images[0][..., 0])
  e = _edits("train", 1)[0]
  with pytest.raises(ValueError, match="result"):
    shapes_eval.edit_checks(e["source"], e["target"][:32], e["metadata"])


def test_selftest_cli_reports_exact_ground_truth(capsys):
  shapes_eval.main(["--selftest", "--num", "24"])
  lines = dict(line.split(": ") for line in capsys.readouterr().out.strip().splitlines())
  assert float(lines["min_ground_truth_accuracy"]) == 1.0
  assert float(lines["max_corrupted_accuracy"]) == 0.0
  assert list(lines)[-1] == "min_ground_truth_accuracy"
