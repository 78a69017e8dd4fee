"""The job report: the VAE stage's ceilings reach scores.json and report.md."""
import ml_collections

from dreamlite_jax.job import report
from dreamlite_jax.training import metrics as metrics_lib


def _record(results):
  return {"results": results, "wall_time_s": 1.0, "finished_at": "now"}


def test_vae_ceilings_are_reported():
  ceilings = {"ceiling_t2i": 0.97, "ceiling_t2i_heldout": 0.96, "ceiling_edit": 0.93,
              "ceiling_edit_heldout": 0.91}
  records = {"vae": _record({"steps": 10, "final_loss": 0.1, **ceilings})}
  scores = report.build_scores(records)
  assert scores["vae"] == ceilings
  config = ml_collections.ConfigDict({"stages": "vae", "preset": "default"})
  text = report.render_markdown(config, "w", records, scores, None)
  assert "T2I 0.970 (held-out 0.960), edit 0.930 (held-out 0.910)" in text
  # Without a vae stage the keys are there, null.
  assert report.build_scores({})["vae"] == {k: None for k in ceilings}


def _scores(t2i, edit):
  return {"t2i": {"overall": t2i}, "edit": {"accuracy": edit}}


def test_learning_curve_places_every_score_at_its_unet_updates(tmp_path):
  """Stage checks logged inside a pretrain stage and every scored stage end become points at
  the U-Net updates made so far (the VAE's steps do not count); the PNG is written."""
  config = ml_collections.ConfigDict({
      "stages": "vae,pretrain_t2i,rl,distill,eval", "preset": "default",
      **{name: {"kind": kind} for name, kind in (("vae", "vae"), ("pretrain_t2i", "pretrain"),
                                                 ("rl", "rl"), ("distill", "distill"),
                                                 ("eval", "eval"))}})
  writer = metrics_lib.MetricsWriter(str(tmp_path / "pretrain_t2i"))
  writer.write(10, {"loss": 0.5, "check_t2i": 0.1, "check_edit": 0.0})
  writer.write(20, {"loss": 0.4})
  writer.write(10, {"loss": 0.5, "check_t2i": 0.2, "check_edit": 0.05})  # a resumed run
  writer.close()
  records = {
      "vae": _record({"steps": 1000, "ceiling_t2i": 0.9, "ceiling_edit": 0.8}),
      "pretrain_t2i": _record({"steps": 30, "scores": _scores(0.4, 0.1)}),
      "rl": _record({"steps": 8, "scores": _scores(0.5, 0.1)}),
      "distill": _record({"steps": 4, "scores": _scores(0.45, 0.2)}),
      "eval": _record({"scores": _scores(0.47, 0.15)}),
  }
  curve = report.learning_curve(config, str(tmp_path), records)
  assert [(p["stage"], p["unet_steps"], p["t2i"], p["edit"], p["sampler"]) for p in curve] == [
      ("pretrain_t2i", 10, 0.2, 0.05, "teacher"), ("pretrain_t2i", 30, 0.4, 0.1, "teacher"),
      ("rl", 38, 0.5, 0.1, "teacher"), ("distill", 42, 0.45, 0.2, "student"),
      ("eval", 42, 0.47, 0.15, "student")]
  scores = report.write_report(config, str(tmp_path), records, log=lambda _: None)
  assert scores["learning_curve"] == curve
  png = tmp_path / report.LEARNING_CURVE_PNG
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "![learning curve](learning_curve.png)" in (tmp_path / "report.md").read_text()
  assert report.plot_learning_curve([], {}, str(tmp_path / "none.png")) is None
