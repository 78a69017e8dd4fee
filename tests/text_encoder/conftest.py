"""Session fixtures for the text encoder tests (the helpers live in hf_reference.py)."""
import pytest
import torch
import transformers

from hf_reference import randomize_, tiny_hf_config


@pytest.fixture(scope="session")
def hf_vl(tmp_path_factory):
  """(torch Qwen3VLForConditionalGeneration in eval mode, directory it was saved to)."""
  torch.manual_seed(0)
  cfg = tiny_hf_config()
  cfg._attn_implementation = "eager"
  cfg.text_config._attn_implementation = "eager"
  cfg.vision_config._attn_implementation = "eager"
  model = transformers.Qwen3VLForConditionalGeneration(cfg).eval()
  randomize_(model, 1)
  directory = str(tmp_path_factory.mktemp("tiny_qwen3_vl"))
  model.save_pretrained(directory)
  return model, directory
