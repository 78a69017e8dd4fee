"""ReFL: the thresholded reward term and its gradient through the one-step x0 prediction."""
import jax
import jax.numpy as jnp
import numpy as np

from dreamlite_jax.training import rl_refl


def test_refl_loss_is_zero_above_threshold_per_task():
  config = rl_refl.ReFLConfig(t2i_threshold=0.5, edit_threshold=0.8)
  r = jnp.array([0.9, 0.6, 0.9, 0.6, 0.2])
  is_edit = jnp.array([0, 0, 1, 1, 0])
  np.testing.assert_allclose(np.asarray(rl_refl.refl_reward_loss(r, is_edit, config)),
                             [0.0, 0.0, 0.0, 0.2, 0.3], atol=1e-6)


def _predict(params, canvas, timestep, cond):
  del timestep, cond
  return canvas * params["a"] + params["b"]


def _batch(b=4):
  rng = np.random.default_rng(0)
  return {"latents": jnp.asarray(rng.normal(size=(b, 2, 2, 4)), jnp.float32),
          "text": jnp.ones((b, 3, 5)), "text_mask": jnp.ones((b, 3), jnp.int32),
          "source_latents": jnp.asarray(rng.normal(size=(b, 2, 2, 4)), jnp.float32),
          "is_edit": jnp.array([0.0, 1.0, 0.0, 1.0]),
          "reward_ids": jnp.zeros((b, 2), jnp.int32), "reward_mask": jnp.ones((b, 2))}


def _decode(latents):
  return jnp.tanh(jax.image.resize(latents[..., :3], (latents.shape[0], 16, 16, 3), "nearest"))


def _reward(images, ids, mask):  # differentiable: brighter is better
  del ids, mask
  return jax.nn.sigmoid(jnp.mean(images, axis=(1, 2, 3)) * 4.0)


def test_refl_gradient_flows_below_threshold_and_vanishes_above():
  params = {"a": jnp.float32(0.5), "b": jnp.zeros((4,))}
  below = rl_refl.make_refl_loss(_predict, _decode, _reward,
                                 rl_refl.ReFLConfig(1.0, 1.0, pretrain_weight=0.0, num_steps=4))
  above = rl_refl.make_refl_loss(_predict, _decode, _reward,
                                 rl_refl.ReFLConfig(0.0, 0.0, pretrain_weight=0.0, num_steps=4))
  key = jax.random.PRNGKey(0)
  (loss, metrics), grads = jax.value_and_grad(below, has_aux=True)(params, _batch(), key)
  assert float(loss) > 0 and 0 < float(metrics["reward"]) < 1
  # Raising the velocity bias lowers x0 = x - s v, darkens the image, lowers the reward.
  assert float(grads["b"][:3].sum()) > 0
  (loss, _), grads = jax.value_and_grad(above, has_aux=True)(params, _batch(), key)
  assert float(loss) == 0.0
  np.testing.assert_allclose(np.asarray(grads["b"]), 0.0)
  np.testing.assert_allclose(float(grads["a"]), 0.0)


def test_pretraining_regulariser_is_mixed_in():
  params = {"a": jnp.float32(0.5), "b": jnp.zeros((4,))}
  config = rl_refl.ReFLConfig(0.0, 0.0, pretrain_weight=2.0, num_steps=4)
  loss, metrics = rl_refl.make_refl_loss(_predict, _decode, _reward, config)(
      params, _batch(), jax.random.PRNGKey(0))
  np.testing.assert_allclose(float(loss), 2.0 * float(metrics["pretrain_loss"]), rtol=1e-6)
  assert float(metrics["pretrain_loss"]) > 0


def test_refl_with_the_learned_shapes_reward_raises_it():
  """ReFL's reward gradient, through the shipped learned reward, moves x0 towards the caption."""
  from dreamlite_jax.rewards.registry import make_reward
  from dreamlite_jax.job import rl_stage
  from dreamlite_jax.training import rl_shapes
  reward = make_reward("learned_shapes")
  items = rl_shapes.draw_prompts(0, 2, 0.5, 64, rl_stage.PROMPT_SEED)
  ids, mask = reward.tokenize([it["reward_text"] for it in items])
  rng = np.random.default_rng(1)
  batch = {"latents": jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32),
           "text": jnp.ones((2, 3, 5)), "text_mask": jnp.ones((2, 3), jnp.int32),
           "reward_ids": jnp.asarray(ids), "reward_mask": jnp.asarray(mask)}

  def predict(params, canvas, timestep, cond):  # clean sample = params["m"]: v = (x - m) / s
    del cond
    s = (timestep / 1000.0).reshape(-1, 1, 1, 1)
    return (canvas - jnp.concatenate([params["m"], params["m"]], 2)) / jnp.maximum(s, 1e-3)

  def decode(latents):  # an 8x8 latent upsampled to a 64x64 image
    return jnp.tanh(2.0 * jax.image.resize(latents[..., :3], (latents.shape[0], 64, 64, 3),
                                           "linear"))

  config = rl_refl.ReFLConfig(1.0, 1.0, pretrain_weight=0.0, num_steps=4)
  loss_fn = jax.jit(rl_refl.make_refl_loss(predict, decode, reward.differentiable, config))
  grad_fn = jax.jit(jax.grad(lambda p, k: loss_fn(p, batch, k)[0]))
  params = {"m": jnp.asarray(rng.normal(size=(2, 8, 8, 4)) * 0.3, jnp.float32)}
  key = jax.random.PRNGKey(0)
  first = float(loss_fn(params, batch, key)[1]["reward"])
  for _ in range(15):
    g = grad_fn(params, key)
    assert np.isfinite(np.asarray(g["m"])).all()
    params = {"m": params["m"] - 2.0 * g["m"] / (jnp.abs(g["m"]).max() + 1e-12) * 0.1}
  last = float(loss_fn(params, batch, key)[1]["reward"])
  # From a noise image the agreement (a product of claim terms) starts near zero; the
  # ascent must multiply it many times over.
  assert np.log(last) > np.log(first) + 1.0, (first, last)
