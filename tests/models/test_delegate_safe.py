"""The U-Net and VAE lower to graphs the TFLite GPU delegate can run: rank <= 4, no gather."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpr_walk import jaxpr_eqns
from dreamlite_jax.models import layers, weights
from dreamlite_jax.models.unet import DreamLiteUNet, UNetConfig
from dreamlite_jax.models.vae import TinyAutoencoder, VAEConfig

FORBIDDEN = {"gather", "scatter", "scatter-add", "while", "cond", "dynamic_slice"}


def _check(fn, *args):
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  bad_rank, bad_ops = [], []
  for eqn in jaxpr_eqns(jaxpr):
    for var in eqn.outvars:
      if hasattr(var.aval, "shape") and len(var.aval.shape) > 4:
        bad_rank.append((eqn.primitive.name, var.aval.shape))
    if eqn.primitive.name in FORBIDDEN:
      bad_ops.append(eqn.primitive.name)
  return bad_rank, bad_ops


def test_unet_lowers_to_rank4_without_gather():
  config = UNetConfig.tiny()
  model = DreamLiteUNet(config)
  inputs = weights.unet_example_inputs(config, batch=1, latent_hw=(8, 8))
  params = model.init(jax.random.key(0), *inputs)["params"]
  bad_rank, bad_ops = _check(lambda p, *a: model.apply({"params": p}, *a), params, *inputs)
  assert not bad_rank, bad_rank
  assert not bad_ops, bad_ops


def test_vae_lowers_to_rank4_without_gather():
  config = VAEConfig.tiny()
  model = TinyAutoencoder(config)
  images = jnp.zeros((1, 32, 32, 3))
  params = model.init(jax.random.key(0), images)["params"]
  for method, x in (("encode", images), ("decode", jnp.zeros((1, 4, 4, 4)))):
    bad_rank, bad_ops = _check(lambda p, x: model.apply({"params": p}, x, method=method), params, x)
    assert not bad_rank and not bad_ops, (method, bad_rank, bad_ops)


def test_checker_catches_flax_groupnorm_and_resize():
  """The check above is not vacuous: the stock ops it replaces do fail it."""
  import flax.linen as nn
  x = jnp.ones((1, 4, 4, 8))
  gn = nn.GroupNorm(num_groups=2)
  p = gn.init(jax.random.key(0), x)
  bad_rank, _ = _check(lambda p, x: gn.apply(p, x), p, x)
  assert bad_rank
  _, bad_ops = _check(lambda x: jax.image.resize(x, (1, 8, 8, 8), "nearest"), x)
  assert "gather" in bad_ops


def test_upsample_and_erf_match_references():
  from scipy import special
  x = jnp.arange(2 * 3 * 4 * 5, dtype=jnp.float32).reshape(2, 3, 4, 5)
  ref = np.repeat(np.repeat(np.asarray(x), 2, axis=1), 2, axis=2)
  np.testing.assert_array_equal(layers.upsample_nearest_2x(x), ref)
  t = np.linspace(-6, 6, 2001).astype(np.float32)
  assert np.abs(np.asarray(layers.erf(jnp.asarray(t))) - special.erf(t)).max() < 5e-7
  grad = jax.grad(lambda v: layers.gelu(v).sum())(jnp.asarray(t))
  assert np.all(np.isfinite(np.asarray(grad)))


def test_groupnorm_matches_flax():
  import flax.linen as nn
  x = jax.random.normal(jax.random.key(1), (2, 5, 6, 16)) * 3 + 1
  ours = layers.GroupNorm(4, 1e-5)
  p = ours.init(jax.random.key(0), x)
  ref = nn.GroupNorm(num_groups=4, epsilon=1e-5)
  rp = ref.init(jax.random.key(0), x)
  np.testing.assert_allclose(ours.apply(p, x), ref.apply(rp, x), atol=1e-5)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_grouped_attention_matches_dense_reference(kv_heads):
  heads, d = 4, 8
  attn = layers.Attention(heads, d, kv_heads, qk_norm=False)
  x = jax.random.normal(jax.random.key(0), (2, 6, 16))
  ctx = jax.random.normal(jax.random.key(1), (2, 5, 12))
  mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], jnp.float32)
  p = nn.unbox(attn.init(jax.random.key(2), x, ctx)["params"])
  out = attn.apply({"params": p}, x, ctx, layers.attention_bias_from_mask(mask))
  q = (x @ p["to_q"]["kernel"]).reshape(2, 6, heads, d)
  k = (ctx @ p["to_k"]["kernel"]).reshape(2, 5, kv_heads, d)
  v = (ctx @ p["to_v"]["kernel"]).reshape(2, 5, kv_heads, d)
  k = jnp.repeat(k, heads // kv_heads, axis=2)
  v = jnp.repeat(v, heads // kv_heads, axis=2)
  s = jnp.einsum("bnhd,bmhd->bhnm", q, k) / np.sqrt(d) + (1 - mask)[:, None, None, :] * -10000.0
  o = jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(s, -1), v).reshape(2, 6, heads * d)
  ref = o @ p["to_out"]["kernel"] + p["to_out"]["bias"]
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_depthwise_conv_lowerings_agree_and_export_keeps_one_conv_op():
  """XLA:CPU trains depthwise convs as shifted sums; the exporter traces one conv op.

  Both must compute the same thing (values and gradients), and under
  `export_lowering` the jaxpr must hold the grouped convolution (TFLite's
  DEPTHWISE_CONV_2D) and no pad/slice chain.
  """
  conv = layers.Conv(12, 3, use_bias=False, depthwise=True)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 7, 12)), jnp.float32)
  params = conv.init(jax.random.key(0), x)
  loss = lambda p, x: jnp.sum(jnp.sin(conv.apply(p, x)))

  def prims(fn, *args):
    return {e.primitive.name for e in jaxpr_eqns(jax.make_jaxpr(fn)(*args).jaxpr)}

  assert jax.default_backend() == "cpu"
  assert "conv_general_dilated" not in prims(conv.apply, params, x)
  with layers.export_lowering():
    assert "conv_general_dilated" in prims(conv.apply, params, x)
    exported = conv.apply(params, x)
    exported_grads = jax.grad(loss, argnums=(0, 1))(params, x)
  trained = conv.apply(params, x)
  trained_grads = jax.grad(loss, argnums=(0, 1))(params, x)
  np.testing.assert_allclose(trained, exported, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(trained_grads), jax.tree.leaves(exported_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
