"""A job config is validated whole before its first stage runs; stages dispatch on `kind`.

The job here is built in the test (the spec's shape, embedding-cache source) and its
runners are stubs, so nothing trains: a validation error must come before any stub
is called, and each error must name the field by its full path.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from dreamlite_jax import config_schema
from dreamlite_jax import main as main_lib
from dreamlite_jax.job import preemption
from dreamlite_jax.job import stages
from dreamlite_jax.config import ConfigError
from dreamlite_jax.models.unet import UNetConfig
from dreamlite_jax.models.vae import VAEConfig
from experiments import train_defaults

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SIDES = (64, 128)


def _fields(instance) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dataclasses.asdict(instance))


def _pretrain(parent: str, t2i_weight: float, edit_weight: float) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      kind="pretrain", parent=parent, init_from_ema=False,
      train=train_defaults.train_config(steps=4, batch_size=8, warmup_steps=1),
      loss=dict(timestep_sampling="logit_normal", text_dropout=0.1, image_dropout=0.0),
      data=dict(t2i_weight=t2i_weight, edit_weight=edit_weight,
                resolutions=tuple((side, 2 * i) for i, side in enumerate(SIDES)))))


def job_config(t2i_cache: str = "", edit_cache: str = "") -> ml_collections.ConfigDict:
  """A small job of the spec's shape: a `vae` section (not listed) and two pretrain-kind
  stages on the cache source."""
  config = ml_collections.ConfigDict()
  config.stages = "pretrain_a,pretrain_b"
  config.seed = 0
  config.mesh = train_defaults.mesh_config(data=-1, fsdp=1, tensor=1, max_replicated_fraction=1.0)
  config.model = ml_collections.ConfigDict(dict(
      unet=_fields(UNetConfig.tiny()), vae=_fields(VAEConfig.tiny(downsample_factor=4)),
      conditioning="spatial", vae_checkpoint="",
      text_encoder=dict(spec="tiny:0", text_length=8)))
  config.data = ml_collections.ConfigDict(dict(
      source="cache", t2i_cache=t2i_cache, edit_cache=edit_cache, num_threads=1, prefetch=2))
  config.vae = ml_collections.ConfigDict(dict(
      kind="vae", parent="", train=train_defaults.train_config(steps=2, batch_size=8,
                                                                warmup_steps=0)))
  config.pretrain_a = _pretrain("", 1.0, 0.0)
  config.pretrain_b = _pretrain("pretrain_a", 0.5, 0.5)
  return config


def make_cache(root, sides=SIDES) -> str:
  """A cache root as `build_cache` leaves it, as far as validation looks: `<side>/cache_info.json`."""
  for side in sides:
    os.makedirs(os.path.join(root, str(side)), exist_ok=True)
    with open(os.path.join(root, str(side), config_schema.CACHE_INFO), "w") as f:
      f.write("{}")
  return str(root)


@pytest.fixture
def caches(tmp_path):
  return make_cache(tmp_path / "t2i"), make_cache(tmp_path / "edit")


@pytest.fixture
def ran(monkeypatch):
  """Stub runners for every kind: they record the stage names they were called with."""
  calls = []

  def stub(ctx):
    calls.append(ctx.name)
    return {"steps": 1}

  for kind in list(stages.STAGE_RUNNERS):
    monkeypatch.setitem(stages.STAGE_RUNNERS, kind, stub)
  return calls


def _config_file(tmp_path, overrides_code: str = "") -> str:
  path = tmp_path / "job.py"
  path.write_text(textwrap.dedent(f"""
      from test_job_validation import job_config

      def get_config():
        config = job_config()
        {overrides_code}
        return config
  """))
  return str(path)


def test_a_valid_job_runs_every_listed_stage_of_a_kind(caches, ran, tmp_path):
  config = job_config(*caches)
  records = stages.run_job(config, str(tmp_path / "job"), log=lambda m: None)
  assert ran == ["pretrain_a", "pretrain_b"]  # two stages of one kind, each its own section
  assert list(records) == ran
  assert stages.read_done(str(tmp_path / "job"), "pretrain_b")["results"] == {"steps": 1}


@pytest.mark.parametrize("field, value, message", [
    ("pretrain_b.train.schedule", "'x'",
     "config.pretrain_b.train.schedule = 'x': must be 'cosine' or 'constant'"),
    ("pretrain_b.train.accum_steps", "3",
     "config.pretrain_b.train.accum_steps = 3: must divide config.pretrain_b.train.batch_size"),
    ("pretrain_b.train.warmup_steps", "9", "config.pretrain_b.train.warmup_steps = 9"),
    ("pretrain_b.loss.text_dropout", "1.5", "config.pretrain_b.loss: PretrainLossConfig rejects"),
    ("pretrain_b.loss.not_a_field", "1", "config.pretrain_b.loss.not_a_field: not a field"),
    ("pretrain_b.data.edit_weight", "-1.0", "config.pretrain_b.data.edit_weight = -1.0"),
    ("pretrain_a.data.t2i_weight", "0.0",
     "config.pretrain_a.data.t2i_weight + config.pretrain_a.data.edit_weight must be > 0"),
    ("pretrain_b.data.resolutions", "((128, 0), (64, 0))", "config.pretrain_b.data.resolutions"),
    ("pretrain_b.data.resolutions", "((72, 0),)",
     "config.pretrain_b.data.resolutions = ((72, 0),): sides [72] are not multiples of 16"),
    ("pretrain_b.parent", "'pretrain_c'", "config.pretrain_b.parent = 'pretrain_c': not a stage"),
    ("pretrain_b.train", "None", "config.pretrain_b.train.steps is missing"),
    ("vae.train.schedule", "'x'", None),  # not listed: not validated, not run
    ("data.source", "'web'", "config.data.source = 'web': must be one of ('shapes', 'cache')"),
    ("model.unet.dtype", "'bfloat16'",
     "config.model.unet.dtype = 'bfloat16': must equal config.pretrain_a.train.compute_dtype"),
    ("model.unet.not_a_field", "1", "config.model.unet.not_a_field: not a field of UNetConfig"),
    ("mesh.fsdp", "0", "config.mesh.fsdp = 0: must be a positive int or -1"),
    ("seed", "'zero'", "config.seed = 'zero': must be an int"),
])
def test_bad_fields_are_named_by_their_full_path_before_any_stage_runs(
    field, value, message, caches, ran, tmp_path):
  config = job_config(*caches)
  *parents, leaf = field.split(".")
  node = config
  for part in parents:
    node = node[part]
  with node.ignore_type():
    node[leaf] = eval(value)  # noqa: S307 (test literals)
  workdir = str(tmp_path / "job")
  if message is None:
    stages.run_job(config, workdir, log=lambda m: None)
    assert ran == ["pretrain_a", "pretrain_b"]
    return
  with pytest.raises(ConfigError) as err:
    stages.run_job(config, workdir, log=lambda m: None)
  assert message in str(err.value)
  assert ran == [] and not os.path.exists(workdir)


def test_missing_caches_name_the_field_the_path_and_the_missing_side(tmp_path, ran):
  t2i = make_cache(tmp_path / "t2i", sides=(64,))
  edit = make_cache(tmp_path / "edit")
  with pytest.raises(ConfigError) as err:
    stages.run_job(job_config(t2i, edit), str(tmp_path / "job"), log=lambda m: None)
  assert f"config.data.t2i_cache = {t2i!r}: no 128/cache_info.json" in str(err.value)
  assert "'pretrain_a'" in str(err.value)  # the first stage that draws T2I rows at 128 px

  missing = str(tmp_path / "nowhere")
  with pytest.raises(ConfigError, match=f"config.data.edit_cache = '{missing}': not a directory"):
    stages.run_job(job_config(make_cache(tmp_path / "t2i"), missing), str(tmp_path / "job"))
  # A stage that draws no edit rows needs no edit cache.
  config = job_config(make_cache(tmp_path / "t2i"), "")
  config.stages = "pretrain_a"
  stages.run_job(config, str(tmp_path / "job"), log=lambda m: None)
  assert ran == ["pretrain_a"]


def test_weight_folders_are_checked(caches, tmp_path, ran):
  config = job_config(*caches)
  config.model.vae_checkpoint = str(tmp_path / "no_vae")
  with pytest.raises(ConfigError, match=r"config\.model\.vae_checkpoint = '.*no_vae': not a dir"):
    stages.validate_job_config(config, stages.parse_stages(config))
  (tmp_path / "vae_folder").mkdir()
  config.model.vae_checkpoint = str(tmp_path / "vae_folder")
  with pytest.raises(ConfigError, match="neither a training run"):
    stages.validate_job_config(config, stages.parse_stages(config))
  (tmp_path / "vae_folder" / "config.json").write_text("{}")
  (tmp_path / "vae_folder" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
  stages.validate_job_config(config, stages.parse_stages(config))

  config = job_config(*caches)
  del config["vae"]
  with pytest.raises(ConfigError, match=r"config\.model\.vae_checkpoint = '': stage 'pretrain_a' "
                                        r"needs a VAE and this job has no 'vae' stage"):
    stages.validate_job_config(config, stages.parse_stages(config))

  config = job_config(*caches)
  config.model.text_encoder.spec = str(tmp_path / "no_qwen")
  with pytest.raises(ConfigError, match=r"config\.model\.text_encoder\.spec = '.*no_qwen'"):
    stages.validate_job_config(config, stages.parse_stages(config))
  assert ran == []


def test_mesh_and_batch_are_checked_against_devices_and_processes(caches):
  config = job_config(*caches)
  names = stages.parse_stages(config)
  check = lambda **kw: config_schema.check_job_environment(config, names, **kw)
  check(device_count=8, process_count=1)
  config.mesh.fsdp = 3
  with pytest.raises(ConfigError, match=r"config\.mesh = .*does not fit jax\.device_count\(\) = 8"):
    check(device_count=8, process_count=1)
  config.mesh.update(dict(data=2, fsdp=2, tensor=1))
  with pytest.raises(ConfigError, match=r"config\.mesh = .*needs 4 devices, have 8"):
    check(device_count=8, process_count=1)
  config.mesh.update(dict(data=-1, fsdp=1, tensor=2))
  check(device_count=8, process_count=1)  # 4 data shards
  config.pretrain_b.train.batch_size = 6
  config.pretrain_b.train.accum_steps = 1
  with pytest.raises(ConfigError, match=r"config\.pretrain_b\.train\.batch_size = 6: must be "
                                        r"divisible by the 4 data shards"):
    check(device_count=8, process_count=1)
  config.pretrain_b.train.batch_size = 12
  with pytest.raises(ConfigError, match=r"config\.pretrain_b\.train\.batch_size = 12: must be "
                                        r"divisible by jax\.process_count\(\) = 8"):
    check(device_count=8, process_count=8)


def test_stage_kinds_pick_the_runner_and_unknown_ones_fail_naming_stage_and_kinds(caches, ran):
  config = job_config(*caches)
  known = str(sorted(stages.STAGE_RUNNERS))
  assert stages.parse_stages(config, "pretrain_b,pretrain_a") == ["pretrain_b", "pretrain_a"]
  config.pretrain_b.kind = "pretrain_everything"
  with pytest.raises(ConfigError) as err:
    stages.parse_stages(config)
  assert "config.pretrain_b.kind = 'pretrain_everything'" in str(err.value)
  assert "stage 'pretrain_b'" in str(err.value) and known in str(err.value)
  with pytest.raises(ConfigError, match=r"unknown stage 'nope' in --stages.*known kinds"):
    stages.parse_stages(config, "pretrain_a,nope")
  with pytest.raises(ConfigError, match=r"config\.mesh\.kind is missing: stage 'mesh'"):
    stages.parse_stages(config, "mesh")
  with pytest.raises(ConfigError, match="names a stage twice"):
    stages.parse_stages(config, "pretrain_a,pretrain_a")


def test_load_job_config_validates_the_selected_stages(caches, tmp_path):
  path = _config_file(tmp_path, f"config.data.t2i_cache, config.data.edit_cache = {caches!r}")
  sys.path.insert(0, os.path.dirname(__file__))
  try:
    config = stages.load_job_config(path)
    assert config.pretrain_b.parent == "pretrain_a"
    with pytest.raises(ConfigError, match=r"config\.pretrain_b\.train\.schedule = 'x'"):
      stages.load_job_config(path, ["--config.pretrain_b.train.schedule=x"])
    # Only the stages that run need their caches: pretrain_a draws no edit rows.
    stages.load_job_config(path, ["--config.data.edit_cache=/no/such/dir"], stages="pretrain_a")
    with pytest.raises(ConfigError, match="config.data.edit_cache = '/no/such/dir'"):
      stages.load_job_config(path, ["--config.data.edit_cache=/no/such/dir"])
  finally:
    sys.path.remove(os.path.dirname(__file__))


@pytest.mark.parametrize("stage", ["vae", "distill"])
def test_every_trained_stage_warms_up_within_its_steps_checked_before_any_stage(stage):
  with pytest.raises(ConfigError, match=rf"config\.{stage}\.train\.warmup_steps = 10: must be "
                                        rf"<= config\.{stage}\.train\.steps = 2"):
    stages.load_job_config(os.path.join(ROOT, "experiments", "shapes_tiny.py"),
                           [f"--config.{stage}.train.steps=2",
                            f"--config.{stage}.train.warmup_steps=10"])


def test_rl_refuses_gradient_accumulation_naming_the_field_before_any_stage():
  """An RL train step is one minibatch of an iteration's rollouts: accum_steps is not
  honoured, so anything but 1 fails at validation instead of being overridden."""
  path = os.path.join(ROOT, "experiments", "shapes_tiny.py")
  with pytest.raises(ConfigError, match=r"config\.rl\.train\.accum_steps = 2: must be 1 for RL "
                                        r"\(each train step is one of the num_minibatches"):
    stages.load_job_config(path, ["--config.preset=smoke", "--config.rl.train.accum_steps=2"])
  stages.load_job_config(path, ["--config.preset=smoke", "--config.rl.train.accum_steps=1"])


TINY = os.path.join(ROOT, "experiments", "shapes_tiny.py")


@pytest.mark.parametrize("override, message", [
    ("--config.rl.sampler.steps=0", "config.rl.sampler.steps = 0: must be an int >= 1"),
    ("--config.rl.eval.sampler.guidance=-1.0", "config.rl.eval.sampler.guidance = -1.0"),
    ("--config.eval.sampler.image_guidance=-0.5", "config.eval.sampler.image_guidance = -0.5"),
    ("--config.eval.stage_check.sampler.steps=0", "config.eval.stage_check.sampler.steps = 0"),
    ("--config.distill.objective.teacher.steps=0", "config.distill.objective.teacher.steps = 0"),
    ("--config.distill.eval.teacher.guidance=-3.5", "config.distill.eval.teacher.guidance = -3.5"),
    ("--config.eval.batch_size=0", "config.eval.batch_size = 0: must be a positive int"),
    ("--config.eval.stage_check.every=-1", "config.eval.stage_check.every = -1: must be an int >= 0"),
    # The names the one sampler shape replaced are unknown fields.
    ("--config.rl.sample_steps=4", "unknown config field: config.rl.sample_steps"),
    ("--config.rl.nft.sample_steps=4", "unknown config field: config.rl.nft.sample_steps"),
    ("--config.rl.grpo.guidance=3.5", "unknown config field: config.rl.grpo.guidance"),
    ("--config.distill.eval.teacher_steps=4", "unknown config field: config.distill.eval.teacher_steps"),
    ("--config.distill.objective.regression_steps=4",
     "unknown config field: config.distill.objective.regression_steps"),
    ("--config.distill.objective.guidance_scale=3.5",
     "unknown config field: config.distill.objective.guidance_scale"),
    ("--config.eval.sampler.batch_size=8", "unknown config field: config.eval.sampler.batch_size"),
])
def test_sampler_fields_are_checked_at_load_and_old_names_are_unknown(override, message):
  with pytest.raises(ConfigError) as err:
    stages.load_job_config(TINY, [override])
  assert message in str(err.value)


def test_every_sampling_section_has_the_one_sampler_shape():
  """Every section that sets a guidance scale is a `SamplerConfig` where the schema looks for
  one (each preset of both job configs), and a stage that runs needs its samplers."""
  from dreamlite_jax import config as config_lib
  from dreamlite_jax.diffusion.sampling import SAMPLER_FIELDS

  def guided(node, path=""):
    if isinstance(node, ml_collections.ConfigDict):
      if "guidance" in node:
        yield path
      for key, value in node.items():
        yield from guided(value, f"{path}.{key}" if path else key)

  variants = [(TINY, [f"--config.preset={p}"]) for p in ("default", "smoke", "long")]
  for path, overrides in variants + [(os.path.join(ROOT, "experiments", "dreamlite_1024.py"), [])]:
    config = config_lib.load_config(path, overrides)
    expected = {f for f in config_schema.JOB_SAMPLERS if f in guided(config)}
    for name in config_schema.stage_names(config):
      expected |= {f"{name}.{f}" for f in config_schema.SAMPLERS.get(config[name].kind, ())
                   if config_schema._has(config[name], f)}
    found = set(guided(config))
    assert found == expected, (path, overrides)
    for field in found:
      *parents, leaf = field.split(".")
      node = config
      for part in parents:
        node = node[part]
      assert tuple(sorted(node[leaf].keys())) == tuple(sorted(SAMPLER_FIELDS)), field
  config = config_lib.load_config(TINY)
  with config.rl.ignore_type():
    del config.rl["sampler"]
  with pytest.raises(ConfigError, match=r"config\.rl\.sampler is missing"):
    config_schema.validate_job(config, ["rl"])
  config_schema.validate_job(config, ["eval"])  # a job without rl does not need it


def test_the_command_line_names_a_missing_cache_in_one_line(tmp_path):
  path = _config_file(tmp_path)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.dirname(__file__)]),
             JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [sys.executable, "-m", "dreamlite_jax.main", "--config", path, "--workdir",
       str(tmp_path / "W"), "--compile-cache", "", "--config.data.t2i_cache=/no/such/dir"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1, out.stderr
  assert "config.data.t2i_cache = '/no/such/dir'" in lines[0] and "Traceback" not in out.stderr
  assert not os.path.exists(tmp_path / "W")


def test_url_workdirs_stay_urls(monkeypatch):
  assert stages.absolute("gs://bucket/runs/job") == "gs://bucket/runs/job"
  assert stages.absolute("runs/job") == os.path.join(os.getcwd(), "runs", "job")
  assert stages.done_path("gs://bucket/job", "sft") == "gs://bucket/job/sft/DONE.json"
  args, _ = main_lib.parse_args(["--config", "c.py", "--workdir", "gs://bucket/job"])
  assert args.workdir == "gs://bucket/job"
  # A parent's recorded checkpoint (or its directory) keeps its scheme too.
  config = job_config()
  monkeypatch.setattr(stages, "read_done", lambda workdir, stage: {"results": {}})
  assert stages._parent(config, "pretrain_b", "gs://bucket/job")[0] == "gs://bucket/job/pretrain_a"
  monkeypatch.setattr(stages, "read_done", lambda workdir, stage: {
      "results": {"checkpoint": "gs://other/pretrain_a"}})
  assert stages._parent(config, "pretrain_b", "gs://bucket/job")[0] == "gs://other/pretrain_a"


def test_a_rerun_resumes_an_interrupted_stage_only_where_it_left_work(caches, ran, tmp_path,
                                                                      monkeypatch):
  """STARTED.json alone: nothing to resume, a changed config may re-run the stage; any
  other file in the stage's tree: the config it started with is required."""
  workdir = str(tmp_path / "job")
  config = job_config(*caches)

  def interrupted(ctx):
    ran.append(ctx.name)
    raise preemption.StagePreempted("stopped")

  monkeypatch.setitem(stages.STAGE_RUNNERS, "pretrain", interrupted)
  stages.run_job(config, workdir, log=lambda m: None)
  assert stages.read_started(workdir, "pretrain_a") and not stages._holds_work(
      os.path.join(workdir, "pretrain_a"))
  config.pretrain_a.train.lr = 0.5
  stages.run_job(config, workdir, log=lambda m: None)  # nothing resumable: runs again
  os.makedirs(os.path.join(workdir, "pretrain_a", "checkpoints", "4"))
  with open(os.path.join(workdir, "pretrain_a", "checkpoints", "4", "state"), "w") as f:
    f.write("x")
  assert stages._holds_work(os.path.join(workdir, "pretrain_a"))
  config.pretrain_a.train.lr = 0.25
  with pytest.raises(ConfigError, match=r"pretrain_a: interrupted run .* \(pretrain_a\.train\.lr"):
    stages.run_job(config, workdir, log=lambda m: None)
  assert ran == ["pretrain_a", "pretrain_a"]


def test_a_parent_may_name_a_model_outside_the_job(caches, tmp_path, ran):
  """`parent` = a path (a run, another job's stage, a diffusers DreamLite folder such as the
  release): accepted when it holds a model, named in one error when it does not."""
  config = job_config(*caches)
  config.pretrain_a.parent = str(tmp_path / "no_model")
  with pytest.raises(ConfigError, match=r"config\.pretrain_a\.parent = '.*no_model': neither a "
                                        r"training run \(checkpoints/\) nor a diffusers"):
    stages.validate_job_config(config, stages.parse_stages(config))
  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  config.pretrain_a.parent = str(tmp_path / "run")
  stages.validate_job_config(config, stages.parse_stages(config))
  assert stages.upstream_stages(config, "pretrain_a") == ["vae"]  # no stage of this job
  config.pretrain_a.parent = "no_such_stage"
  with pytest.raises(ConfigError, match="not a stage of this config"):
    stages.validate_job_config(config, stages.parse_stages(config))
  assert ran == []
