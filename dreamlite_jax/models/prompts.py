"""DreamLite's chat templates for the text encoder, and static-length token batches.

The release wraps the user text in a Qwen chat template with a task-specific
system prompt, runs the LLM on the whole thing, then drops the template prefix
(system prompt up to and including `<|im_start|>user\\n`: 34 tokens for
generation, 64 for editing) so the U-Net only attends to the rest. The
unconditional prompt is the template around an empty string (no `[Generate]:`
prefix). Edit templates carry an image slot that the processor expands to one
`<|image_pad|>` per merged vision token.

Batches are right-padded (or right-truncated) to a static `drop + length`, so the
encoder compiles once and the features `[B, length]` have a fixed shape.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from dreamlite_jax.models.tokenizer import Tokenizer

GENERATE_SYSTEM = ("Describe the image by detailing the color, shape, size, texture, quantity, text, "
                   "spatial relationships of the objects and background:")
EDIT_SYSTEM = ("Describe the key features of the input image (color, shape, size, texture, objects, "
               "background), then explain how the user's text instruction should alter or modify the "
               "image. Generate a new image that meets the user's requirements while maintaining "
               "consistency with the original input where appropriate.")
IMAGE_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"
GENERATE_TEMPLATE = f"<|im_start|>system\n{GENERATE_SYSTEM}<|im_end|>\n<|im_start|>user\n{{}}<|im_end|>\n<|im_start|>assistant\n"
EDIT_TEMPLATE = (f"<|im_start|>system\n{EDIT_SYSTEM}<|im_end|>\n<|im_start|>user\n{IMAGE_SLOT}{{}}"
                 "<|im_end|>\n<|im_start|>assistant\n")
GENERATE_DROP = 34
EDIT_DROP = 64


def generate_text(prompt: str) -> str:
  """User text of a text-to-image prompt."""
  return f"[Generate]: {prompt}"


def edit_text(instruction: str) -> str:
  """User text of an edit instruction (the diptych phrasing the release trains with)."""
  return ("[Edit]: A diptych with two side-by-side images of the same scene. "
          f"Compared to the right side, the left one has {instruction}")


@dataclasses.dataclass(frozen=True)
class PromptBatch:
  """Token ids `[B, drop + length]` int32, mask `[B, drop + length]` int32 (1 = real), and `drop`."""
  ids: np.ndarray
  mask: np.ndarray
  drop: int

  @property
  def feature_mask(self) -> np.ndarray:
    """`[B, length]` mask of the features left after dropping the template prefix."""
    return self.mask[:, self.drop:]


def template_prefix(template: str) -> str:
  """The part of a template that is dropped: everything up to and including `<|im_start|>user\\n`."""
  marker = "<|im_start|>user\n"
  return template[:template.index(marker) + len(marker)]


def pad_batch(sequences: Sequence[Sequence[int]], total: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-truncates / right-pads id lists to `[B, total]`; returns (ids, mask) int32."""
  ids = np.full((len(sequences), total), pad_id, np.int32)
  mask = np.zeros((len(sequences), total), np.int32)
  for row, seq in enumerate(sequences):
    seq = list(seq)[:total]
    ids[row, :len(seq)] = seq
    mask[row, :len(seq)] = 1
  return ids, mask


def _tokenize(tokenizer: Tokenizer, texts: Sequence[str], template: str, drop: int, length: int) -> PromptBatch:
  if length < 1:
    raise ValueError(f"prompt length must be >= 1, got {length}")
  prefix = tokenizer.encode(template_prefix(template))
  if len(prefix) != drop:
    raise ValueError(f"template prefix is {len(prefix)} tokens with this tokenizer, the release drops {drop}")
  sequences = []
  for text in texts:
    seq = tokenizer.encode(text)
    if seq[:drop] != prefix:
      raise ValueError(f"prompt {text[len(template_prefix(template)):][:60]!r} changes the tokenization "
                       f"of the {drop}-token template prefix")
    sequences.append(seq)
  ids, mask = pad_batch(sequences, drop + length, tokenizer.pad_id)
  return PromptBatch(ids, mask, drop)


def tokenize_generate(tokenizer: Tokenizer, prompts: Sequence[str], length: int = 128,
                      unconditional: bool = False) -> PromptBatch:
  """Text-to-image prompts -> `PromptBatch` of `[B, 34 + length]`.

  `unconditional=True` ignores the prompt texts and uses the empty prompt (one per entry).
  """
  texts = [GENERATE_TEMPLATE.format("" if unconditional else generate_text(p)) for p in prompts]
  return _tokenize(tokenizer, texts, GENERATE_TEMPLATE, GENERATE_DROP, length)


def tokenize_edit(tokenizer: Tokenizer, instructions: Sequence[str], length: int,
                  num_image_tokens: int | None, unconditional: bool = False) -> PromptBatch:
  """Edit instructions -> `PromptBatch` of `[B, 64 + length]`.

  `num_image_tokens` is the merged vision token count of the source image (the
  slot expands to that many `<|image_pad|>`); None drops the image slot for
  text-only conditioning. The whole image block must fit in `length`.
  """
  if num_image_tokens is None:
    template = EDIT_TEMPLATE.replace(IMAGE_SLOT, "")
  else:
    if num_image_tokens < 1:
      raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
    if num_image_tokens + 2 > length:
      raise ValueError(f"edit prompt length {length} cannot hold the image block "
                       f"({num_image_tokens} image tokens + 2 markers)")
    template = EDIT_TEMPLATE.replace("<|image_pad|>", "<|image_pad|>" * num_image_tokens)
  texts = [template.format("" if unconditional else edit_text(p)) for p in instructions]
  return _tokenize(tokenizer, texts, template, EDIT_DROP, length)
