"""DiffusionNFT: the optimality mapping, the loss's direction, and a run that learns."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import shapes
from dreamlite_jax.diffusion import flow, sampling
from dreamlite_jax.rewards.shapes_programmatic import ShapesReward
from dreamlite_jax.training import mesh as mesh_lib
from dreamlite_jax.training import rl_grpo
from dreamlite_jax.training import rl_nft
from dreamlite_jax.training import state as state_lib
from dreamlite_jax.training import step as step_lib
from experiments import train_defaults


def _gaussian_predict(params, canvas, timestep, cond):
  """The exact flow-matching velocity of data N(m, 1) per element (m = params["m"] [C]):
  the ODE maps noise to samples of that Gaussian, so samples vary and rewards differ."""
  del cond
  s = jnp.maximum(timestep / flow.NUM_TRAIN_TIMESTEPS, 1e-3).reshape(-1, 1, 1, 1)
  a, m = 1.0 - s, params["m"]
  x0_mean = m + a * (canvas - a * m) / (a * a + s * s)
  return (canvas - x0_mean) / s


def _cond(b):
  return {"text": np.ones((b, 2, 3), np.float32), "text_mask": np.ones((b, 2), np.int32),
          "time_ids": np.full((b, 2), 32.0, np.float32)}


def test_optimality_maps_clipped_advantages_to_unit_interval():
  r = rl_nft.optimality(np.array([-5.0, -1.0, 0.0, 1.0, 5.0]), adv_clip=2.0)
  np.testing.assert_allclose(r, [0.0, 0.25, 0.5, 0.75, 1.0])
  with pytest.raises(ValueError, match="group_size"):
    rl_nft.NFTConfig(group_size=1)
  with pytest.raises(ValueError, match="beta"):
    rl_nft.NFTConfig(beta=0.0)


def _rows(params, x0, r, seed=0):
  velocity = rl_nft.make_velocity(_gaussian_predict)
  b = len(x0)
  return jax.tree.map(jnp.asarray, rl_nft.training_rows(
      velocity, params, params, x0, np.zeros_like(x0), _cond(b), np.asarray(r, np.float32), 2,
      2, np.random.default_rng(seed)))


def test_neutral_rows_leave_the_velocity_and_positives_pull_it():
  params = {"m": jnp.zeros((4,))}
  x0 = np.full((4, 2, 2, 4), 1.5, np.float32)
  loss_fn = rl_nft.make_nft_loss(_gaussian_predict, rl_nft.NFTConfig(beta=1.0))
  grad = lambda rows: jax.grad(lambda p: loss_fn(p, rows, None)[0])(params)["m"]
  # r = 1/2 at theta = theta_old: the positive and negative terms cancel exactly.
  np.testing.assert_allclose(np.asarray(grad(_rows(params, x0, [0.5] * 4))), 0.0, atol=1e-6)
  # Positive samples at +1.5 pull m up (descent direction -grad > 0); negatives push it down.
  assert float(jnp.min(-grad(_rows(params, x0, [1.0] * 4)))) > 0
  assert float(jnp.max(-grad(_rows(params, x0, [0.0] * 4)))) < 0
  _, metrics = loss_fn(params, _rows(params, x0, [1.0] * 4), None)
  np.testing.assert_allclose(float(metrics["drift_old"]), 0.0, atol=1e-10)


def test_a_groups_rows_share_noise_and_stay_in_one_minibatch():
  params = {"m": jnp.zeros((4,))}
  x0 = np.random.default_rng(0).normal(size=(8, 2, 2, 4)).astype(np.float32)
  rows = jax.tree.map(np.asarray, _rows(params, x0, [1.0, 0.0, 0.5, 0.5] * 2))  # groups of 2
  sigma = rows["sigma"]
  eps = (rows["x_t"] - (1 - sigma[:, None, None, None]) * rows["x0"]) / sigma[:, None, None, None]
  for g in range(8):  # 2 draws x 4 groups
    assert sigma[2 * g] == sigma[2 * g + 1]
    np.testing.assert_allclose(eps[2 * g], eps[2 * g + 1], atol=1e-4)
  assert len(set(sigma.tolist())) == 8
  seen = [np.asarray(batch["sigma"]) for batch in rl_grpo.minibatches(rows, 2, seed=3, block=2)]
  assert sorted(np.concatenate(seen).tolist()) == sorted(sigma.tolist())
  for batch in seen:
    np.testing.assert_array_equal(batch[0::2], batch[1::2])
  with pytest.raises(ValueError, match="blocks of 2"):
    rl_grpo.minibatches(rows, 16, seed=3, block=2)


_RED, _BLUE = np.array(shapes.COLORS["red"], np.float32), np.array(shapes.COLORS["blue"], np.float32)


def _decode(latents: np.ndarray) -> np.ndarray:
  """Toy decoder: one square whose colour moves from blue to red with the mean of the
  first latent channel."""
  w = 1.0 / (1.0 + np.exp(-3.0 * latents[..., 0].mean((1, 2))))
  images = np.zeros((len(latents), 64, 64, 3), np.uint8)
  for i, wi in enumerate(w):
    images[i, 20:44, 20:44] = np.round(wi * _RED + (1 - wi) * _BLUE).astype(np.uint8)
  return images


def test_nft_run_raises_the_programmatic_shapes_reward_of_the_ode_sampler():
  """Rollouts with the deterministic Euler sampler, the exact shapes reward, NFT updates
  through the shared train step: the mean of the ODE's samples moves to the rewarded side."""
  prompt = shapes.make_t2i_example("train", "colors", 0, 0)
  meta = dict(prompt["metadata"])
  meta["spec"] = {"include": [{"shape": "square", "count": 1, "color": "red"}], "exclude": []}
  config = rl_nft.NFTConfig(group_size=8, beta=1.0, adv_clip=2.0, noise_draws=2)
  train = train_defaults.train_config(lr=0.1, warmup_steps=0, schedule="constant",
                                      weight_decay=0.0, ema_decay=0.0)
  mesh = mesh_lib.make_mesh(train_defaults.mesh_config())
  tx = state_lib.make_optimizer(train)
  init = lambda rng: {"m": jnp.full((4,), -0.2)}
  _, shardings = state_lib.state_shardings(init, tx, mesh)
  state = state_lib.create_state(init, tx, mesh, 0)
  jitted_step = step_lib.make_train_step(rl_nft.make_nft_loss(_gaussian_predict, config), tx,
                                         mesh, shardings, ema_decay=0.0)
  step_fn = lambda state, batch, rng: jitted_step(state, batch, rng, np.float32(train.lr))
  velocity = rl_nft.make_velocity(_gaussian_predict)
  ref = jax.device_get(state.params)
  reward = ShapesReward()
  b, sigmas = 16, jnp.asarray(flow.sampling_sigmas(8, 0.0))
  cond = _cond(b)
  sample = jax.jit(lambda p, noise: sampling.euler_sample(
      lambda canvas, t, c: _gaussian_predict(p, canvas, t, c), noise, jnp.zeros_like(noise),
      sigmas, cond))
  key = jax.device_put(jax.random.PRNGKey(0), mesh_lib.replicated(mesh))
  means = []
  for it in range(12):
    params = jax.device_get(state.params)
    noise = jax.random.normal(jax.random.PRNGKey(100 + it), (b, 2, 2, 4))
    latents = np.asarray(sample(params, noise))
    rewards = reward(_decode(latents), [meta] * b)
    means.append(float(rewards.mean()))
    r = rl_nft.optimality(rl_grpo.group_advantages(rewards, config.group_size), config.adv_clip)
    rows = rl_nft.training_rows(velocity, params, ref, latents, np.zeros_like(latents), cond, r,
                                config.noise_draws, config.group_size, np.random.default_rng(it))
    for batch in rl_grpo.minibatches(rows, 2, it, block=config.group_size):
      state, metrics = step_fn(state, mesh_lib.shard_batch(batch, mesh), key)
      assert int(metrics["finite"]) == 1
  assert np.mean(means[-3:]) > np.mean(means[:3]) + 0.25, means
  assert float(np.asarray(jax.device_get(state.params)["m"])[0]) > 0.0
