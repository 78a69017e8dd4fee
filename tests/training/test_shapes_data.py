"""The job's data caches (`<workdir>/data/*.npz`) are reused only for the inputs they were built from."""
from __future__ import annotations

import numpy as np

from dreamlite_jax.training import shapes_data


def _builder(value: float, calls: list):
  def build():
    calls.append(value)
    return {"x": np.full((3,), value, np.float32)}
  return build


def test_cache_is_reused_for_the_same_inputs_and_rebuilt_for_others(tmp_path):
  path, calls, logs = str(tmp_path / "data" / "raw.npz"), [], []
  first = shapes_data.load_or_build(path, _builder(1.0, calls), {"num_t2i": 10}, logs.append)
  again = shapes_data.load_or_build(path, _builder(2.0, calls), {"num_t2i": 10}, logs.append)
  assert calls == [1.0] and logs == []
  np.testing.assert_array_equal(again["x"], first["x"])
  assert set(again) == {"x"}  # the inputs record is not handed out as data

  changed = shapes_data.load_or_build(path, _builder(2.0, calls), {"num_t2i": 20}, logs.append)
  assert calls == [1.0, 2.0] and changed["x"][0] == 2.0
  assert len(logs) == 1 and '"num_t2i": 10' in logs[0] and '"num_t2i": 20' in logs[0]
  # The rebuilt file now records the new inputs.
  assert shapes_data.load_or_build(path, _builder(3.0, calls), {"num_t2i": 20}, logs.append)["x"][0] == 2.0
  assert calls == [1.0, 2.0]


def test_unrecorded_or_corrupt_cache_is_rebuilt_with_a_reason(tmp_path):
  path, calls, logs = str(tmp_path / "encoded.npz"), [], []
  np.savez(path, x=np.zeros(3))  # written by a version that did not record its inputs
  assert shapes_data.load_or_build(path, _builder(1.0, calls), {"a": 1}, logs.append)["x"][0] == 1.0
  assert "does not record what it was built from" in logs[-1]

  with open(path, "wb") as f:
    f.write(b"PK\x03\x04 truncated")
  assert shapes_data.load_or_build(path, _builder(2.0, calls), {"a": 1}, logs.append)["x"][0] == 2.0
  assert "unreadable" in logs[-1]
  assert calls == [1.0, 2.0]
