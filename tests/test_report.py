"""The job report: the VAE stage's ceilings reach scores.json and report.md."""
import ml_collections

from dreamlite_jax.job import report


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
