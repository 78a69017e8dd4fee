"""Words of the shapes world for the learned reward: a closed vocabulary, captions of
whole scenes, and caption perturbations that make hard negatives.

The learned shapes reward reads text as word ids from a fixed vocabulary (every
word the generator's captions and instructions can use), so it needs no
external tokenizer and its weights stay tiny. `perturb_caption` changes exactly
one fact of a caption (a colour, a shape, a count or a relation), which is the
mistake a text-to-image model makes and the reward has to catch.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from data_pipelines import shapes
from data_pipelines import shapes_captions

PAD, UNK = 0, 1
MAX_WORDS = 16
_WORDS = (["<pad>", "<unk>", "a", "photo", "of", "and", "on", "background", "nothing"]
          + list(shapes.COLORS) + list(shapes.BACKGROUNDS) + list(shapes.SHAPES)
          + [shapes_captions.plural(s) for s in shapes.SHAPES]
          + list(shapes_captions.NUMBER_WORDS) + ["left", "right", "above", "below"])
VOCAB: dict[str, int] = {w: i for i, w in enumerate(dict.fromkeys(_WORDS))}
VOCAB_SIZE = len(VOCAB)


def tokenize(texts: Sequence[str], max_words: int = MAX_WORDS) -> tuple[np.ndarray, np.ndarray]:
  """Word ids and mask of lower-cased, space-split texts.

  Returns:
    (ids int32 [B, max_words], mask float32 [B, max_words]); unknown words map
    to `<unk>`, longer texts are cut at `max_words`.
  """
  if isinstance(texts, str):
    raise TypeError("tokenize() takes a sequence of texts, got a single str")
  ids = np.full((len(texts), max_words), PAD, np.int32)
  mask = np.zeros((len(texts), max_words), np.float32)
  for i, text in enumerate(texts):
    words = text.lower().replace(",", " ").split()[:max_words]
    ids[i, :len(words)] = [VOCAB.get(w, UNK) for w in words]
    mask[i, :len(words)] = 1.0
  return ids, mask


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
