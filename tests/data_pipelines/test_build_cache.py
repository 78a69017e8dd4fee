"""`python -m data_pipelines.build_cache` on real-format folders with random-weight model folders.

The records must be what our encoders give for the centre crops and prompts
(within float16 rounding), bad items skipped and counted by reason, hosts' shards
must cover the whole set exactly once, and a build must resume and refuse
changed arguments.
"""
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import paper_fixtures
from data_pipelines import build_cache
from data_pipelines import cache
from data_pipelines import images
from data_pipelines import manifests
from data_pipelines import training_example
from dreamlite_jax.models import weights
from dreamlite_jax.models.text_conditioning import TextEncoder
from dreamlite_jax.models.vae import TinyAutoencoder

REPO = Path(__file__).resolve().parents[2]
SIDES = (64, 128)
TEXT_LENGTH = 128
KEYS = {"latents", "text", "text_mask", "null_text", "null_text_mask", "is_edit", "prompt"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  d = tmp_path_factory.mktemp("inputs")
  return {"vae": paper_fixtures.write_tiny_vae(d / "vae"),
          "text": paper_fixtures.write_tiny_text_encoder(d / "qwen"),
          "t2i": paper_fixtures.write_t2i_folder(d / "t2i"),
          "edit": paper_fixtures.write_edit_folder(d / "edit")}


def _argv(inputs, task, out, *extra):
  return ["--folder", inputs[task], "--out", str(out), "--resolutions", ",".join(map(str, SIDES)),
          "--vae", inputs["vae"], "--text-encoder", inputs["text"], "--text-length", str(TEXT_LENGTH),
          "--batch-size", "4", "--examples-per-shard", "5", "--workers", "2", *extra]


def _records(root, side):
  source = cache.CachedSource(Path(root) / str(side))
  return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def t2i_cache(inputs, tmp_path_factory):
  out = tmp_path_factory.mktemp("t2i_cache")
  assert build_cache.main(_argv(inputs, "t2i", out)) == 0
  return out


@pytest.fixture(scope="module")
def models(inputs):
  vae_config, vae_params = weights.load_vae_dir(inputs["vae"])
  vae = jax.jit(lambda x: TinyAutoencoder(vae_config).apply({"params": vae_params}, x, method="encode"))
  return vae, TextEncoder.from_pretrained(inputs["text"], text_length=TEXT_LENGTH)


def _crop(folder, file, side, source_file=None):
  """The [-1, 1] centre crop(s) the cache must encode: target (and source) of one item."""
  load = lambda f: images.decode_image((Path(folder) / f).read_bytes())
  raw = ({"image": load(file), "caption": "-"} if source_file is None else
         {"target": load(file), "source": load(source_file), "instruction": "-"})
  ex = training_example.to_training_example(raw, (side, side), "center")
  return ex["target"], ex["condition"]


def _close(got, want, what):
  """Equal up to float16 rounding of the stored value."""
  assert got.dtype == np.float16, what
  np.testing.assert_allclose(got.astype(np.float32), np.asarray(want, np.float32), rtol=2e-3,
                             atol=2e-3 * float(np.abs(want).max()), err_msg=what)


def test_t2i_records_are_the_encoders_outputs(t2i_cache, inputs, models):
  vae, text_encoder = models
  captions = paper_fixtures.t2i_captions(12)
  files = [f"images/{i:03d}.jpg" for i in range(12)]
  text, mask = map(np.asarray, text_encoder.encode_generate(captions))
  null, null_mask = map(np.asarray, text_encoder.encode_generate_unconditional(1))
  for side in SIDES:
    records = _records(t2i_cache, side)
    assert [r["prompt"] for r in records] == captions   # one process: manifest order
    crops = np.stack([_crop(inputs["t2i"], f, side)[0] for f in files])
    want_latents = np.asarray(vae(crops))
    assert want_latents.shape == (12, side // 8, side // 8, 4)
    for i, r in enumerate(records):
      assert set(r) == KEYS
      assert r["is_edit"].dtype == np.float32 and r["is_edit"].shape == () and r["is_edit"] == 0.0
      _close(r["latents"], want_latents[i], f"latents {side} {i}")
      _close(r["text"], text[i], f"text {i}")
      assert r["text_mask"].dtype == np.int32
      np.testing.assert_array_equal(r["text_mask"], mask[i])
      _close(r["null_text"], null[0], f"null_text {i}")
      np.testing.assert_array_equal(r["null_text_mask"], null_mask[0])
    info = json.loads((t2i_cache / str(side) / "cache_info.json").read_text())
    assert info["num_examples"] == info["kept"] == 12 and len(info["shards"]) == 3
    assert {k: v for k, v in info["skipped"].items() if v} == paper_fixtures.T2I_SKIPS
    assert info["size"] == [side, side] and info["task"] == "t2i"
    assert (info["latent_channels"], info["vae_scale"]) == (4, 8)
    assert (info["text_length"], info["text_dim"]) == (TEXT_LENGTH, paper_fixtures.TEXT_HIDDEN)
    assert info["encoders"] == {"vae": str(Path(inputs["vae"]).resolve()),
                                "text_encoder": str(Path(inputs["text"]).resolve())}
    assert info["features"]["latents"] == {"dtype": "float16", "shape": [side // 8, side // 8, 4]}
    assert any("captions.jsonl" in e for e in info["skip_examples"]["invalid_utf8"])
  with pytest.raises(FileNotFoundError, match="cache root; open one side"):
    cache.CachedSource(t2i_cache)


def test_edit_build_through_the_command_line(inputs, models, tmp_path):
  """`python -m data_pipelines.build_cache` in a fresh interpreter, edit folder detected by its manifest."""
  vae, text_encoder = models
  out = tmp_path / "edit"
  run = subprocess.run([sys.executable, "-m", "data_pipelines.build_cache", *_argv(inputs, "edit", out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  last = run.stdout.strip().splitlines()[-1]
  assert last.endswith("complete: kept 12, skipped 3 (bad_json_line=1, empty_caption=1, missing_file=1)")
  instructions = paper_fixtures.edit_instructions(12)
  pairs = [(f"images/{i:03d}_target.jpg", f"images/{i:03d}_source.jpg") for i in range(12)]
  for side in SIDES:
    records = _records(out, side)
    assert [r["prompt"] for r in records] == instructions
    assert all(set(r) == KEYS | {"source_latents"} and r["is_edit"] == 1.0 for r in records)
    targets, sources = map(np.stack, zip(*[_crop(inputs["edit"], t, side, s) for t, s in pairs]))
    want_t, want_s = np.asarray(vae(targets)), np.asarray(vae(sources))
    for i, r in enumerate(records):
      _close(r["latents"], want_t[i], f"latents {side} {i}")
      _close(r["source_latents"], want_s[i], f"source_latents {side} {i}")
    info = json.loads((out / str(side) / "cache_info.json").read_text())
    assert {k: v for k, v in info["skipped"].items() if v} == paper_fixtures.EDIT_SKIPS
    assert info["task"] == "edit" and info["text_vision"] is True
  # The vision tower reads the source crop at the cache side (as Pipeline.edit reads the source).
  records = _records(out, 64)
  sources = np.stack([_crop(inputs["edit"], t, 64, s)[1] for t, s in pairs[:4]])
  text, mask = map(np.asarray, text_encoder.encode_edit(instructions[:4], sources))
  null, null_mask = map(np.asarray, text_encoder.encode_edit_unconditional(4, sources))
  for i in range(4):
    _close(records[i]["text"], text[i], f"edit text {i}")
    np.testing.assert_array_equal(records[i]["text_mask"], mask[i])
    _close(records[i]["null_text"], null[i], f"edit null_text {i}")
    np.testing.assert_array_equal(records[i]["null_text_mask"], null_mask[i])
  assert not np.allclose(records[0]["null_text"], records[1]["null_text"])  # per-record source


def test_two_processes_cover_the_set_once(inputs, t2i_cache, tmp_path):
  out = tmp_path / "two"
  assert build_cache.main(_argv(inputs, "t2i", out, "--process-count", "2", "--process-index", "0")) == 0
  with pytest.raises(FileNotFoundError, match=r"processes \[1\] of 2 have not finished"):
    cache.CachedSource(out / "64")
  assert build_cache.main(_argv(inputs, "t2i", out, "--process-count", "2", "--process-index", "1")) == 0
  single = {r["prompt"]: r for r in _records(t2i_cache, 128)}
  for side in SIDES:
    records = _records(out, side)
    assert sorted(r["prompt"] for r in records) == sorted(paper_fixtures.t2i_captions(12))
    info = json.loads((out / str(side) / "cache_info.json").read_text())
    assert {k: v for k, v in info["skipped"].items() if v} == paper_fixtures.T2I_SKIPS
    assert {s.split("-of-")[0] for s in info["shards"]} == {"part-00000", "part-00001"}
  for r in _records(out, 128):
    _close(r["latents"], single[r["prompt"]]["latents"].astype(np.float32), r["prompt"])
  # Process 0 took non-blank manifest lines 0, 2, 4, ... (two of them bad); its shards come first.
  first = [r["prompt"] for r in _records(out, 64)][:6]
  assert first == [paper_fixtures.t2i_captions(12)[i] for i in (0, 3, 5, 6, 8, 11)]


def test_resume_keeps_finished_shards_and_writes_the_same_records(inputs, t2i_cache, tmp_path,
                                                                  monkeypatch):
  out = tmp_path / "resumed"
  real = build_cache._encode_chunk
  calls = []

  def interrupted(*a, **k):  # the build dies while encoding its second shard
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real(*a, **k)

  monkeypatch.setattr(build_cache, "_encode_chunk", interrupted)
  with pytest.raises(KeyboardInterrupt):
    build_cache.main(_argv(inputs, "t2i", out))
  with pytest.raises(FileNotFoundError, match=r"processes \[0\] of 1 have not finished"):
    cache.CachedSource(out / "64")
  monkeypatch.setattr(build_cache, "_encode_chunk", real)
  assert sorted(p.name for p in (out / "64").iterdir()) == ["part-00000-of-00001-00000.array_record"]
  first = (out / "64" / "part-00000-of-00001-00000.array_record").stat().st_mtime_ns

  assert build_cache.main(_argv(inputs, "t2i", out)) == 0
  assert (out / "64" / "part-00000-of-00001-00000.array_record").stat().st_mtime_ns == first
  # A finished cache losing its info and one shard is rebuilt from that shard on.
  for side in SIDES:
    (out / str(side) / "cache_info.json").unlink()
  (out / "128" / "part-00000-of-00001-00001.array_record").unlink()
  assert build_cache.main(_argv(inputs, "t2i", out)) == 0
  assert (out / "64" / "part-00000-of-00001-00000.array_record").stat().st_mtime_ns == first
  for side in SIDES:
    want, got = _records(t2i_cache, side), _records(out, side)
    assert len(got) == 12
    for a, b in zip(want, got):
      assert a.keys() == b.keys() and a["prompt"] == b["prompt"]
      for k in a:
        if k != "prompt":
          np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_changed_arguments_and_command_mistakes_are_one_line(inputs, t2i_cache, tmp_path, capsys):
  def error(argv):
    assert build_cache.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err
    return err

  err = error(_argv(inputs, "t2i", t2i_cache, "--text-length", "64", "--min-side", "32"))
  assert "text_length: recorded 128, now 64" in err and "min_side: recorded 64, now 32" in err
  missing = tmp_path / "no_such_folder"
  assert f"--folder {missing}: no such directory" in error(
      ["--folder", str(missing), *_argv(inputs, "t2i", tmp_path / "o")[2:]])
  assert "side(s) [100] are not multiples of the VAE's downsample factor 8" in error(
      _argv(inputs, "t2i", tmp_path / "o")[:5] + ["64,100"] + _argv(inputs, "t2i", tmp_path / "o")[6:])
  argv = _argv(inputs, "t2i", tmp_path / "o")
  argv[argv.index("--vae") + 1] = str(tmp_path / "no_vae")
  assert "--vae" in error(argv) and not (tmp_path / "o").exists()
  argv = _argv(inputs, "t2i", tmp_path / "o")
  argv[argv.index("--text-encoder") + 1] = inputs["vae"]      # a folder, but not a Qwen3-VL one
  assert "--text-encoder" in error(argv) and not (tmp_path / "o" / "build_state" / "args.json").exists()


def test_manifest_lines_that_are_not_utf8_are_skipped():
  report = manifests.SkipReport()
  fields = ("file", "caption")
  assert manifests.decode_line(b'{"file": "a.jpg", "caption": "caf\xe9"}', "m:1", fields, report) is None
  assert manifests.decode_line(b'{"file": "a.jpg", "caption": "\\ud800"}', "m:2", fields, report) is None
  ok = manifests.decode_line('{"file": "a.jpg", "caption": "café ☕"}'.encode(), "m:3", fields, report)
  assert ok == {"file": "a.jpg", "caption": "café ☕"}
  assert dict(report.skipped) == {"invalid_utf8": 2}
  assert report.examples["invalid_utf8"][0].startswith("m:1: byte 33")


def test_prepared_tfds_dataset_is_a_source(inputs, t2i_cache, tmp_path):
  from data_pipelines import t2i_folder   # TensorFlow: only this test

  builder, _ = t2i_folder.build(inputs["t2i"], tmp_path / "tfds", resolution=64)
  out = tmp_path / "from_tfds"
  argv = _argv(inputs, "t2i", out)
  argv[:2] = ["--tfds", f"{builder.name}/{builder.builder_config.name}",
              "--tfds-data-dir", str(tmp_path / "tfds")]
  assert build_cache.main(argv) == 0
  info = json.loads((out / "64" / "cache_info.json").read_text())
  assert info["kept"] == 12 and info["source"].startswith("tfds:t2i_folder/r64_")
  assert {k: v for k, v in info["tfds_prepare_skipped"].items() if v} == paper_fixtures.T2I_SKIPS
  # The builder stores images resized to cover their bucket; the cache crops those, so
  # latents differ from the folder build by resampling only.
  folder = {r["prompt"]: r for r in _records(t2i_cache, 64)}
  records = _records(out, 64)
  assert sorted(r["prompt"] for r in records) == sorted(folder)
  for r in records:
    _close(r["text"], folder[r["prompt"]]["text"].astype(np.float32), r["prompt"])
