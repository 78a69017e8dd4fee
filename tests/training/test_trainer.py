"""The training loop in-process: NaN skipping, sample grids, metrics, init_from, bad configs."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

import training_fixtures as fx
from dreamlite_jax.config import ConfigError
from dreamlite_jax.training import checkpoints as ckpt
from dreamlite_jax.training import metrics as metrics_lib
from dreamlite_jax.training import trainer


def _sample_fn(params, step):
  """A fake sampler: 4 images whose brightness depends on a parameter."""
  value = float(np.tanh(np.asarray(jax.device_get(params["bias"])).mean()))
  return np.full((4, 8, 8, 3), value, np.float32)


def _eval_fn(params, step):
  """A fake stage check: a number read from the (EMA) parameters."""
  return {"probe": float(np.asarray(jax.device_get(params["bias"])).mean()), "at": float(step)}


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
  """6 steps on 8 devices (data 4 x fsdp 2) with a NaN in batch 2."""
  workdir = str(tmp_path_factory.mktemp("nan_run"))
  config = fx.tiny_config(steps=6, sample_every=3)
  config.mesh.fsdp = 2
  init_params, loss_fn = fx.make_model_fns()
  result = trainer.train(config, workdir, loss_fn, fx.SyntheticStream(8, nan_at=(2,)), init_params,
                         sample_fn=_sample_fn, eval_fn=_eval_fn, eval_every=2)
  return workdir, result


def test_nan_batch_is_skipped_counted_and_training_continues(nan_run):
  workdir, result = nan_run
  losses = [h["loss"] for h in result.history]
  assert [h["step"] for h in result.history] == [1, 2, 3, 4, 5, 6]
  assert np.isnan(losses[2]) and all(np.isfinite(losses[i]) for i in (0, 1, 3, 4, 5))
  assert [int(h["skipped"]) for h in result.history] == [0, 0, 1, 1, 1, 1]
  assert int(result.state.skipped) == 1 and int(result.state.step) == 6
  assert losses[5] < losses[0]  # it still learns
  for leaf in jax.tree.leaves(ckpt.as_numpy(result.state.params)):
    assert np.all(np.isfinite(leaf))
  logged = metrics_lib.read_metrics(workdir)
  assert [m["skipped"] for m in logged if "loss" in m][-1] == 1.0


def test_workdir_layout_samples_tensorboard_checkpoints(nan_run):
  workdir, result = nan_run
  assert sorted(os.listdir(os.path.join(workdir, "samples"))) == ["step_00000003.png",
                                                                   "step_00000006.png"]
  grid = np.asarray(Image.open(os.path.join(workdir, "samples", "step_00000006.png")))
  assert grid.shape == (16, 16, 3)
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tensorboard")))
  steps = sorted(int(d) for d in os.listdir(ckpt.checkpoint_dir(workdir)) if d.isdigit())
  assert steps == [2, 4, 6]
  saved = json.loads(open(os.path.join(ckpt.checkpoint_dir(workdir), "6", "data",
                                       "process_0-of-1.json")).read())
  assert saved == {"kind": "json", "value": {"index": 6, "seed": 0}}
  # eval_fn's scores are logged with their step, every eval_every steps before the last.
  probes = [(m["step"], m["at"]) for m in metrics_lib.read_metrics(workdir) if "probe" in m]
  assert probes == [(2, 2.0), (4, 4.0)]
  params = ckpt.load_params(workdir)
  np.testing.assert_array_equal(params["mlp_in"], np.asarray(result.state.params["mlp_in"]))
  ema = ckpt.load_params(workdir, step=4, ema=True)
  assert not np.allclose(ema["mlp_in"], params["mlp_in"])


def test_rerun_of_finished_workdir_trains_nothing(nan_run):
  workdir, result = nan_run
  config = fx.tiny_config(steps=6)
  config.mesh.fsdp = 2
  init_params, loss_fn = fx.make_model_fns()
  again = trainer.train(config, workdir, loss_fn, fx.SyntheticStream(8), init_params)
  assert again.source.startswith("resumed") and again.start_step == again.final_step == 6
  jax.tree.map(np.testing.assert_array_equal, ckpt.as_numpy(again.state.params),
               ckpt.as_numpy(result.state.params))


def test_init_from_previous_stage_takes_params_and_ema_only(nan_run, tmp_path):
  parent, _ = nan_run
  config = fx.tiny_config(steps=1)
  config.mesh.fsdp = 2
  config.init_from.workdir = parent
  config.init_from.ema_as_params = True
  init_params, loss_fn = fx.make_model_fns()
  stream = fx.SyntheticStream(8)
  stream.set_state({"index": 3, "seed": 0})
  result = trainer.train(config, str(tmp_path / "child"), loss_fn, stream, init_params)
  assert result.source.startswith("initialised from") and result.start_step == 0
  assert stream.index == 4  # the child's stream is not the parent's
  assert int(result.state.step) == 1 and int(result.state.skipped) == 0
  parent_ema = ckpt.load_params(parent, ema=True)
  # One step of Adam at lr 1e-2 moves every weight by about 1e-2 from the parent's EMA.
  delta = np.abs(np.asarray(result.state.params["mlp_in"]) - parent_ema["mlp_in"])
  assert 1e-4 < delta.max() < 5e-2


@pytest.mark.parametrize("field, value, name", [
    ("schedule", "linear", "config.train.schedule"),
    ("accum_steps", 3, "config.train.accum_steps"),
    ("compute_dtype", "fp8", "config.train.compute_dtype"),
])
def test_bad_config_field_fails_at_start_with_its_name(tmp_path, field, value, name):
  config = fx.tiny_config()
  with config.ignore_type():
    config.train[field] = value
  init_params, loss_fn = fx.make_model_fns()
  with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
    trainer.train(config, str(tmp_path), loss_fn, fx.SyntheticStream(8), init_params)
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def test_missing_section_and_bad_mesh_are_named(tmp_path):
  init_params, loss_fn = fx.make_model_fns()
  config = fx.tiny_config()
  del config["init_from"]
  with pytest.raises(ConfigError, match=r"config\.init_from\.workdir is missing"):
    trainer.train(config, str(tmp_path), loss_fn, fx.SyntheticStream(8), init_params)
  config = fx.tiny_config()
  config.mesh.fsdp = 3
  with pytest.raises(ConfigError, match=r"config\.mesh"):
    trainer.train(config, str(tmp_path), loss_fn, fx.SyntheticStream(8), init_params)
  config = fx.tiny_config()
  config.init_from.workdir = str(tmp_path / "no_such_stage")
  with pytest.raises(ConfigError, match=r"config\.init_from\.workdir"):
    trainer.train(config, str(tmp_path / "w"), loss_fn, fx.SyntheticStream(8), init_params)


def test_string_batch_leaf_is_rejected_by_name(tmp_path):
  init_params, loss_fn = fx.make_model_fns()

  def stream():
    while True:
      batch = fx.make_batch(0, 8)
      batch["prompt"] = np.array(["a red circle"] * 8, dtype=object)
      yield batch

  config = fx.tiny_config()
  config.mesh.fsdp = 2  # the mesh of nan_run: its init compile is cached
  with pytest.raises(TypeError, match=r"batch\['prompt'\] has dtype object"):
    trainer.train(config, str(tmp_path), loss_fn, stream(), init_params)
