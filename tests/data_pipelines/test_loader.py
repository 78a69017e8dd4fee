"""Grain loader: host sharding, seeded shuffling, joint mixing, exact resume."""
import collections
import json

import numpy as np
import pytest

from data_pipelines import loader
from data_pipelines import shapes
from data_pipelines import training_example


class NumberedT2I:
  """Stand-in source whose caption names its index, so tests can track every example."""

  def __init__(self, n: int, size: int = 8):
    self.n, self.size = n, size

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"image": np.full((self.size, self.size, 3), i % 256, np.uint8), "caption": f"t2i {i}"}


def _ids(batches):
  return [p for b in batches for p in b["prompt"]]


def _host_loader(process_index, process_count, **kw):
  kw = dict(dict(global_batch_size=8, size=(8, 8), num_threads=1), **kw)
  return loader.make_loader([NumberedT2I(64)], process_index=process_index,
                            process_count=process_count, **kw)


def test_two_hosts_see_disjoint_halves_of_each_global_batch():
  host0 = list(_host_loader(0, 2, num_epochs=1))
  host1 = list(_host_loader(1, 2, num_epochs=1))
  single = list(_host_loader(0, 1, num_epochs=1))
  assert len(host0) == len(host1) == len(single) == 8
  assert all(len(b["prompt"]) == 4 for b in host0 + host1)
  ids0, ids1 = set(_ids(host0)), set(_ids(host1))
  assert not ids0 & ids1
  assert ids0 | ids1 == {f"t2i {i}" for i in range(64)}
  # Global batch k is the union of every host's batch k.
  for b0, b1, g in zip(host0, host1, single):
    assert set(b0["prompt"]) | set(b1["prompt"]) == set(g["prompt"])


def test_every_epoch_is_complete_and_reshuffled():
  batches = list(_host_loader(0, 1, num_epochs=2))
  ids = _ids(batches)
  assert collections.Counter(ids) == {f"t2i {i}": 2 for i in range(64)}
  first, second = ids[:64], ids[64:]
  assert set(first) == set(second) and first != second
  assert first != [f"t2i {i}" for i in range(64)]   # shuffled at all


def test_seed_controls_the_order():
  a = _ids(list(_host_loader(0, 1, num_epochs=1, seed=1)))
  b = _ids(list(_host_loader(0, 1, num_epochs=1, seed=1)))
  c = _ids(list(_host_loader(0, 1, num_epochs=1, seed=2)))
  assert a == b and a != c


def _joint(seed=3, process_index=0):
  t2i = shapes.ShapesT2ISource(size=20, num_examples=500, seed=0)
  edit = shapes.ShapesEditSource(size=20, num_examples=300, seed=0)
  return loader.make_loader([t2i, edit], weights=[0.7, 0.3], global_batch_size=8, size=(16, 16),
                            crop="random", seed=seed, process_index=process_index,
                            process_count=2, num_threads=2)


def test_save_restore_continues_with_the_very_next_batches():
  it = _joint()
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))   # what a checkpoint stores
  expected = [next(it) for _ in range(3)]
  restored = _joint()
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_mapped_iterator_keeps_exact_resume():
  encode = lambda b: {"mean": b["target"].mean(axis=(1, 2, 3)), "is_edit": b["is_edit"]}
  it = loader.map_batches(_joint(), encode)
  next(it)
  state = it.get_state()
  want = next(it)
  assert set(want) == {"mean", "is_edit"}
  again = loader.map_batches(_joint(), encode)
  again.set_state(state)
  np.testing.assert_array_equal(next(again)["mean"], want["mean"])


def test_restore_into_different_settings_names_them():
  state = _joint(seed=3).get_state()
  other = _joint(seed=4)
  with pytest.raises(ValueError, match="seed: saved 3 != current 4"):
    other.set_state(state)


def test_joint_mix_ratio_and_batch_format():
  it = _joint()
  batches = [next(it) for _ in range(250)]   # 1,000 examples on this host
  is_edit = np.concatenate([b["is_edit"] for b in batches])
  assert is_edit.shape == (1000,)
  assert abs(is_edit.mean() - 0.3) < 0.02
  b = batches[0]
  assert b["target"].shape == b["condition"].shape == (4, 16, 16, 3)
  assert b["target"].dtype == b["condition"].dtype == np.float32
  assert b["prompt"].dtype == object and b["is_edit"].dtype == np.float32
  for batch in batches[:20]:
    assert batch["target"].min() >= -1.0 and batch["target"].max() <= 1.0
    edits = batch["is_edit"] == 1.0
    assert np.all(batch["condition"][~edits] == 0.0)
    assert np.all(np.abs(batch["condition"][edits]).max(axis=(1, 2, 3)) > 0)


def test_to_training_example_converts_both_kinds_and_names_bad_records():
  img = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
  t2i = training_example.to_training_example({"image": img, "caption": b"cap"}, (8, 8))
  assert t2i["prompt"] == "cap" and t2i["is_edit"] == 0.0
  assert t2i["target"].shape == (8, 8, 3) and not t2i["condition"].any()
  full = training_example.to_training_example({"image": img, "caption": "c"}, (10, 12))
  np.testing.assert_allclose(full["target"], img / 127.5 - 1.0, atol=1e-6)
  edit = training_example.to_training_example(
      {"source": img, "target": 255 - img, "instruction": "invert"}, (10, 12))
  np.testing.assert_allclose(edit["target"], -edit["condition"], atol=1e-6)
  with pytest.raises(KeyError, match="neither 'caption'"):
    training_example.to_training_example({"image": img}, (8, 8))
  with pytest.raises(ValueError, match="'image' must be uint8"):
    training_example.to_training_example({"image": img.astype(np.float32), "caption": "c"}, (8, 8))


def test_bad_loader_settings_are_named():
  with pytest.raises(ValueError, match="multiple of process_count=3"):
    _host_loader(0, 3)
  with pytest.raises(ValueError, match="process_index=2"):
    _host_loader(2, 2)
  with pytest.raises(ValueError, match="weights"):
    loader.make_loader([NumberedT2I(4)], weights=[0.0], global_batch_size=2)
