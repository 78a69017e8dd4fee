"""Samplers against an exact velocity field (2-D Gaussian mixture) and direct densities."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dreamlite_jax.config import ConfigError
from dreamlite_jax.diffusion import flow
from dreamlite_jax.diffusion import packing
from dreamlite_jax.diffusion import sampling
from dreamlite_jax.diffusion.sampling import SamplerConfig

WEIGHTS = np.array([0.3, 0.7])
MEANS = np.array([[-2.0, 0.5], [1.5, -1.0]])
COVS = np.array([[[0.3, 0.1], [0.1, 0.2]], [[0.5, -0.2], [-0.2, 0.4]]])


def _mixture_moments():
  mean = (WEIGHTS[:, None] * MEANS).sum(0)
  second = sum(w * (c + np.outer(m, m)) for w, m, c in zip(WEIGHTS, MEANS, COVS))
  return mean, second - np.outer(mean, mean)


def _exact_velocity(x, t):
  """E[e - x0 | x_t = x] for x_t = (1-t) x0 + t e, x0 ~ mixture. x [B, 2], t scalar."""
  logits, v_parts = [], []
  for w, m, c in zip(WEIGHTS, MEANS, COVS):
    cov_t = (1 - t)**2 * jnp.asarray(c) + t**2 * jnp.eye(2)
    prec = jnp.linalg.inv(cov_t)
    r = x - (1 - t) * jnp.asarray(m)
    rp = r @ prec
    logits.append(jnp.log(w) - 0.5 * jnp.sum(rp * r, -1) - 0.5 * jnp.linalg.slogdet(cov_t)[1])
    e_mean = t * rp
    x0_mean = jnp.asarray(m) + (1 - t) * rp @ jnp.asarray(c)
    v_parts.append(e_mean - x0_mean)
  post = jax.nn.softmax(jnp.stack(logits, -1), -1)
  return jnp.einsum("bk,kbd->bd", post, jnp.stack(v_parts))


def mixture_velocity_fn(canvas, timestep, cond):
  """The exact field on a [B, 1, 2, 2] canvas (one 2-D point per example)."""
  del cond
  t = timestep[0] / 1000.0
  v = _exact_velocity(canvas[:, 0, 0, :], t)
  return jnp.concatenate([v[:, None, None, :], jnp.zeros_like(canvas[:, :, 1:])], axis=2)


def _noise(n, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (n, 1, 1, 2))


def _cond(n):
  return {"dummy": jnp.zeros((n, 1))}


def test_euler_reproduces_mixture_moments():
  n = 8000
  sigmas = flow.sampling_sigmas(200, mu=0.5)  # Euler is first order: many small steps
  run = jax.jit(lambda z: sampling.euler_sample(mixture_velocity_fn, z, jnp.zeros_like(z),
                                                sigmas, _cond(n)))
  x = np.asarray(run(_noise(n)))[:, 0, 0]
  mean, cov = _mixture_moments()
  np.testing.assert_allclose(x.mean(0), mean, atol=0.05)
  np.testing.assert_allclose(np.cov(x.T), cov, rtol=0.04, atol=0.02)
  # Both modes are populated in the right proportion.
  assert abs((x[:, 0] < 0).mean() - WEIGHTS[0]) < 0.03


def test_a_padded_schedule_runs_only_its_real_steps():
  calls = []

  def counting_fn(canvas, timestep, cond):
    jax.debug.callback(lambda t: calls.append(float(t[0])), timestep)
    return mixture_velocity_fn(canvas, timestep, cond)

  z = _noise(16, 3)
  run = jax.jit(lambda z, sigmas: sampling.euler_sample(counting_fn, z, jnp.zeros_like(z), sigmas,
                                                        _cond(16)))
  for steps, end in ((3, 0.0), (7, 0.0), (4, 0.25), (5, None)):
    sigmas = flow.sampling_sigmas(steps, mu=0.5)
    if end is None:  # an increasing schedule (inversion) runs too
      sigmas = sigmas[::-1].copy()
    else:  # a schedule may stop above 0
      sigmas[-1] = end
    padded = sampling.pad_schedule(sigmas)
    assert padded.shape == (32,) and np.all(padded[steps:] == sigmas[-1])
    calls.clear()
    np.testing.assert_array_equal(run(z, padded), run(z, sigmas))
    assert calls == pytest.approx(2 * list(sigmas[:-1] * 1000))  # no U-Net call for the padding
  assert run._cache_size() == 1 + 4  # every padded schedule shares one compilation
  assert sampling.pad_schedule(flow.sampling_sigmas(40, 0.5)).shape == (64,)


def test_sde_reproduces_mixture_moments():
  n = 8000
  sigmas = flow.sampling_sigmas(60, mu=0.0)
  run = jax.jit(lambda z, key: sampling.sde_sample(mixture_velocity_fn, z, jnp.zeros_like(z),
                                                   sigmas, _cond(n), key, noise_level=0.7))
  out = run(_noise(n, 1), jax.random.PRNGKey(2))
  x = np.asarray(out.latents)[:, 0, 0]
  mean, cov = _mixture_moments()
  np.testing.assert_allclose(x.mean(0), mean, atol=0.06)
  np.testing.assert_allclose(np.cov(x.T), cov, atol=0.1)
  assert out.trajectory.shape == (61, n, 1, 1, 2) and out.log_probs.shape == (60, n)


def test_sde_log_probs_match_direct_gaussian_density():
  n, steps, level = 16, 6, 0.8
  sigmas = flow.sampling_sigmas(steps, mu=1.15)
  z = _noise(n)
  run = jax.jit(lambda key, lvl: sampling.sde_sample(mixture_velocity_fn, z, jnp.zeros_like(z),
                                                     sigmas, _cond(n), key, noise_level=lvl))
  out = run(jax.random.PRNGKey(3), level)
  traj = np.asarray(out.trajectory, np.float64)[:, :, 0, 0]
  s_np = np.asarray(sigmas, np.float64)
  velocity = jax.jit(_exact_velocity)
  score = jax.jit(lambda x, v, i, prev: sampling.sde_step(
      x[:, None, None], v[:, None, None], jnp.asarray(sigmas)[i], jnp.asarray(sigmas)[i + 1],
      sigmas[1], level, prev_sample=prev).log_prob)
  for i in range(steps):
    s, s_next = s_np[i], s_np[i + 1]
    x = traj[i]
    v = np.asarray(velocity(jnp.asarray(x, jnp.float32), jnp.float32(s)), np.float64)
    a = level * np.sqrt(s / (1 - (s_np[1] if s == 1 else s)))
    dt = s_next - s
    mean = x + (v + a**2 / (2 * s) * (x + (1 - s) * v)) * dt
    std = a * np.sqrt(-dt)
    expected = stats.norm.logpdf(traj[i + 1], mean, std).mean(-1)
    np.testing.assert_allclose(np.asarray(out.log_probs[i]), expected, rtol=1e-4, atol=1e-4)
    # Scoring the stored trajectory (what RL training does) gives the same numbers.
    again = score(jnp.asarray(traj[i], jnp.float32), jnp.asarray(v, jnp.float32), i,
                  out.trajectory[i + 1])
    np.testing.assert_allclose(again, out.log_probs[i], rtol=1e-4, atol=1e-4)
  # An ODE step (noise level 0) is deterministic and has log-prob 0.
  ode = run(jax.random.PRNGKey(3), 0.0)
  np.testing.assert_array_equal(ode.log_probs, 0.0)
  euler = sampling.euler_sample(mixture_velocity_fn, z, jnp.zeros_like(z), sigmas, _cond(n))
  np.testing.assert_allclose(ode.latents, euler, atol=1e-5)


def _affine_velocity_fn(canvas, timestep, cond):
  """A field that depends on every input, to check guidance wiring."""
  left, right = packing.unpack_target(canvas), packing.unpack_condition(canvas)
  t = timestep[:, None, None, None] / 1000.0
  v = 0.5 * left + 2.0 * right + t * cond["text"][:, None, None, :] - 0.1
  return jnp.concatenate([v, jnp.full_like(right, 99.0)], axis=2)


def test_guidance_matches_pipeline_formulas():
  b, key = 3, jax.random.PRNGKey(4)
  ks = jax.random.split(key, 4)
  x = jax.random.normal(ks[0], (b, 2, 3, 4))
  source = jax.random.normal(ks[1], (b, 2, 3, 4))
  cond = {"text": jax.random.normal(ks[2], (b, 4))}
  uncond = {"text": jax.random.normal(ks[3], (b, 4))}
  sigma, g, g_img = jnp.float32(0.6), 3.5, 1.5

  @jax.jit
  def branch(xx, c, tree):
    canvas = packing.pack(xx, c)
    return packing.unpack_target(_affine_velocity_fn(canvas, jnp.full((b,), 600.0), tree))

  guided = jax.jit(functools.partial(sampling.guided_velocity, _affine_velocity_fn))

  zeros = jnp.zeros_like(source)
  u, c = branch(x, zeros, uncond), branch(x, zeros, cond)
  got = guided(x, zeros, sigma, cond, uncond, g)
  np.testing.assert_allclose(got, u + g * (c - u), atol=1e-5)

  u, v_img, v_txt = branch(x, zeros, uncond), branch(x, source, uncond), branch(x, source, cond)
  got = guided(x, source, sigma, cond, uncond, g, g_img)
  np.testing.assert_allclose(got, u + g * (v_txt - v_img) + g_img * (v_img - u), atol=1e-5)

  # In a mixed batch, dual guidance on a T2I example (zero condition) is text CFG.
  mixed = packing.condition_latents(source, jnp.array([1, 0, 1]), source)
  dual = guided(x, mixed, sigma, cond, uncond, g, g_img)
  text_only = guided(x, mixed, sigma, cond, uncond, g)
  np.testing.assert_allclose(dual[1], text_only[1], atol=1e-5)
  assert not np.allclose(dual[0], text_only[0], atol=1e-3)

  no_cfg = guided(x, source, sigma, cond)
  np.testing.assert_allclose(no_cfg, branch(x, source, cond), atol=1e-6)
  with pytest.raises(ValueError, match="guidance_scale is None"):
    sampling.guided_velocity(_affine_velocity_fn, x, source, sigma, cond, uncond)


def test_samplers_trace_the_network_once_and_check_inputs():
  calls = []

  def counting_fn(canvas, timestep, cond):
    calls.append(canvas.shape)
    return _affine_velocity_fn(canvas, timestep, cond)

  b = 2
  z = jnp.ones((b, 2, 3, 4))
  cond, uncond = {"text": jnp.ones((b, 4))}, {"text": jnp.zeros((b, 4))}
  sigmas = flow.sampling_sigmas(28, 1.15)
  run = jax.jit(lambda z, g: sampling.euler_sample(counting_fn, z, z, sigmas, cond, uncond, g, 1.0))
  first = run(z, 3.5)
  run(z, 5.0)
  assert calls == [(3 * b, 2, 6, 4)]  # one trace, three branches in one call, any scale
  assert not np.allclose(first, run(z, 5.0))
  with pytest.raises(ValueError, match="leading batch axis"):
    sampling.euler_sample(counting_fn, z, z, sigmas, {"text": jnp.ones((b + 1, 4))})
  with pytest.raises(ValueError, match="condition"):
    sampling.euler_sample(counting_fn, z, z[:, :, :2], sigmas, cond)


def test_few_step_sampler():
  n = 4000
  sigmas = flow.sampling_sigmas(4, mu=1.15)
  z = _noise(n, 5)
  run = jax.jit(lambda fn: fn(mixture_velocity_fn, z, jnp.zeros_like(z), sigmas, _cond(n)),
                static_argnums=0)
  np.testing.assert_array_equal(run(sampling.few_step_sample), run(sampling.euler_sample))
  # The re-noising form: x0 = x - s v, then (1 - s') x0 + s' e' with fresh noise.
  z = _noise(3, 7)
  cond = {"text": jnp.ones((3, 2))}
  sigmas = flow.sampling_sigmas(3, mu=0.5)
  key = jax.random.PRNGKey(6)

  @jax.jit
  def manual(x):
    for i, k in enumerate(jax.random.split(key, 3)):
      s, s_next = sigmas[i], sigmas[i + 1]
      canvas = packing.pack(x, jnp.zeros_like(x))
      v = packing.unpack_target(_affine_velocity_fn(canvas, jnp.full((3,), s * 1000), cond))
      x = (1 - s_next) * (x - s * v) + s_next * jax.random.normal(k, x.shape)
    return x

  few = jax.jit(lambda z, key: sampling.few_step_sample(_affine_velocity_fn, z, jnp.zeros_like(z),
                                                        sigmas, cond, rng=key))
  got = few(z, key)
  np.testing.assert_allclose(got, manual(z), atol=1e-5)
  assert not np.allclose(got, few(z, jax.random.PRNGKey(7)), atol=1e-3)


def test_sampler_config_zero_guidance_is_off():
  assert SamplerConfig(4).scales == (None, None)
  assert SamplerConfig(20, 3.5).scales == (3.5, None)           # text CFG
  assert SamplerConfig(20, 3.5, 1.0).scales == (3.5, 1.0)       # dual guidance
  assert SamplerConfig(4, 0.0, 1.0).scales == (None, None)      # no image guidance alone
  assert sampling.guidance_scales(None, 1.0) == (None, None)    # None still means off
  with pytest.raises(ValueError, match="guidance must be >= 0"):
    sampling.guidance_scales(-1.0)
  with pytest.raises(ValueError, match=r"SamplerConfig\.steps = 0: must be an int >= 1"):
    SamplerConfig(0)


@pytest.mark.parametrize("field, value, message", [
    ("steps", 0, "config.rl.sampler.steps = 0: must be an int >= 1"),
    ("steps", 2.5, "config.rl.sampler.steps = 2.5: must be an int >= 1"),
    ("guidance", -1.0, "config.rl.sampler.guidance = -1.0: must be a number >= 0"),
    ("image_guidance", -0.5, "config.rl.sampler.image_guidance = -0.5: must be a number >= 0"),
    ("image_guidance", None, "config.rl.sampler.image_guidance is missing"),
    ("batch_size", 8, "config.rl.sampler.batch_size: not a field of SamplerConfig"),
])
def test_sampler_config_from_config_names_the_bad_field(field, value, message):
  section = dict(steps=2, guidance=3.5, image_guidance=1.0)
  assert SamplerConfig.from_config(section, "config.rl.sampler") == SamplerConfig(2, 3.5, 1.0)
  if value is None:
    del section[field]
  else:
    section[field] = value
  with pytest.raises(ConfigError) as err:
    SamplerConfig.from_config(section, "config.rl.sampler")
  assert str(err.value).startswith(message)
