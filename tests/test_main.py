"""The main job end to end at the smoke preset, and the skip/resume behaviour of the stage runner."""
from __future__ import annotations

import json
import math
import os
import shutil

import pytest

from dreamlite_jax import main as main_lib
from dreamlite_jax.job import preemption
from dreamlite_jax.job import stages
from dreamlite_jax.config import ConfigError

CONFIG = os.path.join(os.path.dirname(__file__), "..", "experiments", "shapes_tiny.py")


def _run(workdir: str, *extra: str) -> dict:
  return main_lib.main(["--config", CONFIG, "--workdir", workdir, "--config.preset=smoke", *extra])


@pytest.fixture(scope="module")
def smoke_job(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("job") / "smoke")
  records = _run(workdir)
  return workdir, records


def _finite_leaves(tree, path=""):
  items = tree.items() if isinstance(tree, dict) else enumerate(tree)
  for key, value in items:
    if isinstance(value, (dict, list)):
      yield from _finite_leaves(value, f"{path}{key}.")
    elif value is not None and not isinstance(value, str):
      yield f"{path}{key}", value


def test_smoke_job_writes_report_and_finite_scores(smoke_job):
  workdir, records = smoke_job
  config = stages.load_job_config(CONFIG, ["--config.preset=smoke"])
  assert list(records) == stages.parse_stages(config)
  for name in ("report.md", "scores.json", "loss_curves.png", "config.json"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  with open(os.path.join(workdir, "scores.json")) as f:
    scores = json.load(f)
  for key in ("overall", "heldout_overall", "single_object", "color_attr", "heldout_colors"):
    assert 0.0 <= scores["t2i"][key] <= 1.0, key
  for key in ("accuracy", "heldout_accuracy", "recolor", "move", "heldout_add"):
    assert 0.0 <= scores["edit"][key] <= 1.0, key
  assert set(scores["rl"]) == {"before", "after"}
  for key in ("ceiling_t2i", "ceiling_t2i_heldout", "ceiling_edit", "ceiling_edit_heldout"):
    assert 0.0 <= scores["vae"][key] <= 1.0, key
  assert set(scores["distill"]) == {"teacher", "teacher_naive_4step", "teacher_naive_4step_cfg",
                                     "student_4step"}
  assert scores["convert"]["gpu_check_findings"] == 0
  assert scores["convert"]["max_abs_err_fp32"] < 1e-3
  assert scores["wall_time_s"] > 0
  for name, value in _finite_leaves(scores):
    assert isinstance(value, (int, float)) and math.isfinite(value), name
  for f in records["convert"]["results"]["convert"]["files"]:
    assert os.path.getsize(os.path.join(workdir, "convert", f["file"])) > 0
  report = open(os.path.join(workdir, "report.md")).read()
  for name in records:
    assert f"| {name} |" in report
  for grid in records["eval"]["results"]["sample_grids"]:
    assert os.path.getsize(os.path.join(workdir, "eval", grid)) > 0


def test_rerun_after_deleting_last_stage_reruns_only_it(smoke_job):
  workdir, records = smoke_job
  last = list(records)[-1]
  before = {n: os.path.getmtime(stages.done_path(workdir, n)) for n in records}
  shutil.rmtree(os.path.join(workdir, last))
  messages = []
  config = stages.load_job_config(CONFIG, ["--config.preset=smoke"])
  again = stages.run_job(config, workdir, log=messages.append)
  skipped = [n for n in records if f"[job] {n}: finished earlier" in " ".join(messages)]
  assert skipped == [n for n in records if n != last]
  assert any(m.startswith(f"[job] {last}: starting") for m in messages)
  for name in records:
    mtime = os.path.getmtime(stages.done_path(workdir, name))
    assert (mtime == before[name]) == (name != last), name
  assert again[last]["results"].keys() == records[last]["results"].keys()


def test_rl_stage_runs_flow_grpo_too(smoke_job, tmp_path):
  """The smoke job's RL stage is DiffusionNFT (the default); Flow-GRPO, the other online
  method, runs end to end from the same SFT checkpoint."""
  workdir, records = smoke_job
  assert records["rl"]["results"]["rl"]["method"] == "nft"
  copy = str(tmp_path / "grpo")
  os.makedirs(copy)
  for name in ("data", "vae", "pretrain_t2i", "pretrain_edit", "pretrain_joint", "sft"):
    os.symlink(os.path.join(workdir, name), os.path.join(copy, name))
  again = _run(copy, "--stages", "rl", "--config.rl.method=grpo")
  rl = again["rl"]["results"]["rl"]
  assert rl["method"] == "flow_grpo"
  assert math.isfinite(rl["kl_to_reference"]) and 0.0 <= rl["after"] <= 1.0


def test_unknown_stage_and_missing_parent_fail_loudly(tmp_path):
  config = stages.load_job_config(CONFIG, ["--config.preset=smoke"])
  with pytest.raises(ConfigError, match="unknown stage 'pretrain_everything'"):
    stages.parse_stages(config, "vae,pretrain_everything")
  with pytest.raises(ConfigError, match="pretrain_joint"):
    stages.run_job(config, str(tmp_path), stages="sft")
  with pytest.raises(ConfigError, match=r"config.preset = 'huge': unknown; known presets: "
                                        r"\['default', 'smoke', 'long'\]"):
    stages.load_job_config(CONFIG, ["--config.preset=huge"])
  paper = os.path.join(os.path.dirname(CONFIG), "dreamlite_1024.py")
  with pytest.raises(ConfigError, match="has no presets"):
    stages.load_job_config(paper, ["--config.preset=smoke"])
  # Every preset is a valid job; a user override of a field the preset sets wins.
  for preset in ("default", "smoke", "long"):
    config = stages.load_job_config(CONFIG, [f"--config.preset={preset}",
                                             "--config.pretrain_edit.train.steps=70"])
    assert config.preset == preset and config.pretrain_edit.train.steps == 70


def test_changed_config_of_a_finished_stage_stops_the_job_before_running(smoke_job):
  """A finished stage is reused only with the config it ran with; the stages built on
  it are named too, and nothing runs or changes."""
  workdir, records = smoke_job
  before = {n: os.path.getmtime(stages.done_path(workdir, n)) for n in records}
  config = stages.load_job_config(CONFIG, ["--config.preset=smoke", "--config.rl.iterations=2"])
  with pytest.raises(ConfigError) as err:
    stages.run_job(config, workdir, log=lambda m: None)
  message = str(err.value)
  assert "rl: finished with a different config (rl.iterations: 1 -> 2)" in message
  assert "distill: built on a run of 'rl' that this job is about to replace" in message
  for later in ("eval", "convert"):
    assert f"{later}: built on a run of 'distill'" in message
  for earlier in ("vae", "pretrain_t2i", "sft"):
    assert f"  {earlier}:" not in message
  assert os.path.join(workdir, "rl") in message
  assert {n: os.path.getmtime(stages.done_path(workdir, n)) for n in records} == before


def test_deleting_a_middle_stage_names_the_stages_built_on_it(smoke_job, tmp_path):
  workdir, records = smoke_job
  copy = str(tmp_path / "copy")
  os.makedirs(copy)
  for name in records:
    if name != "sft":
      os.symlink(os.path.join(workdir, name), os.path.join(copy, name))
  os.symlink(os.path.join(workdir, "data"), os.path.join(copy, "data"))
  config = stages.load_job_config(CONFIG, ["--config.preset=smoke"])
  with pytest.raises(ConfigError) as err:
    stages.run_job(config, copy, log=lambda m: None)
  message = str(err.value)
  assert "rl: built on a run of 'sft' that this job is about to replace" in message
  assert "pretrain_joint:" not in message
  # Selecting only the later stages cannot skip past the missing parent either.
  with pytest.raises(ConfigError, match="built on 'sft', which has no finished run"):
    stages.run_job(config, copy, stages="rl,distill", log=lambda m: None)


def test_every_stage_on_the_jobs_vae_is_stale_when_the_vae_changes(smoke_job):
  """The U-Net stages name no VAE parent, yet train on its latents: a changed VAE
  config flags all of them, not only the stages below a `parent` link."""
  workdir, records = smoke_job
  config = stages.load_job_config(CONFIG, ["--config.preset=smoke", "--config.vae.train.steps=7"])
  assert stages.upstream_stages(config, "pretrain_t2i") == ["vae"]
  assert stages.upstream_stages(config, "rl") == ["sft", "vae"]
  with pytest.raises(ConfigError) as err:
    stages.run_job(config, workdir, log=lambda m: None)
  message = str(err.value)
  assert "vae: finished with a different config (vae.train.steps: 6 -> 7)" in message
  for name in records:
    if name != "vae":
      assert f"  {name}: built on a run of " in message, name


def test_an_interrupted_stage_resumes_only_with_the_config_and_parents_it_started_with(
    smoke_job, tmp_path, monkeypatch):
  """An interrupted stage (STARTED.json, no DONE.json) would resume from its own
  checkpoints: that is refused when its config or an upstream run changed since."""
  workdir, records = smoke_job
  copy = str(tmp_path / "copy")
  os.makedirs(copy)
  for name in ("data", "vae", "pretrain_t2i", "pretrain_edit", "pretrain_joint"):
    os.symlink(os.path.join(workdir, name), os.path.join(copy, name))
  os.makedirs(os.path.join(copy, "sft"))  # a finished sft that can be "re-run" below
  shutil.copy(stages.done_path(workdir, "sft"), stages.done_path(copy, "sft"))
  ran = []

  def failed_rl(ctx):  # fails before writing anything: a fixed config may re-run it
    ran.append(ctx.name)
    raise ValueError("a bad field")

  monkeypatch.setitem(stages.STAGE_RUNNERS, "rl", failed_rl)
  config = stages.load_job_config(CONFIG, ["--config.preset=smoke"])
  with pytest.raises(ValueError):
    stages.run_job(config, copy, stages="sft,rl", log=lambda m: None)
  assert stages.read_started(copy, "rl") is not None

  def preempted_rl(ctx):
    ran.append(ctx.name)
    with open(os.path.join(ctx.workdir, "rl_progress.json"), "w") as f:
      f.write("{}")  # what a real stage resumes from
    raise preemption.StagePreempted("rl: preempted")

  monkeypatch.setitem(stages.STAGE_RUNNERS, "rl", preempted_rl)
  changed = stages.load_job_config(CONFIG, ["--config.preset=smoke", "--config.rl.iterations=2"])
  stages.run_job(changed, copy, stages="sft,rl", log=lambda m: None)  # nothing to resume: runs
  shutil.rmtree(os.path.join(copy, "rl"))
  stages.run_job(config, copy, stages="sft,rl", log=lambda m: None)
  assert ran == ["rl", "rl", "rl"] and stages.read_done(copy, "rl") is None
  started = stages.read_started(copy, "rl")
  assert started["upstream_run_ids"]["sft"] == records["sft"]["run_id"]

  # Resuming with the same config and parents is allowed (the runner is called again).
  stages.run_job(config, copy, stages="sft,rl", log=lambda m: None)
  assert ran == ["rl"] * 4
  # A changed field of the stage is not.
  with pytest.raises(ConfigError, match=r"rl: interrupted run \(its checkpoints would be resumed\) "
                                        r"with a different config \(rl.iterations: 1 -> 2\)"):
    stages.run_job(changed, copy, stages="sft,rl", log=lambda m: None)
  # Nor is a parent that was re-run after the interruption.
  sft = stages.read_done(copy, "sft")
  stages.write_json(stages.done_path(copy, "sft"), {**sft, "run_id": "a-later-run"})
  with pytest.raises(ConfigError, match="rl: interrupted run .* built on an earlier run of 'sft'"):
    stages.run_job(config, copy, stages="sft,rl", log=lambda m: None)
  assert ran == ["rl"] * 4
