"""Flow-GRPO: SDE log-probs, group advantages, the clipped loss, and a run that learns."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from data_pipelines import shapes
from dreamlite_jax.diffusion import flow, sampling
from dreamlite_jax.diffusion.sampling import SamplerConfig
from dreamlite_jax.rewards.shapes_programmatic import ShapesReward
from dreamlite_jax.training import mesh as mesh_lib
from dreamlite_jax.training import rl_grpo
from dreamlite_jax.training import state as state_lib
from dreamlite_jax.training import step as step_lib
from experiments import train_defaults


def test_sde_log_prob_matches_direct_gaussian():
  rng = np.random.default_rng(0)
  x, v, y = (rng.normal(size=(2, 3, 4, 2)).astype(np.float32) for _ in range(3))
  s, s_next, s_max, a = 0.6, 0.45, 0.9, 0.7
  out = sampling.sde_step(jnp.asarray(x), jnp.asarray(v), jnp.float32(s), jnp.float32(s_next),
                          jnp.float32(s_max), a, prev_sample=jnp.asarray(y))
  # Flow-GRPO's step written out: std_t = a sqrt(s / (1 - s)), dt = s_next - s.
  std_t = a * np.sqrt(s / (1 - s))
  dt = s_next - s
  mean = x + (v + std_t**2 / (2 * s) * (x + (1 - s) * v)) * dt
  std = std_t * np.sqrt(-dt)
  direct = stats.norm.logpdf(y, mean, std).reshape(2, -1).mean(1)
  np.testing.assert_allclose(np.asarray(out.mean), mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out.log_prob), direct, rtol=1e-5, atol=1e-5)


def _toy_predict(params, canvas, timestep, cond):
  """Velocity of a flow whose clean sample is the constant `m` [C]: v = (x - m) / s."""
  del cond
  s = (timestep / flow.NUM_TRAIN_TIMESTEPS).reshape(-1, 1, 1, 1)
  return (canvas - params["m"]) / jnp.maximum(s, 1e-3)


def _cond(b):
  return {"text": jnp.ones((b, 2, 3)), "text_mask": jnp.ones((b, 2), jnp.int32),
          "time_ids": jnp.full((b, 2), 32.0)}


def test_rollout_log_probs_match_rescoring_and_reference_means():
  config = rl_grpo.GRPOConfig(group_size=2)
  sampler = SamplerConfig(steps=3, guidance=2.0)
  params = {"m": jnp.full((4,), 0.3)}
  ref = {"m": jnp.full((4,), -0.2)}
  b, sigmas = 4, jnp.asarray(rl_grpo.rollout_sigmas(sampler))
  noise = jax.random.normal(jax.random.PRNGKey(0), (b, 2, 2, 4))
  condition = jnp.zeros_like(noise)
  rollout = rl_grpo.make_rollout(_toy_predict, config, sampler)
  out = rollout(params, ref, noise, condition, sigmas, _cond(b), _cond(b), jax.random.PRNGKey(1))
  rows = rl_grpo.flatten_rollout(out, np.asarray(condition), np.asarray(sigmas),
                                 jax.tree.map(np.asarray, _cond(b)),
                                 jax.tree.map(np.asarray, _cond(b)), np.zeros(b, np.float32))
  again = rl_grpo.transition_step(_toy_predict, params, jax.tree.map(jnp.asarray, rows), config,
                                  sampler)
  np.testing.assert_allclose(np.asarray(again.log_prob), rows["old_log_prob"], atol=1e-5)
  with_ref = rl_grpo.transition_step(_toy_predict, ref, jax.tree.map(jnp.asarray, rows), config,
                                     sampler)
  np.testing.assert_allclose(np.asarray(with_ref.mean), rows["ref_mean"], atol=1e-5)
  assert not np.allclose(rows["ref_mean"], np.asarray(again.mean))


def test_group_advantages_normalise_each_group():
  r = np.array([0.0, 1.0, 0.5, 0.5, 2.0, 4.0, 6.0, 8.0], np.float32)
  adv = rl_grpo.group_advantages(r, 4)
  g = adv.reshape(2, 4)
  np.testing.assert_allclose(g.mean(1), 0.0, atol=1e-6)
  np.testing.assert_allclose(g.std(1), 1.0, atol=1e-3)
  np.testing.assert_allclose(rl_grpo.group_advantages(np.ones(4), 2), 0.0)
  assert adv[1] > adv[2] == adv[3] > adv[0]
  with pytest.raises(ValueError, match="G = 3"):
    rl_grpo.group_advantages(r, 3)


def test_clipped_ratio_stops_the_gradient():
  config = rl_grpo.GRPOConfig(group_size=2, clip_range=0.1, kl_beta=0.0)
  sampler = SamplerConfig(steps=2)  # no CFG
  params = {"m": jnp.full((4,), 0.3)}
  b, sigmas = 2, jnp.asarray(rl_grpo.rollout_sigmas(sampler))
  noise = jax.random.normal(jax.random.PRNGKey(0), (b, 2, 2, 4))
  out = rl_grpo.make_rollout(_toy_predict, config, sampler)(
      params, params, noise, jnp.zeros_like(noise), sigmas, _cond(b), None, jax.random.PRNGKey(2))
  rows = rl_grpo.flatten_rollout(out, np.zeros(noise.shape, np.float32), np.asarray(sigmas),
                                 jax.tree.map(np.asarray, _cond(b)), None,
                                 np.array([1.0, -1.0], np.float32))
  loss_fn = rl_grpo.make_grpo_loss(_toy_predict, config, sampler)
  batch = jax.tree.map(jnp.asarray, rows)
  grad = jax.grad(lambda p: loss_fn(p, batch, None)[0])(params)
  assert float(jnp.abs(grad["m"]).sum()) > 0  # on-policy: ratio 1, inside the clip
  far = dict(batch, old_log_prob=batch["old_log_prob"] - 1.0)  # ratio e > 1 + eps
  far = dict(far, advantage=jnp.ones_like(far["advantage"]))
  grad = jax.grad(lambda p: loss_fn(p, far, None)[0])(params)
  np.testing.assert_allclose(np.asarray(grad["m"]), 0.0)


# ---------------------------------------------------------------- a run that learns

_RED, _BLUE = np.array(shapes.COLORS["red"], np.float32), np.array(shapes.COLORS["blue"], np.float32)


def _decode(latents: np.ndarray) -> np.ndarray:
  """Toy decoder: one square whose colour moves from blue to red with one latent value."""
  w = 1.0 / (1.0 + np.exp(-3.0 * latents[:, 0, 0, 0]))
  images = np.zeros((len(latents), 64, 64, 3), np.uint8)
  for i, wi in enumerate(w):
    images[i, 20:44, 20:44] = np.round(wi * _RED + (1 - wi) * _BLUE).astype(np.uint8)
  return images


def test_grpo_run_raises_the_programmatic_shapes_reward():
  prompt = shapes.make_t2i_example("train", "colors", 0, 0)
  meta = dict(prompt["metadata"])
  meta["spec"] = {"include": [{"shape": "square", "count": 1, "color": "red"}], "exclude": []}
  config = rl_grpo.GRPOConfig(group_size=8, noise_level=1.0, kl_beta=0.0, clip_range=0.2)
  sampler = SamplerConfig(steps=4)  # no CFG
  train = train_defaults.train_config(lr=0.15, warmup_steps=0, schedule="constant",
                                      weight_decay=0.0, ema_decay=0.0)
  mesh = mesh_lib.make_mesh(train_defaults.mesh_config())
  tx = state_lib.make_optimizer(train)
  init = lambda rng: {"m": jnp.zeros((4,))}
  _, shardings = state_lib.state_shardings(init, tx, mesh)
  state = state_lib.create_state(init, tx, mesh, 0)
  jitted_step = step_lib.make_train_step(rl_grpo.make_grpo_loss(_toy_predict, config, sampler),
                                         tx, mesh, shardings, ema_decay=0.0)
  step_fn = lambda state, batch, rng: jitted_step(state, batch, rng, np.float32(train.lr))
  rollout = rl_grpo.make_rollout(_toy_predict, config, sampler)
  ref = jax.device_get(state.params)
  reward = ShapesReward()
  b, sigmas = 16, rl_grpo.rollout_sigmas(sampler)
  cond = jax.tree.map(np.asarray, _cond(b))
  rng = mesh_lib.replicated(mesh)
  key = jax.device_put(jax.random.PRNGKey(0), rng)
  means = []
  for it in range(10):
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(100 + it), (b, 2, 2, 4)))
    out = rollout(jax.device_get(state.params), ref, noise, np.zeros_like(noise), sigmas, cond,
                  None, jax.random.PRNGKey(200 + it))
    rewards = reward(_decode(np.asarray(out["latents"])), [meta] * b)
    means.append(float(rewards.mean()))
    rows = rl_grpo.flatten_rollout(out, np.zeros_like(noise), sigmas, cond, None,
                                   rl_grpo.group_advantages(rewards, config.group_size))
    for batch in rl_grpo.minibatches(rows, 2, it):
      state, metrics = step_fn(state, mesh_lib.shard_batch(batch, mesh), key)
      assert int(metrics["finite"]) == 1
  assert np.mean(means[-3:]) > np.mean(means[:3]) + 0.25, means
