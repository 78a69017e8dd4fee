"""A tiny random CLIP folder in transformers layout, with the files its tokenizer reads.

What `rl.reward = {name: "clip", path: DIR}` loads at paper scale, small enough for
CPU tests: `CLIPModel.save_pretrained` at a toy config plus a byte-level BPE
vocabulary (every byte, alone and word-final, no merges).
"""
from __future__ import annotations

import json
import os

import torch
from transformers import CLIPConfig, CLIPModel

CONTEXT = 16


def _byte_chars() -> list[str]:
  """GPT-2's printable stand-in of every byte (the byte-level BPE alphabet)."""
  keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
      list(range(ord("®"), ord("ÿ") + 1))
  chars, extra = [], 0
  for b in range(256):
    if b in keep:
      chars.append(chr(b))
    else:
      chars.append(chr(256 + extra))
      extra += 1
  return chars


def write_tiny_clip(directory: str, seed: int = 0) -> str:
  """Writes the model (safetensors), vocab.json and merges.txt; returns `directory`."""
  os.makedirs(directory, exist_ok=True)
  chars = _byte_chars()
  tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
  vocab = {t: i for i, t in enumerate(tokens)}
  with open(os.path.join(directory, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(directory, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n")
  torch.manual_seed(seed)
  config = CLIPConfig(
      text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=CONTEXT, eos_token_id=vocab["<|endoftext|>"],
                       bos_token_id=vocab["<|startoftext|>"], pad_token_id=vocab["<|endoftext|>"]),
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, image_size=32, patch_size=8),
      projection_dim=16)
  CLIPModel(config).eval().save_pretrained(directory, safe_serialization=True)
  return directory
