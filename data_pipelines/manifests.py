"""Reading and validating user manifests (jsonl) for folder datasets, without TFDS.

Real folders are messy: lines that are not JSON or not UTF-8, files that are gone
or truncated, paths like `../../etc/passwd`, blank captions, thumbnails. Every bad
item is skipped here, before any epoch starts, and counted by reason in a
`SkipReport` (with a few example locations per reason), so a training run never
crashes mid-epoch and never drops data silently.

Manifests are read as bytes, one line at a time (`iter_lines`, which also splits
the lines between hosts and skips to a resume position); `decode_line` checks one
line and `t2i_item` / `edit_item` one record, so the TFDS builders
(`iter_t2i_items` / `iter_edit_items`) and the cache build
(`python -m data_pipelines.build_cache`) apply the same rules.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines import images

SKIP_REASONS = (
    "bad_json_line",       # not a JSON object, or a required field missing / not a string
    "invalid_utf8",        # the line (or a text field) is not valid UTF-8
    "path_escapes_root",   # absolute path or `..` leading outside the dataset root
    "missing_file",        # the path does not exist (or is not a file)
    "undecodable_image",   # the file is not a readable image
    "empty_caption",       # caption / instruction is blank
    "tiny_image",          # shorter side below `min_side`
    "mismatched_pair",     # edit source and target aspect ratios differ too much
)
_MAX_EXAMPLES_PER_REASON = 5


@dataclasses.dataclass
class SkipReport:
  """Counts of kept and skipped items, by reason, with a few example locations."""
  kept: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)

  def skip(self, reason: str, where: str, detail: str = "") -> None:
    if reason not in SKIP_REASONS:
      raise ValueError(f"unknown skip reason {reason!r}; expected one of {SKIP_REASONS}")
    self.skipped[reason] += 1
    shown = self.examples.setdefault(reason, [])
    if len(shown) < _MAX_EXAMPLES_PER_REASON:
      shown.append(f"{where}: {detail}" if detail else where)

  def merge(self, other: "SkipReport") -> None:
    """Adds `other`'s counts and examples (up to the per-reason limit) to this report."""
    self.kept += other.kept
    for reason, n in other.skipped.items():
      self.skipped[reason] += n
      shown = self.examples.setdefault(reason, [])
      shown.extend(other.examples.get(reason, [])[:_MAX_EXAMPLES_PER_REASON - len(shown)])

  @property
  def total_skipped(self) -> int:
    return sum(self.skipped.values())

  def to_dict(self) -> dict[str, Any]:
    return {"kept": self.kept, "skipped": {r: self.skipped.get(r, 0) for r in SKIP_REASONS},
            "examples": self.examples}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "SkipReport":
    counts = collections.Counter({k: v for k, v in d["skipped"].items() if v})
    return cls(kept=d["kept"], skipped=counts, examples=dict(d.get("examples", {})))

  def save(self, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(self.to_dict(), indent=2))

  @classmethod
  def load(cls, path: str | os.PathLike) -> "SkipReport":
    return cls.from_dict(json.loads(Path(path).read_text()))

  def summary(self) -> str:
    parts = [f"{r}={n}" for r, n in sorted(self.skipped.items())]
    return f"kept {self.kept}, skipped {self.total_skipped}" + (f" ({', '.join(parts)})" if parts else "")


@dataclasses.dataclass(frozen=True)
class T2IItem:
  """A validated image/caption pair; `image` is uint8 `[H, W, 3]`."""
  file: str
  caption: str
  image: np.ndarray


@dataclasses.dataclass(frozen=True)
class EditItem:
  """A validated edit triplet; `source`/`target` are uint8 `[H, W, 3]`."""
  source_file: str
  target_file: str
  instruction: str
  source: np.ndarray
  target: np.ndarray


def decode_line(line: bytes, where: str, fields: Sequence[str],
                report: SkipReport) -> dict | None:
  """One manifest line (bytes) -> its JSON object with string `fields`, or None (counted).

  A line that is not valid UTF-8, or whose text fields hold lone surrogates (JSON
  `\\udXXX` escapes, which no tokenizer can encode), is `invalid_utf8`: keeping it
  with replacement characters would train on a caption nobody wrote.
  """
  try:
    text = line.decode("utf-8")
  except UnicodeDecodeError as e:
    report.skip("invalid_utf8", where, f"byte {e.start}: {e.reason}")
    return None
  try:
    record = json.loads(text.lstrip("\ufeff"))
  except json.JSONDecodeError as e:
    report.skip("bad_json_line", where, f"invalid JSON ({e.msg})")
    return None
  if not isinstance(record, dict):
    report.skip("bad_json_line", where, "not a JSON object")
    return None
  bad = [k for k in fields if not isinstance(record.get(k), str)]
  if bad:
    report.skip("bad_json_line", where, f"field(s) {bad} missing or not a string")
    return None
  for k in fields:
    try:
      record[k].encode("utf-8")
    except UnicodeEncodeError as e:
      report.skip("invalid_utf8", where, f"field {k!r}: {e.reason}")
      return None
  return record


def iter_lines(path: Path, index: int = 0, count: int = 1,
               start: int = 0) -> Iterator[tuple[int, str, bytes]]:
  """Yields `(position, location, line)` for this host's share of the non-blank lines.

  Non-blank line k of the file goes to host `k % count`; `position` numbers the lines
  of host `index` (0, 1, ...) and those before `start` are passed over unparsed (a
  resumed build continues where it stopped).
  """
  position = 0
  k = 0
  with open(path, "rb") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      mine = k % count == index
      k += 1
      if not mine:
        continue
      if position >= start:
        yield position, f"{path.name}:{line_no}", line
      position += 1


def count_lines(path: Path, index: int = 0, count: int = 1) -> int:
  """How many non-blank lines `iter_lines(path, index, count)` yields from position 0."""
  with open(path, "rb") as f:
    n = sum(1 for line in f if line.strip())
  return n // count + (1 if index < n % count else 0)


def read_jsonl(path: Path, fields: Sequence[str], report: SkipReport) -> Iterator[tuple[str, dict]]:
  """Yields `(location, record)` for lines that are JSON objects with string `fields`.

  Blank lines are ignored; anything else that fails is counted as `bad_json_line`
  (or `invalid_utf8`, see `decode_line`).
  """
  for _, where, line in iter_lines(path):
    record = decode_line(line, where, fields, report)
    if record is not None:
      yield where, record


def resolve_inside(root: Path, relative: str) -> Path | None:
  """`root / relative` resolved, or None when it points outside `root` (symlinks included)."""
  if not relative or os.path.isabs(relative):
    return None
  root = root.resolve()
  candidate = (root / relative).resolve()
  if candidate != root and root not in candidate.parents:
    return None
  return candidate


def load_image(root: Path, relative: str, where: str, min_side: int,
               report: SkipReport) -> np.ndarray | None:
  """Loads `root/relative` as uint8 `[H, W, 3]`, or counts why not and returns None."""
  path = resolve_inside(root, relative)
  if path is None:
    report.skip("path_escapes_root", where, repr(relative))
    return None
  if not path.is_file():
    report.skip("missing_file", where, repr(relative))
    return None
  try:
    image = images.decode_image(path.read_bytes(), name=relative)
  except images.ImageDecodeError as e:
    report.skip("undecodable_image", where, str(e))
    return None
  if min(image.shape[:2]) < min_side:
    report.skip("tiny_image", where, f"{relative} is {image.shape[1]}x{image.shape[0]}, "
                f"shorter side < {min_side}")
    return None
  return image


def t2i_item(root: Path, where: str, record: dict, min_side: int,
             report: SkipReport) -> T2IItem | None:
  """A validated item from one manifest record `{"file", "caption"}`, or None (counted)."""
  caption = record["caption"].strip()
  if not caption:
    report.skip("empty_caption", where, repr(record["file"]))
    return None
  image = load_image(root, record["file"], where, min_side, report)
  if image is None:
    return None
  return T2IItem(file=record["file"], caption=caption, image=image)


def edit_item(root: Path, where: str, record: dict, min_side: int, report: SkipReport,
              max_aspect_mismatch: float = 0.05) -> EditItem | None:
  """A validated triplet from one record `{"source", "target", "instruction"}`, or None (counted).

  A pair whose aspect ratios differ by more than `max_aspect_mismatch`
  (relative) is skipped as `mismatched_pair`: it could not be aligned.
  """
  instruction = record["instruction"].strip()
  if not instruction:
    report.skip("empty_caption", where, f"blank instruction for {record['target']!r}")
    return None
  source = load_image(root, record["source"], where, min_side, report)
  if source is None:
    return None
  target = load_image(root, record["target"], where, min_side, report)
  if target is None:
    return None
  ar_s = source.shape[1] / source.shape[0]
  ar_t = target.shape[1] / target.shape[0]
  if abs(ar_s / ar_t - 1.0) > max_aspect_mismatch:
    report.skip("mismatched_pair", where,
                f"source {source.shape[1]}x{source.shape[0]} vs target {target.shape[1]}x{target.shape[0]}")
    return None
  return EditItem(source_file=record["source"], target_file=record["target"],
                  instruction=instruction, source=source, target=target)


T2I_FIELDS = ("file", "caption")
EDIT_FIELDS = ("source", "target", "instruction")


def iter_t2i_items(root: str | os.PathLike, manifest: str = "captions.jsonl",
                   min_side: int = 64,
                   report: SkipReport | None = None) -> Iterator[T2IItem]:
  """Valid items of `root/manifest`, lines `{"file": ..., "caption": ...}`.

  Bad items are counted in `report` (create one to read the counts afterwards).
  """
  root = Path(root)
  report = SkipReport() if report is None else report
  manifest_path = root / manifest
  if not manifest_path.is_file():
    raise FileNotFoundError(f"t2i folder {root}: manifest {manifest!r} not found")
  for where, rec in read_jsonl(manifest_path, T2I_FIELDS, report):
    item = t2i_item(root, where, rec, min_side, report)
    if item is not None:
      report.kept += 1
      yield item


def iter_edit_items(root: str | os.PathLike, manifest: str = "edits.jsonl",
                    min_side: int = 64, max_aspect_mismatch: float = 0.05,
                    report: SkipReport | None = None) -> Iterator[EditItem]:
  """Valid items of `root/manifest`, lines `{"source": ..., "target": ..., "instruction": ...}`.

  Pairs are checked by `edit_item` (aspect ratios within `max_aspect_mismatch`).
  """
  root = Path(root)
  report = SkipReport() if report is None else report
  manifest_path = root / manifest
  if not manifest_path.is_file():
    raise FileNotFoundError(f"edit folder {root}: manifest {manifest!r} not found")
  for where, rec in read_jsonl(manifest_path, EDIT_FIELDS, report):
    item = edit_item(root, where, rec, min_side, report, max_aspect_mismatch)
    if item is not None:
      report.kept += 1
      yield item


def log_report(name: str, report: SkipReport) -> None:
  """Logs the report; a warning when anything was skipped."""
  level = logging.WARNING if report.total_skipped else logging.INFO
  logging.log(level, "%s: %s; examples: %s", name, report.summary(), report.examples)
