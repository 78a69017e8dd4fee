"""In-context canvas packing and the pretraining loss's masking."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamlite_jax.diffusion import packing
from dreamlite_jax.training import pretrain_loss


def _latents(seed, shape=(4, 3, 5, 4)):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


def test_pack_unpack_roundtrip_and_mixed_conditions():
  target, source = _latents(0), _latents(1)
  is_edit = jnp.array([1, 0, 1, 0])
  cond = packing.condition_latents(source, is_edit, target)
  np.testing.assert_array_equal(cond[0], source[0])
  np.testing.assert_array_equal(cond[1], np.zeros_like(source[1]))
  canvas = packing.pack(target, cond)
  assert canvas.shape == (4, 3, 10, 4)
  np.testing.assert_array_equal(packing.unpack_target(canvas), target)
  np.testing.assert_array_equal(packing.unpack_condition(canvas), cond)
  np.testing.assert_array_equal(packing.condition_latents(None, None, target), np.zeros(target.shape))
  mask = packing.target_mask(canvas.shape)
  np.testing.assert_array_equal(jnp.broadcast_to(mask, canvas.shape)[:, :, :5], 1)
  np.testing.assert_array_equal(jnp.broadcast_to(mask, canvas.shape)[:, :, 5:], 0)


def test_packing_errors_name_the_problem():
  target = _latents(0)
  with pytest.raises(ValueError, match="is_edit"):
    packing.condition_latents(target, None, target)
  with pytest.raises(ValueError, match="do not match"):
    packing.condition_latents(_latents(1, (4, 3, 4, 4)), jnp.ones(4), target)
  with pytest.raises(ValueError, match="odd"):
    packing.unpack_target(_latents(2, (1, 2, 3, 4)))
  with pytest.raises(ValueError, match="NHWC"):
    packing.pack(target[0], target[0])


def _batch(b=4, h=3, w=5, length=6, dim=8):
  keys = jax.random.split(jax.random.PRNGKey(7), 4)
  return {
      "latents": jax.random.normal(keys[0], (b, h, w, 4)),
      "source_latents": jax.random.normal(keys[1], (b, h, w, 4)),
      "is_edit": jnp.array([1, 0, 1, 0]),
      "text": jax.random.normal(keys[2], (b, length, dim)),
      "text_mask": jnp.ones((b, length)),
      "null_text": jnp.zeros((1, length, dim)),
      "null_text_mask": jnp.zeros((1, length)).at[:, 0].set(1),
  }


def test_loss_gradient_is_zero_on_condition_half_and_condition_is_clean():
  batch = _batch()
  params = {"pred": _latents(3, (4, 3, 10, 4))}

  @jax.jit
  def run(params, batch):
    seen = {}

    def predict(params, canvas, timestep, cond):
      seen["canvas"], seen["timestep"], seen["cond"] = canvas, timestep, cond
      return params["pred"]

    loss_fn = lambda p: pretrain_loss.flow_matching_loss(predict, p, batch, jax.random.PRNGKey(0))
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    loss_fn(params)  # a plain forward, to read its inputs to the network
    return loss, metrics, grads, seen

  loss, metrics, grads, seen = run(params, batch)
  g = grads["pred"]
  assert np.all(np.asarray(g[:, :, 5:]) == 0.0)  # exactly zero, not just small
  assert np.all(np.abs(np.asarray(g[:, :, :5])) > 0)
  canvas = seen["canvas"]
  expected_cond = np.where(np.asarray(batch["is_edit"])[:, None, None, None] == 1,
                           batch["source_latents"], 0.0)
  np.testing.assert_array_equal(packing.unpack_condition(canvas), expected_cond)
  # The loss is the plain MSE against noise - x0 on the left half.
  sigma = seen["timestep"] / 1000.0
  x_t = packing.unpack_target(canvas)
  s = np.asarray(sigma)[:, None, None, None]
  x0 = np.asarray(batch["latents"])
  noise = (np.asarray(x_t) - (1 - s) * x0) / s
  mse = np.mean((np.asarray(params["pred"][:, :, :5]) - (noise - x0))**2, axis=(1, 2, 3))
  np.testing.assert_allclose(loss, mse.mean(), rtol=1e-4)
  np.testing.assert_allclose(metrics["loss_edit"], mse[[0, 2]].mean(), rtol=1e-4)
  np.testing.assert_allclose(metrics["loss_t2i"], mse[[1, 3]].mean(), rtol=1e-4)
  np.testing.assert_allclose(seen["cond"]["time_ids"], np.tile([[40.0, 24.0]], (4, 1)))


def test_condition_dropout():
  batch = _batch(b=4)
  seen = {}

  def predict(params, canvas, timestep, cond):
    seen["canvas"], seen["cond"] = canvas, cond
    return jnp.zeros_like(canvas)

  cfg = pretrain_loss.PretrainLossConfig(text_dropout=1.0, image_dropout=1.0)
  pretrain_loss.flow_matching_loss(predict, {}, batch, jax.random.PRNGKey(0), cfg)
  np.testing.assert_array_equal(packing.unpack_condition(seen["canvas"]), 0.0)
  np.testing.assert_array_equal(seen["cond"]["text"], 0.0)
  np.testing.assert_array_equal(seen["cond"]["text_mask"][:, 0], 1.0)
  np.testing.assert_array_equal(seen["cond"]["text_mask"][:, 1:], 0.0)
  del batch["null_text"]
  with pytest.raises(KeyError, match="null_text"):
    pretrain_loss.flow_matching_loss(predict, {}, batch, jax.random.PRNGKey(0), cfg)
  with pytest.raises(ValueError, match="timestep_sampling"):
    pretrain_loss.PretrainLossConfig(timestep_sampling="cosine")


def test_edit_rows_draw_noise_levels_from_their_own_logit_normal():
  """`edit_logit_mean` moves only the edit rows' noise levels (same draws otherwise)."""
  b = 512
  batch = _batch(b=4)
  batch = {k: jnp.repeat(v, b // 4, axis=0) for k, v in batch.items()}
  edit = np.asarray(batch["is_edit"]) == 1
  seen = {}

  def predict(params, canvas, timestep, cond):
    seen["sigma"] = timestep / 1000.0
    return jnp.zeros_like(canvas)

  def sigmas(**kw):
    cfg = pretrain_loss.PretrainLossConfig(timestep_sampling="logit_normal", **kw)
    pretrain_loss.flow_matching_loss(predict, {}, batch, jax.random.PRNGKey(0), cfg)
    return np.asarray(seen["sigma"])

  base, shifted = sigmas(), sigmas(edit_logit_mean=1.5)
  np.testing.assert_array_equal(shifted[~edit], base[~edit])
  logit = lambda s: np.log(s / (1 - s))
  np.testing.assert_allclose(logit(shifted[edit]) - logit(base[edit]), 1.5, atol=1e-3)
  assert shifted[edit].mean() > 0.75 > base[edit].mean()
  with pytest.raises(ValueError, match="edit_logit_mean.*logit_normal"):
    pretrain_loss.PretrainLossConfig(timestep_sampling="uniform", edit_logit_mean=1.0)


def test_loss_trains_a_tiny_linear_model():
  """A per-pixel linear model learns the T2I-optimal velocity for a fixed x0."""
  import optax
  batch = _batch()
  batch = {k: v for k, v in batch.items() if k not in ("source_latents", "is_edit")}
  batch["latents"] = jnp.ones_like(batch["latents"])  # data = a single point

  def predict(params, canvas, timestep, cond):
    s = (timestep / 1000.0)[:, None, None, None]
    return params["a"] * canvas + params["b"] * s + params["c"]

  loss_fn = pretrain_loss.make_pretrain_loss(predict)
  params = {"a": jnp.zeros(()), "b": jnp.zeros(()), "c": jnp.zeros(())}
  opt = optax.adam(0.05)
  state = opt.init(params)

  @jax.jit
  def step(params, state, rng):
    (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
    updates, state = opt.update(g, state)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for i in range(300):
    params, state, loss = step(params, state, jax.random.PRNGKey(i))
    losses.append(float(loss))
  # With x0 = 1: v = e - 1 = (x_t - 1) / s, not linear; but the loss must drop a lot.
  assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:5])
