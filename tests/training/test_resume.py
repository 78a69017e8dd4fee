"""Preemption: SIGKILL then resume reproduces the uninterrupted run; SIGTERM saves first."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import training_fixtures as fx
from dreamlite_jax.training import checkpoints as ckpt
from dreamlite_jax.training import metrics as metrics_lib
from dreamlite_jax.training import trainer

SCRIPT = os.path.join(os.path.dirname(__file__), "run_tiny_train.py")
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
STEPS = 6


def run_child(*args: str, env_devices: int = 8, timeout: float = 240) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={env_devices}",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, SCRIPT, *args], env=env, capture_output=True, text=True,
                        timeout=timeout, cwd=ROOT)


def child_result(proc: subprocess.CompletedProcess) -> dict:
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert lines, f"child printed no RESULT (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
  return json.loads(lines[-1][len("RESULT "):])


def _train_in_process(workdir: str, steps: int = STEPS):
  config = fx.tiny_config(steps=steps)
  config.mesh.fsdp = 2
  init_params, loss_fn = fx.make_model_fns()
  return trainer.train(config, workdir, loss_fn, fx.SyntheticStream(8), init_params)


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory):
  """The uninterrupted run's loss at every step."""
  result = _train_in_process(str(tmp_path_factory.mktemp("reference")))
  return {h["step"]: h["loss"] for h in result.history}


def test_sigkill_then_resume_gives_the_uninterrupted_loss_sequence(tmp_path, reference_losses):
  workdir = str(tmp_path / "run")
  # Killed while fetching batch 5: steps 1-5 ran, checkpoints 2 (and maybe 4) exist.
  proc = run_child("--workdir", workdir, "--steps", str(STEPS), "--signal-at", "5:KILL")
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  before = {int(m["step"]): m["loss"] for m in metrics_lib.read_metrics(workdir) if "loss" in m}
  assert sorted(before) == [1, 2, 3, 4, 5]
  resumed = _train_in_process(workdir)
  assert resumed.source.startswith("resumed") and resumed.start_step in (2, 4)
  after = {h["step"]: h["loss"] for h in resumed.history}
  assert sorted(after) == list(range(resumed.start_step + 1, STEPS + 1))
  for step in range(1, STEPS + 1):
    got = after.get(step, before.get(step))
    np.testing.assert_allclose(got, reference_losses[step], rtol=1e-6, err_msg=f"step {step}")
  # Steps replayed after the resume point match what the killed run had computed.
  for step in set(before) & set(after):
    np.testing.assert_allclose(after[step], before[step], rtol=1e-6)


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path, reference_losses):
  workdir = str(tmp_path / "run")
  # SIGTERM arrives while fetching batch 2: step 3 completes, is saved, and the run stops.
  proc = run_child("--workdir", workdir, "--steps", str(STEPS), "--signal-at", "2:TERM")
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = child_result(proc)
  assert result["preempted"] and result["final_step"] == 3
  directory = ckpt.checkpoint_dir(workdir)
  assert sorted(int(d) for d in os.listdir(directory) if d.isdigit()) == [2, 3]
  data = json.loads(open(os.path.join(directory, "3", "data", "process_0-of-1.json")).read())
  assert data["value"]["index"] == 3
  resumed = _train_in_process(workdir)
  assert resumed.start_step == 3
  for h in resumed.history:
    np.testing.assert_allclose(h["loss"], reference_losses[h["step"]], rtol=1e-6)
