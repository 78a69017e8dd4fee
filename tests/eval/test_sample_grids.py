"""The report's sample grids show every prompt and instruction whole, next to its images."""
from __future__ import annotations

import numpy as np
from PIL import Image

from data_pipelines import shapes
from dreamlite_jax.eval import shapes_scoring


def test_wrapped_labels_keep_every_word_within_the_width():
  caption = "a photo of a magenta triangle left of a yellow diamond and more words"
  for width in (64, 96, 128):
    lines = shapes_scoring._wrap(caption, width).split("\n")
    assert " ".join(lines) == caption
    assert len(lines) > 1
    assert all(shapes_scoring._MEASURE.textlength(line) <= width - 4 for line in lines
               if " " in line)  # a single word longer than the width keeps its own line


def test_grids_are_sized_to_their_longest_text(tmp_path):
  items = shapes.t2i_eval_prompts("train", per_category=2, size=32)
  images = np.zeros((len(items), 32, 32, 3), np.uint8)
  long_caption = max((it["caption"] for it in items), key=len)
  scale = 3
  height = shapes_scoring._label_height([long_caption], 32 * scale)
  # The longest caption needs more than the two lines the old fixed labels held.
  assert height > 2 * 12 + 4
  shapes_scoring.t2i_grid(str(tmp_path / "t2i.png"), items, images, n=len(items), columns=6,
                        scale=scale)
  rows = -(-len(items) // 6)
  assert Image.open(tmp_path / "t2i.png").size[1] == rows * (height + 32 * scale + 2)

  edits = shapes.edit_eval_set("train", per_type=1, size=32)
  results = np.stack([e["target"] for e in edits])
  shapes_scoring.edit_grid(str(tmp_path / "edit.png"), edits, results, n=len(edits), scale=2)
  width, grid_height = Image.open(tmp_path / "edit.png").size
  assert grid_height == len(edits) * (64 + 2)
  label_width = width - 3 * (64 + 2) - 2
  assert shapes_scoring._label_height([e["instruction"] for e in edits], label_width) <= 64
