"""The sharded train step equals the single-device step; accumulation and the NaN guard."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

import training_fixtures as fx
from dreamlite_jax.training import checkpoints as ckpt
from dreamlite_jax.training import mesh as mesh_lib
from dreamlite_jax.training import state as state_lib
from dreamlite_jax.training import step as step_lib
from experiments import train_defaults


@functools.cache
def _initial_state():
  """One fresh state as numpy, placed onto each test's mesh (saves an init compile per mesh)."""
  init_params, _ = fx.make_model_fns()
  mesh = mesh_lib.make_mesh(train_defaults.mesh_config(data=1), jax.devices()[:1])
  tx = state_lib.make_optimizer(fx.tiny_config().train)
  return ckpt.as_numpy(state_lib.create_state(init_params, tx, mesh, seed=0))


def _run(mesh_config, devices, accum_steps=1, batches=(0, 1), nan_at=(), compute_dtype=jnp.float32):
  """Trains on `batches` from the same initial state; returns (losses, metrics, numpy state)."""
  config = fx.tiny_config(accum_steps=accum_steps)
  mesh = mesh_lib.make_mesh(mesh_config, devices)
  init_params, loss_fn = fx.make_model_fns()
  tx = state_lib.make_optimizer(config.train)
  _, shardings = state_lib.state_shardings(init_params, tx, mesh)
  state = jax.device_put(_initial_state(), shardings)
  train_step = step_lib.make_train_step(loss_fn, tx, mesh, shardings, accum_steps=accum_steps,
                                        ema_decay=config.train.ema_decay,
                                        compute_dtype=compute_dtype)
  rng = jax.device_put(np.asarray(state.rng), mesh_lib.replicated(mesh))
  losses, history = [], []
  for index in batches:
    batch = fx.make_batch(index, config.train.batch_size)
    if index in nan_at:
      batch["latents"][3, 1, 2, 0] = np.inf
    lr = step_lib.learning_rate(state_lib.make_schedule(config.train), int(state.step))
    state, metrics = train_step(state, mesh_lib.shard_batch(batch, mesh), rng, lr)
    metrics = jax.device_get(metrics)
    losses.append(float(metrics["loss"]))
    history.append(metrics)
  return losses, history, ckpt.as_numpy(state)


def test_fsdp_and_data_parallel_step_equals_single_device():
  devices = jax.devices()
  assert len(devices) == 8
  one_losses, _, one = _run(train_defaults.mesh_config(data=1), devices[:1])
  fsdp_losses, _, fsdp = _run(train_defaults.mesh_config(data=2, fsdp=4), devices)
  np.testing.assert_allclose(fsdp_losses, one_losses, rtol=1e-5)
  assert one_losses[1] != one_losses[0]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
               fsdp.params, one.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
               fsdp.ema_params, one.ema_params)
  # The step moved the params (a no-op step would also "match").
  assert np.abs(one.params["mlp_in"] - _initial_state().params["mlp_in"]).max() > 1e-3


def test_gradient_accumulation_sharded_equals_single_device():
  one_losses, _, one = _run(train_defaults.mesh_config(data=1), jax.devices()[:1], accum_steps=2)
  acc_losses, _, acc = _run(train_defaults.mesh_config(data=2, fsdp=2), jax.devices()[:4],
                            accum_steps=2)
  np.testing.assert_allclose(acc_losses, one_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
               acc.params, one.params)
  plain_losses, _, _ = _run(train_defaults.mesh_config(data=1), jax.devices()[:1])
  assert one_losses[0] != plain_losses[0]  # microbatches draw their own noise: a real split


def test_non_finite_batch_skips_update_and_counts():
  mesh_config = train_defaults.mesh_config(data=2, fsdp=4)
  _, history, state = _run(mesh_config, jax.devices(), batches=(0, 1, 2), nan_at=(1,))
  assert [int(m["finite"]) for m in history] == [1, 0, 1]
  assert [int(m["skipped"]) for m in history] == [0, 1, 1]
  assert not np.isfinite(history[1]["loss"]) and np.isfinite(history[2]["loss"])
  assert int(state.step) == 3 and int(state.skipped) == 1
  for leaf in jax.tree.leaves(state.params) + jax.tree.leaves(state.opt_state):
    assert np.all(np.isfinite(leaf))
  # The skipped step changed nothing but the counters.
  _, _, after_first = _run(mesh_config, jax.devices(), batches=(0,))
  _, _, skipped = _run(mesh_config, jax.devices(), batches=(0, 1), nan_at=(1,))
  for name in ("params", "opt_state", "ema_params"):
    jax.tree.map(np.testing.assert_array_equal, getattr(skipped, name), getattr(after_first, name))
  assert int(skipped.step) == 2 and int(skipped.skipped) == 1


def test_bfloat16_compute_keeps_float32_master_params():
  mesh_config = train_defaults.mesh_config(data=1)
  f32_losses, _, f32 = _run(mesh_config, jax.devices()[:1])
  bf16_losses, _, bf16 = _run(mesh_config, jax.devices()[:1], compute_dtype=jnp.bfloat16)
  assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(bf16.params))
  assert bf16_losses != f32_losses  # the forward saw the bfloat16 copy of the weights
  np.testing.assert_allclose(bf16_losses, f32_losses, rtol=0.05)
  # Updates smaller than bf16 resolution still accumulate in the fp32 master copy.
  delta = np.abs(bf16.params["mlp_in"] - _initial_state().params["mlp_in"])
  assert delta.max() > 1e-3


def test_state_from_params_equals_a_fresh_state_around_the_same_params():
  """What a stage initialised from its parent starts with, without running the initialisers."""
  init_params, _ = fx.make_model_fns()
  mesh = mesh_lib.make_mesh(train_defaults.mesh_config(data=1), jax.devices()[:1])
  tx = state_lib.make_optimizer(fx.tiny_config().train)
  _, shardings = state_lib.state_shardings(init_params, tx, mesh)
  fresh = _initial_state()
  params = jax.tree.map(lambda x: x + 1.0, fresh.params)
  ema = jax.tree.map(lambda x: x - 1.0, fresh.params)
  built = ckpt.as_numpy(state_lib.state_from_params(params, ema, tx, shardings, seed=0))
  assert int(built.step) == 0 and int(built.skipped) == 0
  np.testing.assert_array_equal(built.rng, fresh.rng)
  jax.tree.map(np.testing.assert_array_equal, built.params, params)
  jax.tree.map(np.testing.assert_array_equal, built.ema_params, ema)
  jax.tree.map(np.testing.assert_array_equal, built.opt_state, fresh.opt_state)
