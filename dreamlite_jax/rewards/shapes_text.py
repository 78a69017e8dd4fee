"""Words of the shapes world for the learned reward: a closed-vocabulary caption parser,
captions of whole scenes, and caption perturbations that make hard negatives.

The learned shapes reward compares what an image encoder sees with what a caption
claims. `parse` reads a caption of the generator's grammar (GenEval-style T2I
prompts and `scene_caption`) into that claim structure (objects with optional
colour and a count, an optional relation between the first two, the background),
and `encode` packs claims into fixed-size integer arrays for jax. Unknown words
raise, so a caption outside the vocabulary is never silently misread.
`perturb_caption` changes exactly one fact of a caption (a colour, a shape, a
count or a relation), which is the mistake a text-to-image model makes and the
reward has to catch.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from data_pipelines import shapes
from data_pipelines import shapes_captions

ANY_COLOR = len(shapes.COLORS)  # colour index of a claim that names no colour
MAX_CLAIMS = 4
# claims (colour, shape, count) | total | background | relation | its two claim slots
CODE_LEN = 3 * MAX_CLAIMS + 5
_COLOR = {c: i for i, c in enumerate(shapes.COLORS)}
_SHAPE = {s: i for i, s in enumerate(shapes.SHAPES)}
_SHAPE.update({shapes_captions.plural(s): i for i, s in enumerate(shapes.SHAPES)})
_NUMBER = {w: i for i, w in enumerate(shapes_captions.NUMBER_WORDS)}
_NUMBER.update({"a": 1, "an": 1})
_BACKGROUND = {b: i for i, b in enumerate(shapes.BACKGROUNDS)}
_RELATIONS = {r: i + 1 for i, r in enumerate(shapes.RELATIONS)}  # 0 = no relation


def _phrase(words: list[str], caption: str) -> list[tuple[int, int, int]]:
  """'a red circle' / 'three squares' / 'nothing' -> [(colour, shape, count)]."""
  if words == ["nothing"]:
    return []
  if len(words) not in (2, 3) or words[0] not in _NUMBER or words[-1] not in _SHAPE:
    raise ValueError(f"caption {caption!r}: cannot read object phrase {' '.join(words)!r} "
                     f"(expected '[a|number] [colour] shape')")
  if len(words) == 3 and words[1] not in _COLOR:
    raise ValueError(f"caption {caption!r}: unknown colour {words[1]!r} "
                     f"(known: {list(shapes.COLORS)})")
  color = _COLOR[words[1]] if len(words) == 3 else ANY_COLOR
  return [(color, _SHAPE[words[-1]], _NUMBER[words[0]])]


def parse(caption: str) -> dict[str, Any]:
  """A caption's claims: {"objects": [(colour idx or ANY_COLOR, shape idx, count)],
  "total": number of objects, "background": idx, "relation": idx (0 = none; else
  objects[pair[0]] is RELATIONS[idx - 1] objects[pair[1]]), "pair"}. Claims naming the
  same identity are merged (counts add). Raises ValueError on unknown words."""
  words = caption.lower().replace(",", " ").split()
  if words[:3] == ["a", "photo", "of"]:
    words = words[3:]
  background = shapes.T2I_BACKGROUND
  if len(words) >= 3 and words[-3] == "on" and words[-1] == "background":
    if words[-2] not in _BACKGROUND:
      raise ValueError(f"caption {caption!r}: unknown background {words[-2]!r}")
    background, words = words[-2], words[:-3]
  text = " ".join(words)
  relation, parts = 0, None
  for name, idx in _RELATIONS.items():
    if f" {name} " in f" {text} ":
      relation, parts = idx, [p.split() for p in f" {text} ".split(f" {name} ")]
      break
  if parts is None:
    parts, current = [], []
    for w in words:
      if w == "and":
        parts.append(current)
        current = []
      else:
        current.append(w)
    parts.append(current)
  if not words or any(not p for p in parts) or (relation and len(parts) != 2):
    raise ValueError(f"caption {caption!r}: no object phrases to read")
  claims: dict[tuple[int, int], int] = {}
  ordered = []
  for p in parts:
    for color, shape, count in _phrase(p, caption):
      ordered.append((color, shape))
      claims[(color, shape)] = claims.get((color, shape), 0) + count
  keys = list(dict.fromkeys(ordered))
  if len(keys) > MAX_CLAIMS:
    raise ValueError(f"caption {caption!r}: {len(keys)} distinct objects, at most {MAX_CLAIMS}")
  objects = [(c, s, claims[(c, s)]) for c, s in keys]
  # The two related claims (the same slot twice when both phrases name one identity).
  pair = (keys.index(ordered[0]), keys.index(ordered[1])) if relation else (0, 0)
  return {"objects": objects, "total": sum(n for _, _, n in objects),
          "background": _BACKGROUND[background], "relation": relation, "pair": pair}


def encode(captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """Claims of each caption as fixed-size arrays for the jax reward.

  Returns:
    codes int32 [B, CODE_LEN]: per claim slot k (colour, shape, count) at 3k..3k+2,
      then the total object count, the background index, the relation index and
      the relation's two claim slots;
    mask float32 [B, MAX_CLAIMS]: 1 for the claim slots in use.
  """
  if isinstance(captions, str):
    raise TypeError("encode() takes a sequence of captions, got a single str")
  codes = np.zeros((len(captions), CODE_LEN), np.int32)
  mask = np.zeros((len(captions), MAX_CLAIMS), np.float32)
  for i, caption in enumerate(captions):
    claims = parse(caption)
    for k, obj in enumerate(claims["objects"]):
      codes[i, 3 * k:3 * k + 3] = obj
      mask[i, k] = 1.0
    codes[i, -5:] = (claims["total"], claims["background"], claims["relation"], *claims["pair"])
  return codes, mask


def scene_caption(scene: dict[str, Any]) -> str:
  """A caption listing every object of a scene, e.g. 'a photo of a red circle and a blue
  square on gray background' (used as the reward text of edit results)."""
  objs = [f"a {o['color']} {o['shape']}" for o in scene["objects"]]
  text = "a photo of " + (" and ".join(objs) if objs else "nothing")
  if scene["background"] != shapes.T2I_BACKGROUND:
    text += f" on {scene['background']} background"
  return text


def _swap(words: list[str], rng: np.random.Generator, pool: Sequence[str]) -> bool:
  """Replaces one word of `pool` in `words` by another word of `pool`; False if none."""
  where = [i for i, w in enumerate(words) if w in pool]
  if not where:
    return False
  i = where[int(rng.integers(len(where)))]
  words[i] = str(rng.choice([w for w in pool if w != words[i]]))
  return True


def perturb_caption(caption: str, rng: np.random.Generator) -> str:
  """The caption with one fact changed (colour, shape, count, relation or background,
  or the two colours of a two-colour caption swapped; an empty scene gets an object);
  always differs from `caption`."""
  words = caption.split()
  relations = {"left": "right", "right": "left", "above": "below", "below": "above"}
  colors = [i for i, w in enumerate(words) if w in shapes.COLORS]
  kinds = ["color", "shape", "count", "relation", "background"] + (["swap"] if len(colors) >= 2 and
                                                     words[colors[0]] != words[colors[1]] else [])
  for kind in rng.permutation(kinds):
    if kind == "color" and _swap(words, rng, list(shapes.COLORS)):
      break
    if kind == "shape":
      singular = _swap(words, rng, shapes.SHAPES)
      if singular or _swap(words, rng, [shapes_captions.plural(s) for s in shapes.SHAPES]):
        break
    if kind == "count" and _swap(words, rng, shapes_captions.NUMBER_WORDS[2:5]):
      break
    if kind == "relation":
      where = [i for i, w in enumerate(words) if w in relations]
      if where:
        words[where[0]] = relations[words[where[0]]]
        break
    if kind == "background" and _swap(words, rng, list(shapes.BACKGROUNDS)):
      break
    if kind == "swap":
      words[colors[0]], words[colors[1]] = words[colors[1]], words[colors[0]]
      break
  out = " ".join(words)
  if out == caption and "nothing" in words:  # an empty scene: claim an object instead
    color, shape = (str(rng.choice(list(shapes.COLORS))), str(rng.choice(shapes.SHAPES)))
    out = caption.replace("nothing", f"a {color} {shape}")
  if out == caption:
    raise ValueError(f"caption {caption!r} has no colour, shape, count or relation to change")
  return out
