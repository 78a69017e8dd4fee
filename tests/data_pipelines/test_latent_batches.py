"""Loss batches from embedding caches: mixing, host shards, progressive sides, exact resume."""
import numpy as np
import pytest

from data_pipelines import latent_batches

from cache_records import write_cache


@pytest.fixture
def caches(tmp_path):
  t2i, edit = str(tmp_path / "t2i"), str(tmp_path / "edit")
  for side in (64, 128):
    write_cache(t2i, "t2i", side, 40)
    write_cache(edit, "edit", side, 40)
  return t2i, edit


def _make(caches, side, **kw):
  args = dict(side=side, t2i_weight=0.5, edit_weight=0.5, global_batch_size=8, seed=3,
              num_threads=1, prefetch=1)
  args.update(kw)
  return latent_batches.make_batches(*caches, **args)


def _ids(batch):
  return batch["latents"][:, 0, 0, 0].astype(int).tolist()


def test_batches_hold_the_loss_fields_and_mix_both_tasks(caches):
  batch = next(_make(caches, 64, keep_prompts=True))
  assert batch["latents"].shape == (8, 8, 8, 4) and batch["latents"].dtype == np.float32
  assert batch["text"].shape == (8, 8, 16) and batch["text_mask"].dtype == np.int32
  assert batch["time_ids"].tolist() == [[64.0, 64.0]] * 8
  edit = batch["is_edit"] == 1
  ids = np.array(_ids(batch))
  # Edit rows are the edit cache's (ids >= 1000) with their own source; T2I rows a zero source.
  assert (ids[edit] >= 1000).all() and (ids[~edit] < 1000).all()
  np.testing.assert_array_equal(batch["source_latents"][edit][:, 0, 0, 0], -ids[edit])
  assert not batch["source_latents"][~edit].any()
  assert [p.split()[0] for p in batch["prompt"]] == ["edit" if e else "t2i" for e in edit]
  counts = [int(next(it)["is_edit"].sum()) for it in [_make(caches, 64)] for _ in range(20)]
  assert 0.35 < np.mean(counts) / 8 < 0.65
  assert "prompt" not in next(_make(caches, 64))


def test_a_task_with_weight_zero_is_not_read(caches):
  batch = next(_make(caches, 64, edit_weight=0.0))
  assert not batch["is_edit"].any()
  with pytest.raises(FileNotFoundError, match="build_cache"):
    _make(caches, 256)


def test_two_processes_split_each_global_batch(caches):
  """Host batches, concatenated in process order, are the one-process global batch."""
  hosts = [_make(caches, 64, process_index=i, process_count=2) for i in (0, 1)]
  single = _make(caches, 64)
  for _ in range(3):
    parts = [next(h) for h in hosts]
    assert all(p["latents"].shape[0] == 4 for p in parts)
    whole = next(single)
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key], key)


def test_progressive_sides_and_exact_resume(caches):
  schedule = ((64, 0), (128, 3))
  make = lambda side: _make(caches, side)
  it = latent_batches.ProgressiveBatches(make, schedule)
  sides = []
  for _ in range(5):
    sides.append(next(it)["time_ids"][0, 0])
  assert sides == [64, 64, 64, 128, 128]
  state = it.get_state()
  expected = [_ids(next(it)) for _ in range(3)]
  resumed = latent_batches.ProgressiveBatches(make, schedule)
  resumed.set_state(state)
  assert [_ids(next(resumed)) for _ in range(3)] == expected
  with pytest.raises(ValueError, match="start at step 0"):
    latent_batches.ProgressiveBatches(make, ((64, 5),))
