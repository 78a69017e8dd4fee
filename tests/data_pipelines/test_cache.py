"""Embedding cache: write once to ArrayRecord, read back identical arrays through the loader."""
import json

import numpy as np
import pytest

from data_pipelines import cache
from data_pipelines import loader
from data_pipelines import shapes
from data_pipelines import training_example


def fake_encode(batch):
  """Deterministic stand-in for VAE + text encoder: 4x4 pooled 'latents', prompt-code 'text'."""
  b, h, w, _ = batch["target"].shape
  pool = lambda x: x.reshape(b, h // 4, 4, w // 4, 4, 3).mean(axis=(2, 4))
  latents = np.concatenate([pool(batch["target"]), pool(batch["target"])[..., :1]], -1)
  codes = np.zeros((b, 12), np.int32)
  mask = np.zeros((b, 12), bool)
  for i, p in enumerate(batch["prompt"]):
    enc = [ord(c) for c in p[:12]]
    codes[i, :len(enc)], mask[i, :len(enc)] = enc, True
  return {"latents": latents.astype(np.float16),
          "condition_latents": pool(batch["condition"]).astype(np.float32),
          "text": codes.astype(np.float32)[..., None] * np.linspace(0, 1, 5, dtype=np.float32),
          "text_mask": mask}


@pytest.fixture
def edit_source():
  return shapes.ShapesEditSource(size=20, num_examples=45, seed=7)


def test_round_trip_returns_identical_arrays(edit_source, tmp_path):
  info = cache.write_cache(edit_source, fake_encode, tmp_path / "c", size=(16, 16),
                           batch_size=8, examples_per_shard=20)
  assert info["num_examples"] == 45 and len(info["shards"]) == 3
  assert info["features"]["latents"] == {"dtype": "float16", "shape": [4, 4, 4]}
  source = cache.CachedSource(tmp_path / "c")
  assert len(source) == 45
  for i in (0, 19, 20, 44):   # shard boundaries included
    direct = fake_encode(training_example.collate(
        [training_example.to_training_example(edit_source[i], (16, 16))]))
    record = source[i]
    assert record["prompt"] == edit_source[i]["instruction"]
    assert record["is_edit"] == 1.0
    for key, want in direct.items():
      got = record[key]
      assert got.dtype == want.dtype and got.shape == want.shape[1:], key
      np.testing.assert_array_equal(got, want[0], err_msg=key)


def test_cache_reads_through_the_loader(edit_source, tmp_path):
  cache.write_cache(edit_source, fake_encode, tmp_path / "c", size=(16, 16), batch_size=16)
  source = cache.CachedSource(tmp_path / "c")
  it = loader.make_loader([source], global_batch_size=5, convert=loader.passthrough,
                          num_epochs=1, process_index=0, process_count=1, num_threads=1)
  batches = list(it)
  assert len(batches) == 9
  assert batches[0]["latents"].shape == (5, 4, 4, 4) and batches[0]["latents"].dtype == np.float16
  assert batches[0]["text_mask"].dtype == bool
  seen = np.concatenate([b["latents"] for b in batches])
  stored = np.stack([source[i]["latents"] for i in range(45)])
  key = lambda a: sorted(x.tobytes() for x in a)
  assert key(seen) == key(stored)   # each cached example exactly once, bit-identical


def test_incomplete_or_bad_caches_are_refused(edit_source, tmp_path):
  with pytest.raises(FileNotFoundError, match="cache_info.json"):
    cache.CachedSource(tmp_path)
  with pytest.raises(ValueError, match="'latents' has shape"):
    cache.write_cache(edit_source, lambda b: {"latents": np.zeros((3, 2))}, tmp_path / "bad",
                      size=(16, 16), batch_size=8)
  cache.write_cache(edit_source, fake_encode, tmp_path / "ok", size=(16, 16),
                    examples_per_shard=30)
  with pytest.raises(FileExistsError, match="already holds a cache"):
    cache.write_cache(edit_source, fake_encode, tmp_path / "ok", size=(16, 16))
  info = json.loads((tmp_path / "ok" / "cache_info.json").read_text())
  (tmp_path / "ok" / info["shards"][1]).unlink()
  with pytest.raises(FileNotFoundError, match="shard files missing"):
    cache.CachedSource(tmp_path / "ok")


def test_shard_writer_renames_only_a_complete_shard(tmp_path):
  record = {"latents": np.ones((2, 2, 4), np.float16), "is_edit": np.asarray(np.float32(1)),
            "prompt": "p"}
  assert cache.record_features(record) == {"latents": {"dtype": "float16", "shape": [2, 2, 4]},
                                           "is_edit": {"dtype": "float32", "shape": []},
                                           "prompt": {"dtype": "str"}}
  writer = cache.ShardWriter(tmp_path / "a.array_record")
  writer.write(record)
  assert [p.name for p in tmp_path.iterdir()] == [writer.tmp.name]   # not under the final name yet
  writer.commit()
  assert [p.name for p in tmp_path.iterdir()] == ["a.array_record"]
  aborted = cache.ShardWriter(tmp_path / "b.array_record")
  aborted.write(record)
  aborted.abort()
  assert [p.name for p in tmp_path.iterdir()] == ["a.array_record"]


def test_unfinished_build_is_refused_naming_the_missing_processes(tmp_path):
  (tmp_path / "64").mkdir()
  (tmp_path / cache.BUILD_DIR).mkdir()
  (tmp_path / cache.BUILD_DIR / "args.json").write_text(json.dumps({"process_count": 3}))
  cache.done_marker(tmp_path, 1, 3).write_text("{}")
  with pytest.raises(FileNotFoundError, match=r"incomplete: processes \[0, 2\] of 3 have not finished"):
    cache.CachedSource(tmp_path / "64")
  with pytest.raises(FileNotFoundError, match="no such directory"):
    cache.CachedSource(tmp_path / "128")
