"""Two real JAX processes (gloo collectives on localhost) train the same model together."""
import os
import socket
import subprocess
import sys

import jax
import numpy as np

import training_fixtures as fx
from dreamlite_jax.training import trainer

from test_resume import ROOT, SCRIPT, child_result


class _TwoHostStream(fx.SyntheticStream):
  """What the two processes feed, concatenated: process 0's rows, then process 1's."""

  def __next__(self):
    parts = [fx.make_batch(self.index, self.batch_size // 2, process=p) for p in (0, 1)]
    self.index += 1
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_agree_on_the_loss_and_match_one_process(tmp_path):
  port, steps = _free_port(), 3
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  procs = [subprocess.Popen(
      [sys.executable, SCRIPT, "--workdir", str(tmp_path / "run"), "--steps", str(steps),
       "--fsdp", "2", "--process-id", str(i), "--num-processes", "2", "--port", str(port)],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
      for i in range(2)]
  outputs = []
  for proc in procs:
    try:
      out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
    outputs.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
  for out in outputs:
    assert out.returncode == 0, out.stderr[-3000:]
  results = [child_result(out) for out in outputs]
  assert [r["process"] for r in results] == [0, 1]
  assert results[0]["losses"] == results[1]["losses"]
  losses = [results[0]["losses"][str(s)] for s in range(1, steps + 1)]
  assert all(np.isfinite(losses))
  # Each host wrote its own data iterator state into the shared checkpoint.
  data_dir = tmp_path / "run" / "checkpoints" / str(steps) / "data"
  assert sorted(os.listdir(data_dir))[-2:] == ["process_0-of-2.json", "process_1-of-2.json"]

  # One process on 4 devices with the concatenated batches computes the same losses.
  config = fx.tiny_config(steps=steps)
  config.mesh.fsdp = 2
  init_params, loss_fn = fx.make_model_fns()
  single = trainer.train(config, str(tmp_path / "single"), loss_fn, _TwoHostStream(8),
                         init_params, devices=jax.devices()[:4])
  np.testing.assert_allclose([h["loss"] for h in single.history], losses, rtol=1e-5)
