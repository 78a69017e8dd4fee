"""The paper-scale journey as a user runs it, end to end, with the model shrunk by overrides.

A folder of JPEG images with captions and a folder of edit triplets (bad items
included) -> `python -m data_pipelines.build_cache` with small random-weight VAE
and Qwen3-VL folders in diffusers / transformers layout -> every
`experiments/dreamlite_1024_<stage>.py` in order through `python -m dreamlite_jax.main`
into one job workdir: on 8 simulated devices, then on 2 processes (gloo), and one
stage stopped mid-run by SIGTERM and resumed to the same losses.

`pytest -k paper_journey` selects these tests.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from dreamlite_jax.diffusion import flow
from dreamlite_jax.models import weights
from dreamlite_jax.models.unet import UNetConfig
from dreamlite_jax.training import metrics as metrics_lib

import paper_fixtures
from rl import clip_fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("pretrain_t2i", "pretrain_edit", "pretrain_joint", "sft", "rl", "distill")
PRETRAIN = STAGES[:4]
RL_ITERATIONS, DISTILL_STEPS = 6, 12   # long enough to be stopped mid-run
SIDES = (64, 128)   # cache sides; pretrain_t2i grows 64 -> 128 at step 2
TEXT_LENGTH = 128  # the tiny encoder's vision tower needs >= 66 tokens for edits


def _config_file(stage: str) -> str:
  return os.path.join(ROOT, "experiments", f"dreamlite_1024_{stage}.py")


def _build_cache(folder: str, out: str, vae: str, text_encoder: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-m", "data_pipelines.build_cache", "--folder", folder, "--out", out,
       "--resolutions", ",".join(map(str, SIDES)), "--vae", vae, "--text-encoder",
       text_encoder, "--text-length", str(TEXT_LENGTH), "--min-side", "32"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """Weights, raw folders and the caches built from them by the cache command."""
  root = tmp_path_factory.mktemp("paper_journey")
  vae = paper_fixtures.write_tiny_vae(str(root / "taesd"))
  qwen = paper_fixtures.write_tiny_text_encoder(str(root / "qwen3_vl"))
  clip = clip_fixture.write_tiny_clip(str(root / "clip"))
  images = paper_fixtures.write_t2i_folder(str(root / "images"), n=24, size=96)
  edits = paper_fixtures.write_edit_folder(str(root / "edits"), n=24, size=96)
  caches = {}
  for task, folder in (("t2i", images), ("edit", edits)):
    caches[task] = str(root / "cache" / task)
    out = _build_cache(folder, caches[task], vae, qwen)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(open(os.path.join(caches[task], str(SIDES[0]), "cache_info.json")).read())
    assert info["kept"] > 0 and sum(info["skipped"].values()) > 0, info  # bad items counted
  return {"root": root, "vae": vae, "clip": clip, "caches": caches,
          "compile_cache": str(root / "xla_cache")}


def _fields(prefix: str, instance) -> list[str]:
  return [f"--config.{prefix}.{k}={v}" for k, v in dataclasses.asdict(instance).items()]


def overrides(world) -> list[str]:
  """The paper job shrunk to CPU size: every other field is the paper config's."""
  vae_config, _ = weights.load_vae_dir(world["vae"])
  text_dim = json.loads(open(os.path.join(world["caches"]["t2i"], str(SIDES[0]),
                                          "cache_info.json")).read())["text_dim"]
  unet = dataclasses.replace(
      UNetConfig.tiny(encoder_hid_dim=text_dim), block_out_channels=(32, 32), heads=(1, 1),
      down_kinds=("cross", "full"), up_kinds=("full", "none"), transformer_depth=(1, 1),
      layers_per_block=1, dtype="float32")
  student = tuple(round(float(t), 2) for t in flow.timesteps_from_sigmas(
      flow.schedule_for_size(4, SIDES[0], SIDES[0], vae_scale=vae_config.downsample_factor)))
  out = [*_fields("model.unet", unet), *_fields("model.vae", vae_config),
         f"--config.model.vae_checkpoint={world['vae']}",
         f"--config.model.text_encoder.text_length={TEXT_LENGTH}",
         f"--config.data.t2i_cache={world['caches']['t2i']}",
         f"--config.data.edit_cache={world['caches']['edit']}",
         "--config.data.num_threads=1", "--config.data.prefetch=2",
         "--config.mesh.fsdp=2", "--config.mesh.max_replicated_fraction=1.0",
         "--config.samples.count=2", "--config.samples.sampler.steps=2"]
  for stage in STAGES:
    out += [f"--config.{stage}.train.{k}" for k in (
        "steps=4", "batch_size=8", "warmup_steps=1", "log_every=1", "checkpoint_every=2",
        "compute_dtype=float32", "progress_bar=False")]
  for stage in PRETRAIN:
    out += [f"--config.{stage}.train.sample_every=4",
            f"--config.{stage}.data.resolutions=(({SIDES[0]}, 0),)"]
  out += [f"--config.pretrain_t2i.data.resolutions=(({SIDES[0]}, 0), ({SIDES[1]}, 2))",
          f"--config.rl.iterations={RL_ITERATIONS}", "--config.rl.prompts_per_iteration=2",
          "--config.rl.sampler.steps=2", "--config.rl.num_minibatches=1",
          "--config.rl.checkpoint_every=1", "--config.rl.grpo.group_size=2",
          f"--config.rl.data.size={SIDES[0]}", f"--config.rl.reward.path={world['clip']}",
          "--config.rl.eval.count=2", "--config.rl.eval.sampler.steps=2",
          "--config.rl.eval.batch_size=2",
          f"--config.distill.train.steps={DISTILL_STEPS}", "--config.distill.objective.fake_updates=1",
          "--config.distill.objective.teacher.steps=2",
          "--config.distill.objective.gan_hidden=16",
          f"--config.distill.objective.student_timesteps={student}",
          f"--config.distill.data.size={SIDES[0]}", "--config.distill.data.pool_size=8",
          f"--config.distill.eval.size={SIDES[0]}", "--config.distill.eval.teacher.steps=2",
          "--config.distill.eval.batch_size=4"]
  return out


def _env(devices: int) -> dict:
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              TF_CPP_MIN_LOG_LEVEL="2")


def _main_args(stage: str, workdir: str, world) -> list[str]:
  return [sys.executable, "-m", "dreamlite_jax.main", "--config", _config_file(stage),
          "--workdir", workdir, "--compile-cache", world["compile_cache"], *overrides(world)]


def run_stage(stage: str, workdir: str, world) -> subprocess.CompletedProcess:
  out = subprocess.run(_main_args(stage, workdir, world), cwd=ROOT, env=_env(8),
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, f"{stage}:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
  return out


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_stage_two_processes(stage: str, workdir: str, world) -> None:
  port = _free_port()
  procs = [subprocess.Popen(
      _main_args(stage, workdir, world) + [
          "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
      cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=900))
  finally:
    for proc in procs:
      proc.kill()
  for proc, (out, err) in zip(procs, outputs):
    assert proc.returncode == 0, f"{stage} process:\n{out[-2000:]}\n{err[-4000:]}"


def losses(stage_dir: str) -> dict[int, float]:
  """step -> the last logged training loss (a resumed run re-logs the steps it repeats)."""
  return {int(h["step"]): h["loss"] for h in metrics_lib.read_metrics(stage_dir) if "loss" in h}


def _done(workdir: str, stage: str) -> dict:
  with open(os.path.join(workdir, stage, "DONE.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def journey(world):
  """Every stage, in order, one command each, into one workdir on 8 simulated devices."""
  workdir = str(world["root"] / "runs" / "dreamlite_1024")
  for stage in STAGES:
    run_stage(stage, workdir, world)
  return workdir


def test_paper_journey_runs_every_stage_on_eight_devices(journey):
  for stage in STAGES:
    record = _done(journey, stage)
    assert record["results"]["steps"] > 0, stage
  for stage in PRETRAIN:
    logged = losses(os.path.join(journey, stage))
    assert sorted(logged) == [1, 2, 3, 4] and all(np.isfinite(list(logged.values()))), stage
    grids = os.listdir(os.path.join(journey, stage, "samples"))
    assert grids == ["step_00000004.png"], (stage, grids)
  # Progressive resolution: pretrain_t2i compiled its step once per side.
  compiles = [h["step"] for h in metrics_lib.read_metrics(os.path.join(journey, "pretrain_t2i"))
              if "compile_seconds" in h]
  assert compiles == [0, 2], compiles
  rl = _done(journey, "rl")["results"]["rl"]
  assert np.isfinite(rl["before"]) and np.isfinite(rl["after"])
  assert os.path.isdir(os.path.join(journey, "distill", "student", "checkpoints"))
  # Each stage started from its parent's checkpoint in the same job.
  record = json.load(open(os.path.join(journey, "pretrain_edit", "DONE.json")))
  assert record["upstream_run_ids"]["pretrain_t2i"] == _done(journey, "pretrain_t2i")["run_id"]


def test_paper_journey_two_processes_match_one(journey, world):
  """Every stage as 2 processes x 4 devices. The U-Net stages and distillation (from the
  one-process teacher) see the same global batches as one process and log the same
  losses; RL rolls out each
  process's prompts with its own SDE noise, so its fixed before-score matches one
  process exactly and its training figures are finite and logged once per iteration."""
  workdir = str(world["root"] / "runs" / "two_processes")
  for stage in STAGES[:-1]:
    run_stage_two_processes(stage, workdir, world)
  # Distillation from the one-process job's teacher (RL's own result differs by its noise).
  distill_dir = str(world["root"] / "runs" / "two_processes_distill")
  _copy_parents(journey, distill_dir, "distill")
  run_stage_two_processes("distill", distill_dir, world)
  for stage, two_dir in [*((s, workdir) for s in PRETRAIN), ("distill", distill_dir)]:
    one, two = losses(os.path.join(journey, stage)), losses(os.path.join(two_dir, stage))
    assert sorted(two) == sorted(one), stage
    np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)],
                               rtol=1e-4, err_msg=stage)
  rl_one, rl_two = _done(journey, "rl")["results"]["rl"], _done(workdir, "rl")["results"]["rl"]
  np.testing.assert_allclose(rl_two["before"], rl_one["before"], rtol=1e-4)
  assert np.isfinite(rl_two["after"]) and np.isfinite(rl_two["train_reward_last"])
  assert sorted(h["step"] for h in metrics_lib.read_metrics(os.path.join(workdir, "rl"))
                if "reward" in h) == list(range(1, RL_ITERATIONS + 1))
  distill = _done(distill_dir, "distill")["results"]
  assert np.isfinite(distill["distill"]["student_vs_teacher_l1"])
  assert os.path.isdir(os.path.join(distill_dir, "distill", "student", "checkpoints"))


def _stop_mid_run(args: list[str], stage_dir: str) -> subprocess.CompletedProcess:
  """Runs a stage and sends it SIGTERM (a preemption) once its first step is logged."""
  proc = subprocess.Popen(args, cwd=ROOT, env=_env(8), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if losses(stage_dir) if os.path.exists(os.path.join(stage_dir, "metrics.jsonl")) else {}:
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.2)
  out, err = proc.communicate(timeout=600)
  return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _copy_parents(journey: str, workdir: str, stage: str) -> None:
  for parent in STAGES[:STAGES.index(stage)]:
    shutil.copytree(os.path.join(journey, parent), os.path.join(workdir, parent))


def _assert_resumes(stage: str, workdir: str, args: list[str], steps: int,
                    uninterrupted: dict[int, float]) -> None:
  stage_dir = os.path.join(workdir, stage)
  stopped = _stop_mid_run(args, stage_dir)
  assert not os.path.exists(os.path.join(stage_dir, "DONE.json")), "the stage was not stopped"
  stopped_at = max(losses(stage_dir))
  assert 0 < stopped_at < steps, stopped.stderr[-2000:]
  out = subprocess.run(args, cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  resumed = losses(stage_dir)
  assert sorted(resumed) == list(range(1, steps + 1))
  np.testing.assert_allclose([resumed[s] for s in range(1, steps + 1)],
                             [uninterrupted[s] for s in range(1, steps + 1)], rtol=1e-5,
                             err_msg=stage)


def test_paper_journey_stage_stopped_mid_run_resumes_to_the_same_losses(journey, world):
  """SIGTERM (a preemption) mid-stage: the checkpoint is written, the re-run resumes it and
  logs the same losses as the uninterrupted run."""
  stage, steps = "pretrain_joint", 40
  longer = [f"--config.{stage}.train.steps={steps}", f"--config.{stage}.train.sample_every=0"]
  reference = str(world["root"] / "runs" / "uninterrupted")
  _copy_parents(journey, reference, stage)
  out = subprocess.run(_main_args(stage, reference, world) + longer, cwd=ROOT, env=_env(8),
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  workdir = str(world["root"] / "runs" / "preempted")
  _copy_parents(journey, workdir, stage)
  _assert_resumes(stage, workdir, _main_args(stage, workdir, world) + longer, steps,
                  losses(os.path.join(reference, stage)))


@pytest.mark.parametrize("stage", ["rl", "distill"])
def test_paper_journey_rl_and_distill_stopped_mid_run_resume_to_the_same_losses(
    journey, world, stage):
  """RL (its rollouts are the trainer's data: a checkpoint waits for the iteration's
  updates and holds the prompt stream) and distillation resume a SIGTERM exactly: the
  same losses as the journey's uninterrupted stage."""
  workdir = str(world["root"] / "runs" / f"preempted_{stage}")
  _copy_parents(journey, workdir, stage)
  uninterrupted = losses(os.path.join(journey, stage))
  _assert_resumes(stage, workdir, _main_args(stage, workdir, world), max(uninterrupted),
                  uninterrupted)
