"""GenEval / ImgEdit exports and the report writer, with fake generate/edit callables (no U-Net)."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from dreamlite_jax.eval import geneval_export, imgedit_export, report


class FakeGenerate:
  """Deterministic uint8 [B, 8, 8, 3] images; counts calls and prompts seen."""

  def __init__(self, fail_on: str | None = None):
    self.calls, self.prompts, self.fail_on = 0, [], fail_on

  def __call__(self, prompts, seed):
    if self.fail_on is not None and self.fail_on in prompts:
      raise KeyboardInterrupt("simulated interruption")
    self.calls += 1
    self.prompts += list(prompts)
    return np.stack([np.full((8, 8, 3), (seed + j) % 256, np.uint8) for j in range(len(prompts))])


def _write_metadata(path, prompts):
  with open(path, "w") as f:
    for i, p in enumerate(prompts):
      f.write(json.dumps({"tag": "single_object", "include": [{"class": "cat", "count": 1}],
                          "prompt": p, "i": i}) + "\n")
  return path


def test_geneval_layout(tmp_path):
  meta = _write_metadata(tmp_path / "evaluation_metadata.jsonl", ["a photo of a cat", "two dogs"])
  out = tmp_path / "out"
  gen = FakeGenerate()
  result = geneval_export.export(str(meta), str(out), gen, n=3, seed=5, batch_size=2)
  assert result == {"prompts": 2, "generated": 2, "skipped": 0}
  files = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
  assert files == ["00000/metadata.jsonl", "00000/samples/00000.png", "00000/samples/00001.png",
                   "00000/samples/00002.png", "00001/metadata.jsonl", "00001/samples/00000.png",
                   "00001/samples/00001.png", "00001/samples/00002.png"]
  lines = open(out / "00001" / "metadata.jsonl").read().splitlines()
  assert [json.loads(l) for l in lines] == [json.loads(open(meta).read().splitlines()[1])]
  # Sample k of prompt i is seeded seed + i * n + k (fake: constant pixel value).
  png = np.asarray(Image.open(out / "00001" / "samples" / "00002.png"))
  assert png.shape == (8, 8, 3) and png.dtype == np.uint8 and png[0, 0, 0] == 5 + 1 * 3 + 2
  assert gen.calls == 4  # 2 batches per prompt (2 + 1)


def test_geneval_resumes_without_redoing(tmp_path):
  meta = _write_metadata(tmp_path / "m.jsonl", ["p0", "p1", "p2", "p3"])
  out = tmp_path / "out"
  with pytest.raises(KeyboardInterrupt):
    geneval_export.export(str(meta), str(out), FakeGenerate(fail_on="p2"), n=2)
  assert geneval_export.prompt_done(str(out / "00001"), 2)
  assert not geneval_export.prompt_done(str(out / "00002"), 2)
  # A half-finished prompt (samples but no metadata) must be redone.
  os.makedirs(out / "00002" / "samples", exist_ok=True)
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(out / "00002" / "samples" / "00000.png")
  gen = FakeGenerate()
  result = geneval_export.export(str(meta), str(out), gen, n=2)
  assert result == {"prompts": 4, "generated": 2, "skipped": 2}
  assert gen.prompts == ["p2", "p2", "p3", "p3"]
  assert all(geneval_export.prompt_done(str(out / f"{i:05d}"), 2) for i in range(4))
  assert not [f for d, _, fs in os.walk(out) for f in fs if ".tmp" in f]
  again = FakeGenerate()
  assert geneval_export.export(str(meta), str(out), again, n=2)["skipped"] == 4
  assert again.calls == 0


@pytest.mark.parametrize("line,needle", [("{not json", "not valid JSON"),
                                         ('{"tag": "x"}', "'prompt'")])
def test_geneval_bad_line_named(tmp_path, line, needle):
  meta = tmp_path / "m.jsonl"
  meta.write_text(json.dumps({"prompt": "ok"}) + "\n\n" + line + "\n")
  with pytest.raises(ValueError, match=rf"m\.jsonl:3: .*{needle}"):
    geneval_export.export(str(meta), str(tmp_path / "out"), FakeGenerate(), n=1)


def fake_edit(calls):
  def edit(images, instructions, seed):
    calls.append(list(instructions))
    return np.stack([255 - np.asarray(im, np.uint8) for im in images])
  return edit


def test_imgedit_export(tmp_path):
  images = tmp_path / "images"
  (images / "sub").mkdir(parents=True)
  src = np.arange(6 * 4 * 3, dtype=np.uint8).reshape(6, 4, 3)
  Image.fromarray(src).save(images / "sub" / "a.png")
  Image.fromarray(src).convert("L").save(images / "b.jpg")
  (images / "broken.png").write_bytes(b"not a png at all")
  (tmp_path / "secret.png").write_bytes(b"x")
  manifest = {
      "k1": {"id": "sub/a.png", "prompt": "invert it", "edit_type": "adjust"},
      "k2": {"image": "b.jpg", "instruction": "grey to colour", "edit_type": "style"},
      "k3": {"id": "nope.png", "prompt": "x", "edit_type": "add"},
      "k4": {"id": "broken.png", "prompt": "x", "edit_type": "add"},
      "k5": {"id": "../secret.png", "prompt": "x", "edit_type": "add"},
      "k6": {"id": "sub/../../secret.png", "prompt": "x", "edit_type": "add"},
  }
  path = tmp_path / "manifest.json"
  path.write_text(json.dumps(manifest))
  out = tmp_path / "out"
  calls = []
  summary = imgedit_export.export(str(path), str(images), str(out), fake_edit(calls))
  assert sorted(os.listdir(out)) == ["k1.png", "k2.png", "summary.json"]
  np.testing.assert_array_equal(np.asarray(Image.open(out / "k1.png")), 255 - src)
  assert np.asarray(Image.open(out / "k2.png")).shape == (6, 4, 3)
  assert summary["edited"] == 2 and summary["failed"] == 4
  assert summary["failed_by_reason"] == {"bad_entry": 0, "path_escapes_folder": 2,
                                         "missing_file": 1, "undecodable_image": 1}
  assert summary["failed_items"] == {"k3": "missing_file", "k4": "undecodable_image",
                                     "k5": "path_escapes_folder", "k6": "path_escapes_folder"}
  assert json.load(open(out / "summary.json")) == summary
  # Resume: existing results are skipped, only failures are retried (and fail again).
  os.remove(out / "k2.png")
  calls.clear()
  summary = imgedit_export.export(str(path), str(images), str(out), fake_edit(calls))
  assert calls == [["grey to colour"]]
  assert summary["skipped"] == 1 and summary["edited"] == 1 and summary["failed"] == 4


def test_imgedit_manifest_errors(tmp_path):
  (tmp_path / "images").mkdir()
  bad = tmp_path / "m.json"
  bad.write_text("[1, 2]")
  with pytest.raises(ValueError, match="m.json: expected a JSON object"):
    imgedit_export.export(str(bad), str(tmp_path / "images"), str(tmp_path / "o"), fake_edit([]))
  with pytest.raises(FileNotFoundError, match="image folder"):
    imgedit_export.export(str(bad), str(tmp_path / "nope"), str(tmp_path / "o"), fake_edit([]))


def test_report_writer(tmp_path):
  scores = {"t2i": {"overall": 0.75, "counting": 0.5}, "edit": {"accuracy": 0.9}}
  grid = tmp_path / "t2i.png"
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(grid)
  paths = report.write_report(str(tmp_path), scores, "shapes evaluation", [str(grid)],
                              {"steps": 4})
  assert json.load(open(paths["scores"])) == scores
  chart = Image.open(paths["chart"])
  assert chart.format == "PNG" and chart.size[0] > 100
  text = open(paths["report"]).read()
  assert "| t2i/counting | 0.5000 |" in text and "![scores](scores.png)" in text
  assert "(t2i.png)" in text and "- steps: 4" in text
  assert report.flatten(scores) == {"t2i/overall": 0.75, "t2i/counting": 0.5, "edit/accuracy": 0.9}
  with pytest.raises(ValueError, match="no numeric scores"):
    report.bar_chart({"a": "x"}, str(tmp_path / "x.png"))


def test_cli_argument_errors(capsys):
  from dreamlite_jax.eval import __main__ as cli
  with pytest.raises(SystemExit):
    cli.main(["--checkpoint", "x", "--suite", "geneval", "--out", "o"])
  assert "--metadata" in capsys.readouterr().err
