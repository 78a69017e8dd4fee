"""Words of the shapes world: captions (GenEval wording) and edit instructions (ImgEdit verbs).

Kept apart from the scene sampler so the wording can be read (and changed) in one
place; the evaluator never parses these strings, it reads the metadata instead.
"""
from __future__ import annotations

from typing import Any

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")


def plural(shape: str) -> str:
  """'circle' -> 'circles' (every shape noun here takes a plain 's')."""
  return shape + "s"


def _noun(obj: dict[str, Any], with_color: bool) -> str:
  return f"{obj['color']} {obj['shape']}" if with_color else obj["shape"]


def t2i_caption(category: str, objects: list[dict[str, Any]],
                relation: str | None = None) -> str:
  """The GenEval-style prompt for a scene of `objects` (dicts with 'shape', 'color').

  position: objects[0] is placed `relation` objects[1] ("a circle left of a square").
  """
  if category == "single_object":
    return f"a photo of a {_noun(objects[0], False)}"
  if category == "two_objects":
    return f"a photo of a {_noun(objects[0], False)} and a {_noun(objects[1], False)}"
  if category == "counting":
    n = len(objects)
    noun = objects[0]["shape"] if n == 1 else plural(objects[0]["shape"])
    return f"a photo of {NUMBER_WORDS[n]} {noun}"
  if category == "colors":
    return f"a photo of a {_noun(objects[0], True)}"
  if category == "position":
    if relation is None:
      raise ValueError("position caption needs a relation")
    return f"a photo of a {_noun(objects[0], False)} {relation} a {_noun(objects[1], False)}"
  if category == "color_attr":
    return f"a photo of a {_noun(objects[0], True)} and a {_noun(objects[1], True)}"
  raise ValueError(f"unknown T2I category {category!r}")


def edit_instruction(edit_type: str, params: dict[str, Any]) -> str:
  """The ImgEdit-style instruction for an edit of `edit_type` with `params`.

  params keys by type: recolor (color, shape, to_color); add (color, shape);
  remove (color, shape); replace (color, shape, to_shape); move (color, shape,
  direction); resize (color, shape, direction); background (to_background).
  """
  if edit_type == "background":
    return f"change the background to {params['to_background']}"
  target = f"the {params['color']} {params['shape']}"
  if edit_type == "recolor":
    return f"change the color of {target} to {params['to_color']}"
  if edit_type == "add":
    return f"add a {params['color']} {params['shape']}"
  if edit_type == "remove":
    return f"remove {target}"
  if edit_type == "replace":
    return f"replace {target} with a {params['color']} {params['to_shape']}"
  if edit_type == "move":
    return f"move {target} {params['direction']}"
  if edit_type == "resize":
    return f"make {target} {params['direction']}"
  raise ValueError(f"unknown edit type {edit_type!r}")
