"""Folder datasets: every bad item is skipped and counted; TFDS builders round-trip."""
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipelines import edit_triplets
from data_pipelines import images
from data_pipelines import loader
from data_pipelines import manifests
from data_pipelines import t2i_folder


def _save(path: Path, h: int, w: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  # Smooth content so JPEG round trips stay close to the original.
  base = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
  arr = np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR))
  Image.fromarray(arr).save(path, quality=95)
  return arr


def _write_jsonl(path: Path, lines):
  path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")


@pytest.fixture
def t2i_root(tmp_path):
  root = tmp_path / "t2i"
  (root / "img").mkdir(parents=True)
  _save(root / "img/square.jpg", 96, 96, 0)
  _save(root / "img/wide.jpg", 90, 160, 1)     # 16:9
  _save(root / "img/tall.jpg", 128, 96, 2)     # 3:4
  _save(root / "img/tiny.jpg", 16, 16, 3)
  (root / "img/corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
  _save(tmp_path / "outside.jpg", 96, 96, 4)   # exists, but outside the root
  os.symlink(tmp_path / "outside.jpg", root / "img/link.jpg")
  _write_jsonl(root / "captions.jsonl", [
      {"file": "img/square.jpg", "caption": "a square photo"},
      {"file": "img/wide.jpg", "caption": "a wide photo"},
      {"file": "img/tall.jpg", "caption": "  a tall photo  "},
      {"file": "img/square.jpg", "caption": "the square again, second caption"},
      {"file": "img/tiny.jpg", "caption": "a thumbnail"},                 # tiny_image
      {"file": "img/corrupt.jpg", "caption": "broken"},                   # undecodable_image
      {"file": "img/gone.jpg", "caption": "missing"},                     # missing_file
      {"file": "../outside.jpg", "caption": "escape with dots"},          # path_escapes_root
      {"file": str(tmp_path / "outside.jpg"), "caption": "absolute"},     # path_escapes_root
      {"file": "img/link.jpg", "caption": "escape by symlink"},           # path_escapes_root
      {"file": "img/wide.jpg", "caption": "   "},                         # empty_caption
      '{"file": "img/square.jpg", "caption": ',                           # bad_json_line
      '["not", "an", "object"]',                                          # bad_json_line
      {"file": "img/square.jpg"},                                         # bad_json_line
      "",
  ])
  return root


EXPECTED_T2I_SKIPS = {"tiny_image": 1, "undecodable_image": 1, "missing_file": 1,
                      "path_escapes_root": 3, "empty_caption": 1, "bad_json_line": 3}


def test_t2i_manifest_skips_and_counts_every_bad_item(t2i_root):
  report = manifests.SkipReport()
  items = list(manifests.iter_t2i_items(t2i_root, min_side=32, report=report))
  assert [it.caption for it in items] == ["a square photo", "a wide photo", "a tall photo",
                                          "the square again, second caption"]
  assert report.kept == 4
  assert dict(report.skipped) == EXPECTED_T2I_SKIPS
  assert report.total_skipped == 10
  assert any("gone.jpg" in e for e in report.examples["missing_file"])
  assert any("captions.jsonl:12" in e for e in report.examples["bad_json_line"])
  assert items[1].image.shape == (90, 160, 3)


def test_missing_manifest_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="captions.jsonl"):
    list(manifests.iter_t2i_items(tmp_path))


def test_resolve_inside_rejects_escapes(tmp_path):
  assert manifests.resolve_inside(tmp_path, "a/b.jpg") == (tmp_path / "a/b.jpg").resolve()
  assert manifests.resolve_inside(tmp_path, "a/../../b.jpg") is None
  assert manifests.resolve_inside(tmp_path, "/etc/passwd") is None
  assert manifests.resolve_inside(tmp_path, "") is None


def test_buckets_and_shared_crop():
  buckets = images.make_buckets(256)
  assert (256, 256) in buckets and all(h % 32 == 0 and w % 32 == 0 for h, w in buckets)
  assert buckets[images.nearest_bucket(90, 160, buckets)] == (192, 352)   # 16:9 -> widest
  assert buckets[images.nearest_bucket(128, 96, buckets)] == (288, 224)   # 3:4
  rng = np.random.default_rng(0)
  a = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
  b = 255 - a
  fa, fb = images.fit([a, b], (32, 32), "random", np.random.default_rng(1))
  assert fa.shape == fb.shape == (32, 32, 3)
  np.testing.assert_array_equal(fb, 255 - fa)   # same resize, same offsets
  with pytest.raises(ValueError, match="crop mode"):
    images.fit([a], (32, 32), "middle")


def test_t2i_tfds_builder_round_trip(t2i_root, tmp_path, caplog):
  builder, report = t2i_folder.build(t2i_root, tmp_path / "tfds", resolution=64, min_side=32)
  assert dict(report.skipped) == EXPECTED_T2I_SKIPS and report.kept == 4
  saved = json.loads((Path(builder.data_dir) / "skip_report.json").read_text())
  assert saved["skipped"]["path_escapes_root"] == 3
  source = t2i_folder.T2IFolderSource(builder)
  assert len(source) == 4
  records = [source[i] for i in range(len(source))]
  by_caption = {r["caption"]: r for r in records}
  assert set(by_caption) == {"a square photo", "a wide photo", "a tall photo",
                             "the square again, second caption"}
  wide = by_caption["a wide photo"]
  # At 64px with 32px multiples the buckets are (64, 64), (64, 96) and (96, 64).
  assert source.buckets == [(64, 64), (64, 96), (96, 64)]
  assert wide["bucket"] == (64, 96) and wide["file"] == "img/wide.jpg"
  assert wide["image"].shape == (64, 114, 3)   # 90x160 resized to cover 64x96
  assert by_caption["a tall photo"]["bucket"] == (96, 64)   # 3:4 is nearer 2:3 than 1:1
  buckets = source.buckets
  assert [buckets[b] for b in source.bucket_ids()] == [r["bucket"] for r in records]
  # Bucketed batches: only the square bucket (2 items) fills a global batch of 2.
  with caplog.at_level(logging.WARNING):
    batches = list(loader.make_loader([source], global_batch_size=2, bucketed=True,
                                      num_epochs=1, process_index=0, process_count=1))
  assert len(batches) == 1 and batches[0]["target"].shape == (2, 64, 64, 3)
  assert sorted(batches[0]["prompt"]) == ["a square photo", "the square again, second caption"]
  assert "bucket (64, 96) holds 1 examples" in caplog.text
  # A second build reuses the prepared data and the saved report.
  _, again = t2i_folder.build(t2i_root, tmp_path / "tfds", resolution=64, min_side=32)
  assert again.to_dict() == report.to_dict()


@pytest.fixture
def edit_root(tmp_path):
  root = tmp_path / "edits"
  root.mkdir()
  for i in range(6):
    _save(root / f"src{i}.jpg", 80, 80, 10 + i)
    # The "edit" keeps the target equal to the source: crops must then agree exactly.
    (root / f"tgt{i}.jpg").write_bytes((root / f"src{i}.jpg").read_bytes())
  _save(root / "wide.jpg", 80, 160, 30)
  _write_jsonl(root / "edits.jsonl", [
      *[{"source": f"src{i}.jpg", "target": f"tgt{i}.jpg", "instruction": f"edit {i}"}
        for i in range(6)],
      {"source": "wide.jpg", "target": "tgt0.jpg", "instruction": "mismatch"},  # mismatched_pair
      {"source": "src0.jpg", "target": "nope.jpg", "instruction": "gone"},      # missing_file
      {"source": "../src0.jpg", "target": "tgt0.jpg", "instruction": "escape"},  # path_escapes_root
      {"source": "src0.jpg", "target": "tgt0.jpg", "instruction": ""},          # empty_caption
      "{oops",                                                                  # bad_json_line
  ])
  return root


def test_edit_triplets_builder_skips_and_loads_aligned_bucketed_batches(edit_root, tmp_path):
  # Default resolution (256): the builder's predefined config.
  builder, report = edit_triplets.build(edit_root, tmp_path / "tfds", min_side=32)
  assert report.kept == 6
  assert dict(report.skipped) == {"mismatched_pair": 1, "missing_file": 1,
                                  "path_escapes_root": 1, "empty_caption": 1, "bad_json_line": 1}
  source = edit_triplets.EditTripletsSource(builder)
  assert sorted(source[i]["instruction"] for i in range(6)) == [f"edit {i}" for i in range(6)]
  it = loader.make_loader([source], global_batch_size=3, bucketed=True, crop="random",
                          num_epochs=1, process_index=0, process_count=1, num_threads=1)
  batches = list(it)
  assert len(batches) == 2
  prompts = sorted(p for b in batches for p in b["prompt"])
  assert prompts == [f"edit {i}" for i in range(6)]
  for b in batches:
    assert b["target"].shape == (3, 256, 256, 3) and b["target"].dtype == np.float32
    np.testing.assert_array_equal(b["is_edit"], 1.0)
    np.testing.assert_array_equal(b["condition"], b["target"])   # identical pair, shared crop
